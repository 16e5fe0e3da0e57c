"""Bench honesty on synthetic records (nothing timed is asserted): a provider's utilisation is
measured against the peak of the kernels it runs; a peak exists only where the CPU runs that dtype
natively; no utilisation above 100% is ever printed (it reads "n/a (peak not measurable)" and the
log says why); the report names the CPU and its features; the peak probes leave torch's thread
count as they found it."""

from __future__ import annotations

import importlib.util
import json
import logging
import re

import pytest
import torch

from instructrec.bench.flops import T5Shape, matmul_peak
from instructrec.bench.harness import resolve_providers, with_engine_reference
from instructrec.bench.peaks import KERNELS, NOT_MEASURABLE, measure_peak, plan_peaks
from instructrec.bench.providers import CUDA_PEAK_KERNEL, PROVIDERS
from instructrec.bench.report import bar_status, figures, markdown
from instructrec.engine.capabilities import CpuInfo
from instructrec.engine.presets import shape_config

ZEN3 = CpuInfo(model="AMD EPYC (Zen 3)", flags=frozenset({"avx2", "fma"}), isa="AVX2", cores=2)
ZEN4 = CpuInfo(model="AMD EPYC (Zen 4)", flags=frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}),
               isa="AVX512", cores=2)
TINY = T5Shape.from_config(shape_config("t5-tiny"))


def _run(model_gflop: float = 10.0, executed_gflop: float = 20.0, wall_s: float = 1.0) -> dict:
    """A worker record of 2 requests x 3 candidates, 1 s of model time."""
    return {"requests": 2, "candidates": 6, "rankings": [[0, 1, 2], [2, 1, 0]], "scores": [[3.0, 2.0, 1.0],
            [1.0, 2.0, 3.0]], "wall_s": wall_s, "tokenize_s": 0.0, "latencies_s": [],
            "model_flops": {"total": model_gflop * 1e9}, "executed_flops": {"total": executed_gflop * 1e9},
            "extra": {"encoder_passes": 2}}


def _peak(kernel: str, gflops: float | None, note: str | None = None) -> dict:
    return {"kernel": kernel, "flops_per_s": None if gflops is None else gflops * 1e9, "note": note,
            "how": KERNELS[kernel].how}


def _record(provider: str, f: dict, note: str | None, architecture: str = "flan-t5-base", dtype: str = "float32",
            kernel: str = "torch:float32") -> dict:
    return {"provider": provider, "workload": "rerank-10", "model": "random:flan-t5-base",
            "architecture": architecture, "device": "cpu", "dtype": dtype, "versions": "", "peak_kernel": kernel,
            "utilisation_note": note, "figures": f}


def _percentages(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d[\d,]*(?:\.\d+)?)%", text.replace(",", ""))]


def test_each_provider_is_measured_against_its_own_kernels():
    """On CPU; a GPU-only provider is read against the GPU's bf16 tensor-core peak (MFU)."""
    library = {"engine": "torch", "hf": "torch", "optimum": "onnxruntime", "ct2": "ctranslate2"}
    for name, spec in PROVIDERS.items():
        if spec.peak_kernel is None:  # resolved at load: engine-torch-auto
            assert spec.dtype == "auto", name
            continue
        if "cpu" not in spec.devices:
            assert spec.peak_kernel == CUDA_PEAK_KERNEL, name
            continue
        kernel = KERNELS[spec.peak_kernel]
        want = "onnxruntime" if "onnx" in name else library[spec.family]
        assert kernel.library == want and kernel.dtype == spec.dtype, name
    # CTranslate2's int8 is not torch's: its own peak, measured by CTranslate2 itself
    assert PROVIDERS["ct2-int8"].peak_kernel == "ctranslate2:int8"
    assert PROVIDERS["engine-torch-int8"].peak_kernel == "torch:int8-dynamic"


@pytest.mark.parametrize("cpu, unmeasured", [
    (ZEN3, {"torch:bfloat16", "torch:int8-dynamic", "ctranslate2:int8"}),
    (ZEN4, set()),
])
def test_a_peak_only_where_the_cpu_runs_the_dtype_natively(cpu, unmeasured):
    measure, decided = plan_peaks(set(KERNELS), cpu)
    assert set(decided) == unmeasured and set(measure) == set(KERNELS) - unmeasured
    for entry in decided.values():
        assert entry["flops_per_s"] is None and entry["note"].startswith("n/a (no native")
    # and a provider on such a kernel gets the reason, no utilisation
    if unmeasured:
        f, note = figures(_run(), decided["torch:bfloat16"], None, provider="engine-torch-bf16")
        assert "utilisation_model" not in f and "utilisation_executed" not in f and "no native bfloat16" in note


def test_no_utilisation_above_100_percent_is_printed(caplog):
    """10 GFLOP of model work in 1 s against a 5 GFLOP/s peak would print 200%."""
    with caplog.at_level(logging.WARNING, logger="instructrec.bench.peaks"):
        f, note = figures(_run(model_gflop=10, executed_gflop=20), _peak("ctranslate2:int8", 5.0), None,
                          provider="ct2-int8")
    assert note == NOT_MEASURABLE and "utilisation_model" not in f and "utilisation_executed" not in f
    assert any("ct2-int8" in r.message and "ctranslate2:int8" in r.message and "200%" in r.message
               for r in caplog.records)
    ok, ok_note = figures(_run(model_gflop=10, executed_gflop=20), _peak("torch:float32", 40.0), None,
                          provider="engine-torch-fp32")
    assert ok_note is None and ok["utilisation_model"] == pytest.approx(0.25) and ok["utilisation_executed"] == 0.5
    records = [_record("ct2-int8", f, note, dtype="int8", kernel="ctranslate2:int8"),
               _record("engine-torch-fp32", ok, ok_note)]
    peaks = {"random:flan-t5-base": {"ctranslate2:int8": _peak("ctranslate2:int8", 5.0),
                                     "torch:float32": _peak("torch:float32", 40.0)}}
    text = markdown(records, peaks, "header")
    assert NOT_MEASURABLE in text and "25.0%" in text and "50.0%" in text
    assert max(_percentages(text)) <= 100.0


def test_executed_utilisation_alone_above_100_also_voids_the_peak():
    f, note = figures(_run(model_gflop=10, executed_gflop=60), _peak("onnxruntime:float32", 50.0), None,
                      provider="optimum-ort")
    assert note == NOT_MEASURABLE and "utilisation_model" not in f


def test_report_names_the_peak_kernels_and_why_one_is_missing():
    peaks = {"random:flan-t5-base": {
        "ctranslate2:int8": {**_peak("ctranslate2:int8", 80.0), "ct2_backend": "GEMM_S8 backend: DNNL"},
        "torch:bfloat16": _peak("torch:bfloat16", None, "n/a (no native bfloat16 on this CPU: no AVX512-BF16, no AMX)"),
    }}
    text = markdown([], peaks, "header")
    assert "- ctranslate2:int8: 80.0 GFLOP/s (CTranslate2 score_batch" in text and "GEMM_S8 backend: DNNL" in text
    assert "- torch:bfloat16: n/a (no native bfloat16" in text


def test_bar_reads_auto_against_ct2_fastest_and_the_precision_peak():
    def f(cps, top1=None, util=None):
        out = {"candidates_per_s": cps, "requests": 8}
        if top1 is not None:
            out.update(top1_agreement_vs_engine_fp32=top1, agreement_requests_vs_engine_fp32=8)
        if util is not None:
            out["utilisation_model"] = util
        return out
    records = [_record("engine-torch-auto", f(60.0, top1=1.0, util=0.2), None, dtype="bfloat16 (auto)",
                       kernel="torch:bfloat16"),
               _record("engine-torch-fp32", f(20.0, util=0.4), None),
               _record("ct2-fp32", f(4.0), None), _record("ct2-int8", f(10.0), NOT_MEASURABLE, dtype="int8",
                                                          kernel="ctranslate2:int8")]
    lines = bar_status(records)
    assert lines[0].startswith("engine-torch-auto (bfloat16 (auto)): 60 candidates/s, top-1 agreement 1.000 vs "
                               "engine-torch-fp32 on 8 requests (bar 0.99): met")
    assert "vs ct2-int8 (CTranslate2's fastest in this run): 6.00x (bar 5x): met" in lines[1]
    assert "20.0% (goal 50%): not yet" in lines[-1] and "torch:bfloat16" in lines[-1]
    # auto below the agreement bar cannot meet the speed bar either
    records[0]["figures"]["top1_agreement_vs_engine_fp32"] = 0.9
    assert "NOT met" in bar_status(records)[1]
    # a run of another architecture is not read as the bar
    assert "was not part of this run" in bar_status([_record("engine-torch-auto", f(1.0), None,
                                                             architecture="flan-t5-small")])[0]


def test_engine_fp32_joins_any_engine_precision():
    assert with_engine_reference(["engine-torch-bf16", "ct2-int8"]) == ["engine-torch-fp32", "engine-torch-bf16",
                                                                        "ct2-int8"]
    assert with_engine_reference(["hf-batched", "ct2-int8"]) == ["hf-batched", "ct2-int8"]
    assert resolve_providers(["engine-torch-int8"]) == ["engine-torch-fp32", "engine-torch-int8"]


def test_peak_probes_leave_the_thread_count_alone(one_torch_thread):
    before = torch.get_num_threads()
    result = matmul_peak(TINY, "float32", threads=before + 1, seconds=0.0)
    assert torch.get_num_threads() == before and result["threads"] == before + 1
    measure_peak("torch:int8-dynamic", TINY, threads=before + 1, seconds=0.0, ct2_dirs={})
    assert torch.get_num_threads() == before


@pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None, reason="ctranslate2 is not installed")
def test_ct2_peak_runs_ct2_itself(tiny_t5_dir, tmp_path):
    """The CTranslate2 peak comes from CTranslate2 running the converted model (its own log names
    the compute type it selected), not from a torch GEMM."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(tiny_t5_dir)).convert(str(tmp_path / "ct2"), quantization="int8")
    shape = T5Shape.from_config(json.loads((tiny_t5_dir / "config.json").read_text()))
    result = measure_peak("ctranslate2:int8", shape, threads=1, seconds=0.0, ct2_dirs={"int8": str(tmp_path / "ct2")})
    assert result["flops_per_s"] > 0 and "int8" in result["ct2_backend"]
