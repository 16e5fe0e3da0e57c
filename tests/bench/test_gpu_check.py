"""bench/gpu_check.py (`make gpu-check`) on a machine without a GPU: the dry run's plan, the skip
path, the step machinery on a real pytest run, the training inputs it writes (read by training's
own reader), its figures from a metrics log, and the engine measurement on CPU with t5-tiny."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from instructrec.bench import gpu_check, gpu_engine

NO_GPU = shutil.which("nvidia-smi") is None or gpu_check.nvidia_smi() is None


def test_dry_run_writes_the_plan_as_the_report(tmp_path):
    code = gpu_check.main(["--dry-run", "--no-install", "--python", sys.executable, "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "planned" for s in steps.values())
    assert steps["tests"]["command"][:5] == [sys.executable, "-m", "pytest", "-m", "gpu"]
    assert "random:flan-t5-xl" in steps["train"]["command"] and "--gradient-checkpointing" in steps["train"]["command"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| tests | planned |" in markdown and "(dry run: nothing ran)" in markdown


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU: the skip path does not apply")
def test_without_a_gpu_every_step_is_skipped_with_the_reason(tmp_path):
    code = gpu_check.main(["--steps", "tests,train", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("tests", "skipped"), ("train", "skipped")]
    assert "no CUDA GPU" in report["steps"][0]["reason"]
    assert "| train | skipped |" in (tmp_path / "report.md").read_text()


def test_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "tests,nope", "--dry-run"])


def test_tests_step_reads_a_real_pytest_run(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no GPU here')\ndef test_skipped():\n    pass\n")
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-gpu.xml'}",
           str(suite / "test_sample.py")]
    step = gpu_check.run_step("tests", cmd, None, out, tmp_path, sys.executable, limit=120)
    assert step.status == "failed" and step.seconds > 0
    assert (step.results["passed"], step.results["failures"], step.results["skipped"]) == (1, 1, 1)
    assert step.results["failed"][0]["test"].endswith("test_bad")
    assert step.results["skip_reasons"] == {"no GPU here": 1}
    assert (out / "logs" / "tests.log").read_text().startswith("$ " + sys.executable)


def test_train_inputs_are_what_training_reads(tmp_path):
    from instructrec.training.tune_data import TRAIN_COLUMNS, read_split

    folder = gpu_check.write_train_instructions(tmp_path / "instructions", rows=16)
    for split in ("train", "valid"):
        assert read_split(folder / f"{split}.parquet", TRAIN_COLUMNS, split).num_rows == 16


def test_train_figures_skip_the_warm_up_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": 1, "examples": 8, "examples_per_s": 0.8},  # 10 s: warm-up
               {"kind": "train", "step": 2, "examples": 8, "examples_per_s": 16.0},  # 0.5 s
               {"kind": "eval", "step": 2, "valid_loss": 3.0},
               {"kind": "train", "step": 3, "examples": 8, "examples_per_s": 8.0}]  # 1 s
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert gpu_check.train_figures(metrics) == {"steps": 3, "steps_per_s": round(2 / 1.5, 3),
                                                "examples_per_s": round(16 / 1.5, 2)}


def test_cuda_wheel_index_follows_the_driver():
    assert gpu_check.cuda_wheel_index("13.0").endswith("/cu130")
    assert gpu_check.cuda_wheel_index("12.9").endswith("/cu128")
    assert gpu_check.cuda_wheel_index("12.6").endswith("/cu126")
    assert gpu_check.cuda_wheel_index("12.4") is None and gpu_check.cuda_wheel_index(None) is None
    makefile = (Path(gpu_check.REPO) / "Makefile").read_text()
    assert f"TORCH_SPEC ?= torch=={gpu_check.makefile_torch_version()}\n" in makefile


def test_engine_measurement_runs_on_cpu(tokenizer_dir, one_torch_thread):
    rows = gpu_engine.engine_measure(tokenizer_dir, ["t5-tiny"], device="cpu", requests={"t5-tiny": 8},
                                    batch_tokens=(None, 2048))
    assert [(r["workload"], r["batch_tokens"]) for r in rows] == [
        ("rerank-10", 8192), ("rerank-10", 2048), ("rerank-100", 2048), ("latency", 2048)]
    by = {r["workload"]: r for r in rows[1:]}
    assert rows[0]["candidates"] == 8 * 10 and by["rerank-100"]["candidates"] == 1 * 100
    assert all(r["mfu"] > 0 and r["candidates_per_s"] > 0 for r in rows)
    from instructrec.engine.capabilities import cpu_info

    if cpu_info().native_bf16:
        # Where bf16 is emulated (AVX2 only) the peak probe's small products run far slower per
        # FLOP than the engine's large ones (measured here: utilisation 0.96-1.20 against it), so
        # the bound holds only where bf16 runs natively; the bench is for GPUs.
        assert all(r["mfu"] < 1 for r in rows)
    assert 0 < by["latency"]["p50_ms"] <= by["latency"]["p95_ms"]
