"""`instructrec bench` end to end on a tiny random T5 with every installed provider: the providers
compute the same function as Hugging Face's fp32 forward, and the reports are written."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch

from instructrec.bench.harness import BenchConfig, run_bench
from instructrec.bench.providers import PROVIDERS, unavailable_reason
from instructrec.bench.report import CSV_COLUMNS
from instructrec.bench.workloads import instruction_text, make_requests
from instructrec.engine.capabilities import cpu_info

OPTIONAL = {name: spec.package for name, spec in PROVIDERS.items() if spec.package}
# The compiled engine is left out here: torch.compile costs about a minute even on the tiny model,
# and tests/engine/test_reranker.py checks its scores against the eager engine. So are the providers
# that do not run on a CPU (tests/bench/test_bench_device.py checks they are skipped with the reason).
INSTALLED = [name for name in PROVIDERS if (name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name]))
             and not name.endswith("-compiled") and unavailable_reason(PROVIDERS[name], "cpu") is None]
FP32 = [name for name in INSTALLED if PROVIDERS[name].dtype == "float32"]
WORKLOADS = ["rerank-10", "pointwise", "latency"]
# rerank-100 scores ~120 (instruction, candidate) pairs per request: a few providers cover it
TOURNAMENT_PROVIDERS = [p for p in ("engine-torch-fp32", "hf-batched", "ct2-fp32") if p in INSTALLED]


def _run(tiny_t5_dir, out, workloads, providers):
    cfg = BenchConfig(workloads=workloads, providers=providers, models=["tiny"], requests=3, peer_requests=2,
                      threads=1, warmup=1, out=out / "results", cache=out / "cache", peak_seconds=0.02,
                      in_process=True)
    summary = run_bench(cfg, model_dirs={"tiny": tiny_t5_dir})
    figures = {(r["provider"], r["workload"]): r["figures"] for r in summary["records"]}
    for r in summary["records"]:  # no utilisation figure: the reason instead (bench/peaks.py)
        figures[(r["provider"], r["workload"])]["utilisation_note"] = r["utilisation_note"]
    return figures


@pytest.fixture(scope="module")
def bench(tiny_t5_dir, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("bench")
    return out / "results", _run(tiny_t5_dir, out, WORKLOADS, INSTALLED)


@pytest.fixture(scope="module")
def tournament(tiny_t5_dir, tmp_path_factory, one_torch_thread):
    return _run(tiny_t5_dir, tmp_path_factory.mktemp("bench-tournament"), ["rerank-100"], TOURNAMENT_PROVIDERS)


def test_peers_run_the_engine_tournament(tournament):
    """Same groups, same seed, same scores: the same ranking of all 100 candidates."""
    for provider in TOURNAMENT_PROVIDERS:
        f = tournament[(provider, "rerank-100")]
        assert f["top1_agreement"] == 1.0 and f["kendall_tau"] == 1.0, provider
        assert f["candidates"] == 100 and f["encoder_passes"] >= 11  # 10 groups and a final at least
    assert tournament[("hf-batched", "rerank-100")]["encoder_passes"] >= 110  # per (group, candidate)


def test_reference_is_hugging_face_own_loss(bench, tiny_t5_dir, tokenizer):
    """hf-batched's score of request 0, candidate 0 equals -loss x tokens from T5's own forward."""
    from transformers import T5ForConditionalGeneration

    results, _ = bench
    raw = json.loads((results / "results.json").read_text())
    reference = next(r for r in raw["records"] if (r["provider"], r["workload"]) == ("hf-batched", "rerank-10"))
    assert reference["figures"]["max_abs_score_diff"] == 0.0
    request = make_requests(1, 20, 10, seed=0)[0]
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    source = tokenizer(instruction_text(request, None, tokenizer), return_tensors="pt").input_ids
    labels = tokenizer(text_target=[request.candidates[0]], return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = model(input_ids=source, labels=labels).loss
    raw_run = json.loads((results / "raw" / "result-tiny-hf-batched.json").read_text())
    scores = raw_run["workloads"]["rerank-10"]["scores"]
    # Relative: HF's loss is an fp32 mean, so -loss x tokens carries a few fp32 ulps of a sum of
    # ~575 nats, and the bench's score differed from it by 1.3e-4 (2e-7 relative) in 2 of 5 runs of
    # a fresh clone; a wrong token or a missing </s> moves the score by far more than 1e-6 of it.
    assert scores[0][0] == pytest.approx(-loss.item() * labels.shape[1], rel=1e-6)


@pytest.mark.parametrize("provider", FP32)
def test_fp32_providers_compute_the_reference_function(bench, provider):
    _, figures = bench
    for workload in ("rerank-10", "pointwise", "latency"):
        f = figures[(provider, workload)]
        assert f["max_abs_score_diff"] < 2e-4, (provider, workload)
        assert f["top1_agreement"] == 1.0 and f["kendall_tau"] == 1.0


@pytest.mark.parametrize("provider", sorted(set(OPTIONAL)))
def test_optional_peers_ran_or_skip(bench, provider):
    if not importlib.util.find_spec(OPTIONAL[provider]):
        pytest.skip(f"{OPTIONAL[provider]} is not installed")
    if provider not in INSTALLED:
        pytest.skip(f"not on a CPU: {unavailable_reason(PROVIDERS[provider], 'cpu')}")
    _, figures = bench
    assert all((provider, w) in figures for w in WORKLOADS)


def test_figures_and_work_counts(bench):
    _, figures = bench
    engine, peer = figures[("engine-torch-fp32", "rerank-10")], figures[("hf-batched", "rerank-10")]
    assert engine["requests"] == 3 and peer["requests"] == 2 and engine["agreement_requests"] == 2
    bf16 = figures[("engine-torch-bf16", "rerank-10")]
    assert bf16["agreement_requests_vs_engine_fp32"] == 3  # the larger sample: all the engine's requests
    assert engine["encoder_passes"] == 3 and peer["encoder_passes"] == 20  # once per request vs per pair
    # the work needed is per request, so it scales with the requests scored
    assert engine["model_gflop"] / 3 == pytest.approx(peer["model_gflop"] / 2, rel=0.1)
    # the encoder repeated 10 times (the tiny model's work is mostly its 32k-vocabulary head)
    assert peer["executed_gflop"] > 2 * peer["model_gflop"]
    assert figures[("engine-torch-fp32", "latency")]["latency_p95_ms"] >= \
        figures[("engine-torch-fp32", "latency")]["latency_p50_ms"] > 0
    assert "utilisation_model" in figures[("engine-torch-fp32", "rerank-10")]
    for f in figures.values():
        assert f["candidates_per_s"] > 0
        if "utilisation_model" in f:
            assert 0 < f["utilisation_model"] <= f["utilisation_executed"] * 1.01 and f["utilisation_executed"] <= 1.0
        else:  # a peak the provider outran (noise on a shared machine) is reported as such, never above 100%
            assert f["utilisation_note"].startswith("n/a")


def test_reports_are_written(bench):
    results, figures = bench
    with open(results / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert {(r["provider"], r["workload"]) for r in rows} == set(figures)
    assert all(r["versions"].startswith("instructrec=") and r["time"] for r in rows)
    throughput = [r for r in rows if (r["provider"], r["workload"], r["figure"]) ==
                  ("engine-torch-bf16", "rerank-10", "candidates_per_s")]
    assert float(throughput[0]["value"]) == pytest.approx(figures[("engine-torch-bf16", "rerank-10")]["candidates_per_s"])
    assert throughput[0]["dtype"] == "bfloat16"
    table = (results / "results.md").read_text()
    assert "### pointwise, tiny" in table and "| engine-onnx-fp32 |" in table
    assert cpu_info().summary() in table  # the CPU and its features beside every figure
    assert json.loads((results / "results.json").read_text())["cpu"]["features"] == cpu_info().features()
    assert (results / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # three subprocesses, each importing torch: ~12 s on a quiet machine
def test_subprocess_run_measures_memory(tiny_t5_dir, tmp_path):
    """The real path: the peaks and the provider each in their own subprocess."""
    cfg = BenchConfig(workloads=["rerank-10"], providers=["engine-torch-fp32"], models=["tiny"], requests=2,
                      threads=1, warmup=1, out=tmp_path / "results", cache=tmp_path / "cache", peak_seconds=0.02)
    summary = run_bench(cfg, model_dirs={"tiny": tiny_t5_dir})
    f = summary["records"][0]["figures"]
    assert 50 < f["peak_rss_mib"] <= f["process_peak_rss_mib"] < 4096
    assert np.isfinite(f["utilisation_model"]) and "top1_agreement" not in f  # no reference was run


def test_every_engine_dtype_is_compared_with_the_fp32_engine(bench):
    _, figures = bench
    engines = [p for p in INSTALLED if PROVIDERS[p].family == "engine" and p != "engine-torch-fp32"]
    assert {"engine-torch-auto", "engine-torch-int8", "engine-torch-bf16"} <= set(engines)
    for provider in engines:
        for workload in WORKLOADS:
            f = figures[(provider, workload)]
            assert f["agreement_requests_vs_engine_fp32"] == f["requests"], (provider, workload)
            assert 0 <= f["top1_agreement_vs_engine_fp32"] <= 1 and -1 <= f["kendall_tau_vs_engine_fp32"] <= 1
    # int8 on the tiny model: scores within a few percent of fp32 (tests/engine/test_quantize.py), so
    # the rankings stay close
    assert figures[("engine-torch-int8", "rerank-10")]["kendall_tau_vs_engine_fp32"] > 0.5
