"""`instructrec bench --device`: the flag's checks, which provider runs where and why not, the
report of a GPU run, and (with a CUDA GPU, `pytest -m gpu`) every provider on the GPU.

On CPU: the flag refused in one line (exit 2) where there is no CUDA; the device-only providers
skipped with their reason in the report; the same device plumbing (device passed to every
provider, synchronisation points, Optimum's IO binding) exercised on the CPU by a real run; the
GPU report's target lines and memory columns from records; nvidia-smi's per-process output read.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from instructrec.bench.gpu_memory import ProcessGpuMemorySampler, process_memory_mib
from instructrec.bench.harness import BenchConfig, resolve_bench_device, run_bench, split_by_device
from instructrec.bench.peaks import KERNELS, plan_peaks
from instructrec.bench.providers import CUDA_PEAK_KERNEL, DEVICE_ONLY_REASONS, PROVIDERS, unavailable_reason
from instructrec.bench.report import gpu_target_status, markdown
from instructrec.engine.capabilities import cpu_info
from instructrec.engine.errors import InputError

NO_CUDA = not torch.cuda.is_available()
GPU_ONLY = ("engine-onnx-bf16", "ct2-bf16", "ct2-int8-bf16", "ct2-int8-fp16")


def _bench(*args: str, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructrec", "bench", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------- the flag, on CPU
@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal does not apply")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_one_line_error(device, tmp_path):
    done = _bench("--device", device, "--models", "random:t5-tiny", "--workloads", "rerank-10", out=tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--device" in errors[0] and "CUDA is not available" in errors[0]
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("device, problem", [("tpu", "unknown device"), ("cpu:1", "a CPU has no index")])
def test_other_devices_are_refused_by_name(device, problem):
    with pytest.raises(InputError, match=problem) as caught:
        resolve_bench_device(device)
    assert caught.value.field == "--device"


def test_cpu_is_the_default_and_stays_cpu():
    assert resolve_bench_device("cpu") == "cpu"
    assert BenchConfig(workloads=[], providers=None, models=[]).device == "cpu"


# ---------------------------------------------------------------------- which provider runs where
def test_device_only_providers_say_why_they_do_not_run_on_a_cpu():
    runnable, skipped = split_by_device(list(PROVIDERS), "cpu")
    for name in GPU_ONLY:
        assert skipped[name] == DEVICE_ONLY_REASONS[name] and "CUDA only" in skipped[name]
    assert "engine-torch-int8" in runnable and "engine-onnx-fp32" in runnable
    assert ("hf-batched-bf16" in runnable) == cpu_info().native_bf16
    # the CPU-only provider on a GPU: refused by its device type alone, before any CUDA call
    assert unavailable_reason(PROVIDERS["engine-torch-int8"], "cuda:0") == DEVICE_ONLY_REASONS["engine-torch-int8"]


def test_every_provider_has_a_peak_on_its_devices():
    """On CPU the kernel family it runs on; on a GPU the one bf16 tensor-core peak (MFU)."""
    for spec in PROVIDERS.values():
        if "cpu" in spec.devices and spec.peak_kernel is not None:
            assert spec.peak_kernel in KERNELS, spec.name
    assert KERNELS[CUDA_PEAK_KERNEL].library == "torch-cuda"
    measure, decided = plan_peaks({CUDA_PEAK_KERNEL}, cpu_info())
    assert measure == [CUDA_PEAK_KERNEL] and decided == {}  # never judged by the CPU's features


def test_skipped_providers_are_listed_in_the_report_and_the_rest_run_on_the_device(tiny_t5_dir, tmp_path,
                                                                                 one_torch_thread):
    providers = ["engine-torch-fp32", "engine-onnx-bf16", "optimum-ort", "hf-batched-bf16"]
    if not importlib.util.find_spec("optimum.onnxruntime"):
        providers.remove("optimum-ort")
    cfg = BenchConfig(workloads=["rerank-10", "latency"], providers=providers, models=["tiny"], requests=2,
                      peer_requests=1, threads=1, warmup=1, out=tmp_path / "results", cache=tmp_path / "cache",
                      peak_seconds=0.02, in_process=True)
    summary = run_bench(cfg, model_dirs={"tiny": tiny_t5_dir})
    ran = {r["provider"] for r in summary["records"]}
    assert "engine-onnx-bf16" not in ran
    assert summary["not_run"]["engine-onnx-bf16"] == {"status": "skipped",
                                                      "reason": DEVICE_ONLY_REASONS["engine-onnx-bf16"]}
    assert {r["device"] for r in summary["records"]} == {"cpu"} and summary["device"] == "cpu"
    raw = json.loads((tmp_path / "results" / "raw" / "result-tiny-engine-torch-fp32.json").read_text())
    assert raw["device"] == "cpu"
    for r in summary["records"]:  # no GPU figures on a CPU run
        assert not any(k.startswith("peak_gpu") for k in r["figures"])
    if "optimum-ort" in ran:  # Optimum's IO binding path, as on CUDA: the fp32 engine's rankings
        f = next(r["figures"] for r in summary["records"]
                 if (r["provider"], r["workload"]) == ("optimum-ort", "rerank-10"))
        assert f["top1_agreement_vs_engine_fp32"] == 1.0 and f["kendall_tau_vs_engine_fp32"] == 1.0
    text = (tmp_path / "results" / "results.md").read_text()
    assert f"- engine-onnx-bf16: skipped: {DEVICE_ONLY_REASONS['engine-onnx-bf16']}" in text
    assert "--device cpu" in text and "### The bar" in text and "GPU MiB" not in text


@pytest.mark.slow  # three subprocesses, each importing torch: ~20 s on a quiet machine
def test_a_failing_provider_is_reported_and_the_others_still_run(tiny_t5_dir, tmp_path):
    """The real subprocess path: engine-onnx-fp32 finds a broken export in its cache (its manifest
    says another format version), its worker raises ModelLoadError, and the report says so."""
    from instructrec.engine.onnx_backend import FORMAT_VERSION, MANIFEST_NAME

    broken = tmp_path / "cache" / "tiny" / f"engine-onnx-v{FORMAT_VERSION}"
    broken.mkdir(parents=True)
    (broken / MANIFEST_NAME).write_text(json.dumps({"format": "instructrec-onnx", "format_version": 1}))
    cfg = BenchConfig(workloads=["rerank-10"], providers=["engine-torch-fp32", "engine-onnx-fp32"], models=["tiny"],
                      requests=2, threads=1, warmup=1, out=tmp_path / "results", cache=tmp_path / "cache",
                      peak_seconds=0.02)
    summary = run_bench(cfg, model_dirs={"tiny": tiny_t5_dir})
    assert [r["provider"] for r in summary["records"]] == ["engine-torch-fp32"]
    failure = summary["not_run"]["engine-onnx-fp32"]
    assert failure["status"] == "failed" and "ModelLoadError" in failure["reason"] and "version 1" in failure["reason"]
    assert "- engine-onnx-fp32: failed: tiny: ModelLoadError" in (tmp_path / "results" / "results.md").read_text()


# ----------------------------------------------------------------------- the GPU report, from records
def _record(provider, cps, dtype="bfloat16", architecture="flan-t5-xl", **figures):
    return {"provider": provider, "workload": "rerank-10", "model": "random:flan-t5-xl", "architecture": architecture,
            "device": "cuda:0", "dtype": dtype, "peak_kernel": CUDA_PEAK_KERNEL, "utilisation_note": None,
            "figures": {"candidates_per_s": cps, "requests": 64, "requests_per_s": cps / 10, "tokenize_s": 0.1,
                        **figures}}


def test_gpu_targets_read_the_fastest_bf16_engine_against_its_peers():
    records = [_record("engine-torch-bf16", 6000.0, utilisation_model=0.55, top1_agreement_vs_engine_fp32=1.0,
                       agreement_requests_vs_engine_fp32=64),
               _record("engine-torch-fp32", 2000.0, dtype="float32", utilisation_model=0.1),
               _record("hf-batched-bf16", 1000.0), _record("optimum-ort", 2500.0, dtype="float32")]
    lines = gpu_target_status(records)
    assert lines[0].startswith("Read on engine-torch-bf16 (bfloat16)")
    assert "55.0% of the measured bf16 tensor-core peak (target 50%): met" in lines[1]
    assert "vs hf-batched-bf16 (Hugging Face batched, bf16): 6.00x (target 5x): met" in lines[2]
    assert "vs optimum-ort (Optimum ORTModelForSeq2SeqLM, onnxruntime CUDA): 2.40x (target 3x): NOT met" in lines[3]
    assert "top-1 agreement with engine-torch-fp32 1.000 on 64 requests (target 0.99): met" in lines[4]
    assert "71 documents/s on an RTX A6000" in lines[5]
    # another shape is not the target's
    other_shape = [_record("engine-torch-bf16", 1.0, architecture="flan-t5-base")]
    assert "were not part of this run" in gpu_target_status(other_shape)[0]
    # a peer that did not run is said so, never read as met
    assert any("optimum-ort" in line and "did not run" in line for line in gpu_target_status(records[:3]))


def test_gpu_report_has_memory_columns_and_the_targets_instead_of_the_cpu_bar():
    records = [_record("engine-torch-bf16", 6000.0, peak_gpu_torch_mib=1234.0, peak_gpu_process_mib=2345.0),
               {**_record("ct2-int8-bf16", 900.0, dtype="int8_bfloat16", peak_gpu_process_mib=3000.0),
                "gpu_memory_note": "no torch figure: onnxruntime's arena and CTranslate2's allocator are outside "
                                   "torch's"}]
    text = markdown(records, {}, "header", {"engine-torch-int8": {"status": "skipped", "reason": "CPU only"}}, "cuda:0")
    assert "| GPU MiB torch | GPU MiB process |" in text
    assert "| 1,234 | 2,345 |" in text and "|  | 3,000 |" in text
    assert "ct2-int8-bf16: no torch figure" in text
    assert "- engine-torch-int8: skipped: CPU only" in text
    assert "### The GPU targets" in text and "### The bar" not in text


# ------------------------------------------------------------------------------ nvidia-smi's output
def test_process_memory_is_read_for_this_pid_only():
    text = "4242, 1536\n77, 9000\n4242, 512\n"  # --query-compute-apps=pid,used_memory, two GPUs
    assert process_memory_mib(text, 4242) == 2048.0
    assert process_memory_mib(text, 1) is None
    assert process_memory_mib("4242, [N/A]\n", 4242) is None


def test_sampler_without_nvidia_smi_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no nvidia-smi to find
    with ProcessGpuMemorySampler() as sampler:
        pass
    assert sampler.peak_mib is None and "nvidia-smi not found" in sampler.note


# ---------------------------------------------------------------------------------- GPU, for real
def gpu_test(test):
    return pytest.mark.gpu(pytest.mark.skipif(NO_CUDA, reason="no CUDA device: the bench's GPU path is not run")(test))


@gpu_test
def test_every_provider_that_can_runs_on_the_gpu(tiny_t5_dir, tmp_path):
    """Every installed provider but the compiled one (a minute of torch.compile), in this process
    (a provider's error surfaces here with its traceback): each record carries the device, GPU
    memory and MFU against the measured bf16 peak; the fp32 torch and onnxruntime providers score
    like Hugging Face fp32 (TF32 off on both)."""
    installed = [n for n, spec in PROVIDERS.items() if not n.endswith("-compiled") and not spec.missing_package()]
    cfg = BenchConfig(workloads=["rerank-10", "latency"], providers=installed, models=["tiny"], requests=8,
                      peer_requests=4, threads=2, warmup=1, out=tmp_path / "results", cache=tmp_path / "cache",
                      peak_seconds=0.05, device="cuda", in_process=True)
    summary = run_bench(cfg, model_dirs={"tiny": tiny_t5_dir})
    assert summary["device"].startswith("cuda:") and summary["gpu"]["name"]
    peak = summary["peaks"]["tiny"][CUDA_PEAK_KERNEL]
    assert peak["flops_per_s"] > 1e12  # any bf16 tensor-core GPU does > 1 TFLOP/s
    failed = {n: e["reason"] for n, e in summary["not_run"].items() if e["status"] == "failed"}
    assert not failed, failed
    by = {(r["provider"], r["workload"]): r for r in summary["records"]}
    assert ("engine-torch-bf16", "rerank-10") in by and ("hf-batched-bf16", "rerank-10") in by
    for (provider, workload), r in by.items():
        f = r["figures"]
        assert r["device"] == summary["device"] and r["peak_kernel"] == CUDA_PEAK_KERNEL
        assert f["candidates_per_s"] > 0
        assert "utilisation_model" in f or r["utilisation_note"]
        if provider.startswith("engine-torch") or provider.startswith("hf-"):
            assert f["peak_gpu_torch_mib"] > 0, provider
        if workload == "latency":
            assert f["latency_p95_ms"] >= f["latency_p50_ms"] > 0
        fp32 = PROVIDERS[provider].dtype == "float32" and PROVIDERS[provider].family != "ct2"
        if fp32 and "max_abs_score_diff" in f:
            assert f["max_abs_score_diff"] < 1e-2, provider  # TF32 off: fp32 on the GPU vs HF fp32 on the GPU
    text = (tmp_path / "results" / "results.md").read_text()
    assert "### The GPU targets" in text and "GPU MiB process" in text


@gpu_test
def test_the_gpu_peak_is_measured_with_cuda_events():
    from instructrec.bench.flops import T5Shape
    from instructrec.bench.peaks import cuda_bf16_peak
    from instructrec.engine.presets import shape_config

    rate, where = cuda_bf16_peak(T5Shape.from_config(shape_config("flan-t5-base")), "cuda", repeats=3, trials=2)
    assert rate > 1e12 and {"m", "k", "n"} <= set(where) and where["gpu"]["name"]


@gpu_test
def test_cli_bench_on_cuda_writes_the_gpu_report(tmp_path):
    done = _bench("--device", "cuda", "--models", "random:t5-tiny", "--workloads", "rerank-10", "--providers",
                  "engine-torch-bf16,hf-batched-bf16", "--requests", "4", "--peer-requests", "2",
                  "--cache", str(tmp_path / "cache"), out=tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["provider"] for r in summary["records"]} == {"engine-torch-fp32", "engine-torch-bf16", "hf-batched-bf16"}
    assert all(r["figures"].get("peak_gpu_torch_mib") for r in summary["records"])


def test_gpu_check_bench_step_uses_only_flags_the_bench_has(tmp_path):
    """make gpu-check runs the bench step only if `instructrec bench --help` lists --device, and
    then with its own flags: every one of them must exist."""
    from instructrec.bench import gpu_check

    command = gpu_check.step_commands(sys.executable, tmp_path, "tokenizer", tmp_path)["bench"]
    help_text = subprocess.run([sys.executable, "-m", "instructrec", "bench", "--help"], capture_output=True,
                               text=True, timeout=120, check=True).stdout
    flags = [arg for arg in command if arg.startswith("--")]
    assert "--device" in flags and flags[flags.index("--device")] == "--device"
    assert command[command.index("--device") + 1] == "cuda"
    for flag in flags:
        assert flag in help_text, flag
