"""The matmul peak of each kernel family a provider runs on, measured with that family's own
kernels, and the rules that decide which utilisation a report may print.

1. A provider's utilisation is measured against the peak of the kernels it actually runs (its
   `ProviderSpec.peak_kernel`):
   - `torch:float32`, `torch:bfloat16`: torch.matmul (MKL / oneDNN): the torch engine, Hugging Face;
   - `torch:int8-dynamic`: torch's dynamically quantised int8 linear (fbgemm / oneDNN, fp32 in and
     out, the activation quantisation included): engine-torch-int8;
   - `onnxruntime:float32`: a one-MatMul ONNX graph with its weight as an initializer (MLAS, the
     weight prepacked as in a real graph): engine-onnx-fp32, optimum-ort;
   - `ctranslate2:float32`, `ctranslate2:int8`: CTranslate2 has no GEMM entry point of its own, so
     its peak is an encoder-bound run of the same converted model: `score_batch` on long sources
     (PEAK_CT2_TOKENS) with one-token targets, its executed FLOPs over the fastest call. That rate
     includes CTranslate2's attention, norms and copies, so it is a lower bound of its GEMM peak;
     the GEMM backend CTranslate2 picked (its own log: oneDNN on AMD, MKL on Intel) is recorded.
   Each runs on GEMMs shaped like the model's (flops.gemm_shapes) at the run's thread count.
   On a GPU (`--device cuda`) every provider is read against one peak, `cuda:bfloat16`: the
   GPU's bf16 tensor-core matmul rate, measured on the device (torch.matmul, cuBLAS), so that
   the figure is model-FLOP utilisation (MFU) as usually reported, whatever precision a provider
   computes in (an fp32 provider's MFU is low by construction).
2. A peak is measured, and a utilisation printed, only where the CPU runs that dtype natively:
   bf16 with AVX512-BF16 or AMX, int8 with VNNI (`instructrec.engine.capabilities.cpu_info()`);
   fp32 everywhere. Elsewhere the report says "n/a (no native <dtype> on this CPU)".
3. No utilisation above 100% is printed: a figure above it means the peak under-measured what
   those kernels can do. The report says "n/a (peak not measurable)" and a WARNING names the
   provider, the peak and the figure it would have printed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .flops import T5Shape, best_rate, gemm_shapes, matmul_peak, per_pair_flops

log = logging.getLogger(__name__)

PEAK_CT2_TOKENS = 256  # source tokens per CT2 peak sequence: about a rerank-10 instruction (~230)
PEAK_CT2_BATCH = 2  # sequences per call: 512 GEMM rows
NOT_MEASURABLE = "n/a (peak not measurable)"
# The GPU peak: GEMMs shaped like the model's with 8,192 rows (a GPU batch of tokens) and one
# 8,192^3 square product (1.1 TFLOP, ~1.5 ms on an H100-class GPU); each timed over
# GPU_PEAK_REPEATS back-to-back products between two CUDA events, best of GPU_PEAK_TRIALS. No
# host synchronisation between the products: a sync per product would count its ~10 us latency
# against a 2048 x 2048 x 5120 GEMM of ~60 us.
GPU_PEAK_TOKENS = 8192
GPU_PEAK_SQUARE = 8192
GPU_PEAK_REPEATS, GPU_PEAK_TRIALS = 20, 5


@dataclass(frozen=True)
class PeakKernel:
    name: str
    library: str  # torch | onnxruntime | ctranslate2
    dtype: str  # float32 | bfloat16 | int8
    how: str  # what is timed, for the report


KERNELS: dict[str, PeakKernel] = {k.name: k for k in (
    PeakKernel("torch:float32", "torch", "float32", "torch.matmul"),
    PeakKernel("torch:bfloat16", "torch", "bfloat16", "torch.matmul"),
    PeakKernel("torch:int8-dynamic", "torch", "int8",
               "torch's dynamic int8 linear, fp32 in and out, activation quantisation included"),
    PeakKernel("onnxruntime:float32", "onnxruntime", "float32", "onnxruntime MatMul, weight as initializer"),
    PeakKernel("ctranslate2:float32", "ctranslate2", "float32",
               f"CTranslate2 score_batch, {PEAK_CT2_BATCH} x {PEAK_CT2_TOKENS}-token sources, 1-token targets "
               "(encoder-bound; a lower bound of its GEMM peak)"),
    PeakKernel("ctranslate2:int8", "ctranslate2", "int8",
               f"CTranslate2 score_batch, {PEAK_CT2_BATCH} x {PEAK_CT2_TOKENS}-token sources, 1-token targets "
               "(encoder-bound; a lower bound of its GEMM peak)"),
    PeakKernel("cuda:bfloat16", "torch-cuda", "bfloat16",
               f"torch.matmul bf16 on the GPU (tensor cores), CUDA-event timed: best of GEMMs shaped like the "
               f"model's at {GPU_PEAK_TOKENS:,} rows and a {GPU_PEAK_SQUARE:,}^3 square"),
)}


def not_native_reason(kernel: str, cpu) -> str | None:
    """Why `kernel`'s dtype has no peak on `cpu` (a CpuInfo), or None when the CPU runs it natively
    (a GPU kernel: None; its own measurement says when the GPU lacks bf16)."""
    if KERNELS[kernel].library == "torch-cuda":
        return None
    dtype = KERNELS[kernel].dtype
    if dtype == "bfloat16" and not cpu.native_bf16:
        return "n/a (no native bfloat16 on this CPU: no AVX512-BF16, no AMX)"
    if dtype == "int8" and not cpu.native_int8:
        return "n/a (no native int8 on this CPU: no VNNI)"
    return None


def plan_peaks(kernels: set[str], cpu) -> tuple[list[str], dict[str, dict]]:
    """(kernels to measure, entries already decided): a kernel whose dtype the CPU does not run
    natively gets an entry with no figure and the reason."""
    measure, decided = [], {}
    for name in sorted(kernels):
        reason = not_native_reason(name, cpu)
        if reason:
            decided[name] = {"kernel": name, "flops_per_s": None, "note": reason, "how": KERNELS[name].how}
        else:
            measure.append(name)
    return measure, decided


def measure_peak(kernel: str, shape: T5Shape, threads: int, seconds: float, ct2_dirs: dict[str, str],
                 device: str = "cpu") -> dict:
    """One kernel's peak: {"kernel", "flops_per_s", "how", ...details}. `ct2_dirs`: dtype -> the
    converted CTranslate2 model folder (the CT2 kernels need the model itself). `device`: the GPU
    of a torch-cuda kernel."""
    spec = KERNELS[kernel]
    if spec.library == "torch-cuda":
        rate, detail = cuda_bf16_peak(shape, device)
        note = None if rate else detail.pop("note")
        return {"kernel": kernel, "flops_per_s": rate, "note": note, "how": spec.how, "device": device, **detail}
    if spec.library == "torch" and spec.dtype != "int8":
        result = matmul_peak(shape, spec.dtype, threads, seconds=seconds)
        detail = {"m": result["m"], "k": result["k"], "n": result["n"]}
        rate = result["flops_per_s"]
    elif spec.library == "torch":
        rate, detail = _torch_int8_peak(shape, threads, seconds)
    elif spec.library == "onnxruntime":
        rate, detail = _onnxruntime_peak(shape, threads, seconds)
    else:
        # the backend lines come from the same folder for every CT2 kernel (logged once per process)
        rate, detail = _ct2_peak(Path(ct2_dirs[spec.dtype]), spec.dtype, shape, threads, min(ct2_dirs.values()))
    return {"kernel": kernel, "flops_per_s": rate, "note": None, "how": spec.how, "threads": threads, **detail}


def gpu_facts(device: str) -> dict:
    """The GPU a figure was measured on: name, compute capability, memory, torch's CUDA version."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2 ** 30, "cuda": torch.version.cuda, "device": device}


def cuda_bf16_peak(shape: T5Shape, device: str, repeats: int = GPU_PEAK_REPEATS,
                   trials: int = GPU_PEAK_TRIALS) -> tuple[float | None, dict]:
    """(FLOP/s, where) of the best bf16 torch.matmul on the GPU `device` over GEMMs shaped like the
    model's at GPU_PEAK_TOKENS rows and one GPU_PEAK_SQUARE cube; (None, {"note": why}) on a GPU
    without bf16. Timed with CUDA events around `repeats` products queued back to back."""
    import torch

    dev = torch.device(device)
    facts = {"gpu": gpu_facts(device)}
    if not torch.cuda.is_bf16_supported():
        return None, {**facts, "note": f"n/a (no bfloat16 on {facts['gpu']['name']})"}
    best, where = 0.0, {}
    gemms = gemm_shapes(shape, GPU_PEAK_TOKENS) + [(GPU_PEAK_SQUARE,) * 3]
    with torch.cuda.device(dev), torch.inference_mode():
        for m, k, n in gemms:
            generator = torch.Generator(device=dev).manual_seed(0)
            a = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=generator)
            b = torch.randn(k, n, device=dev, dtype=torch.bfloat16, generator=generator)
            c = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            for _ in range(3):  # cuBLAS heuristics and workspace
                torch.matmul(a, b, out=c)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            seconds = float("inf")
            for _ in range(trials):
                start.record()
                for _ in range(repeats):
                    torch.matmul(a, b, out=c)
                end.record()
                end.synchronize()
                seconds = min(seconds, start.elapsed_time(end) / 1e3 / repeats)  # elapsed_time: ms
            rate = 2 * m * k * n / seconds
            if rate > best:
                best, where = rate, {"m": m, "k": k, "n": n}
            del a, b, c
        torch.cuda.empty_cache()
    return best, {**facts, **where}


def _best_over_shapes(shape: T5Shape, make_call, seconds: float) -> tuple[float, dict]:
    best, where = 0.0, {}
    for m, k, n in gemm_shapes(shape):
        rate = best_rate(make_call(m, k, n), 2 * m * k * n, seconds)
        if rate > best:
            best, where = rate, {"m": m, "k": k, "n": n}
    return best, where


def _torch_int8_peak(shape: T5Shape, threads: int, seconds: float) -> tuple[float, dict]:
    import torch
    from torch import nn

    from instructrec.engine.quantize import quantize_dynamic_int8

    def make_call(m: int, k: int, n: int):
        g = torch.Generator().manual_seed(0)
        linear = quantize_dynamic_int8(nn.Sequential(nn.Linear(k, n, bias=False)))
        x = torch.randn(m, k, generator=g)

        def call():
            with torch.inference_mode():
                linear(x)
        return call

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _best_over_shapes(shape, make_call, seconds)
    finally:
        torch.set_num_threads(previous)


def _onnxruntime_peak(shape: T5Shape, threads: int, seconds: float) -> tuple[float, dict]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def make_call(m: int, k: int, n: int):
        rng = np.random.default_rng(0)
        weight = rng.standard_normal((k, n), dtype=np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "peak",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                                  initializer=[numpy_helper.from_array(weight, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9  # onnxruntime >= 1.15 reads it
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        a = rng.standard_normal((m, k), dtype=np.float32)
        return lambda: session.run(None, {"a": a})

    return _best_over_shapes(shape, make_call, seconds)


def _ct2_peak(model_dir: Path, dtype: str, shape: T5Shape, threads: int, probe_dir: str) -> tuple[float, dict]:
    import ctranslate2
    import numpy as np

    backend = list(_ct2_cpu_backend(probe_dir))
    with _stderr_lines() as lines:
        ctranslate2.set_log_level(logging.INFO)  # its INFO line at load names the compute type it selected
        try:
            translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=dtype, inter_threads=1,
                                                intra_threads=threads)
        finally:
            ctranslate2.set_log_level(logging.WARNING)
    backend += [_ct2_info(line) for line in lines if "compute type" in line]
    vocabulary = json.loads((model_dir / "shared_vocabulary.json").read_text())
    rng = np.random.default_rng(0)
    words = vocabulary[100:]  # past the special and single-character pieces
    sources = [[words[i] for i in rng.integers(0, len(words), PEAK_CT2_TOKENS - 1)] + ["</s>"]
               for _ in range(PEAK_CT2_BATCH)]
    targets = [[words[0]] for _ in range(PEAK_CT2_BATCH)]
    # executed work: each source encoded, the decoder over [start, token] (2 positions), head on both
    flops = per_pair_flops(shape, [(PEAK_CT2_TOKENS, 2)] * PEAK_CT2_BATCH).total
    # one warm-up and two timed calls: a call is ~1 s on flan-t5-base fp32, 2 threads
    rate = best_rate(lambda: translator.score_batch(sources, targets, max_batch_size=PEAK_CT2_BATCH), flops,
                     seconds=0.0, warmups=1, min_calls=2)
    return rate, {"ct2_backend": "; ".join(backend), "tokens": PEAK_CT2_TOKENS, "batch": PEAK_CT2_BATCH}


def _ct2_info(line: str) -> str:
    return re.sub(r"^.*\[info\]\s*-?\s*", "", line)


@functools.lru_cache(maxsize=1)
def _ct2_cpu_backend(model_dir: str) -> tuple[str, ...]:
    """CTranslate2's CPU and GEMM-backend lines (ISA, MKL or not, SGEMM / GEMM_S8 backend). It logs
    them once per process, when it first loads a model: the first call here must come before any
    other CTranslate2 load in the process to see them (the bench's peak subprocess does)."""
    import ctranslate2

    with _stderr_lines() as lines:
        ctranslate2.set_log_level(logging.INFO)
        try:
            ctranslate2.Translator(model_dir, device="cpu", compute_type="float32", intra_threads=1)
        finally:
            ctranslate2.set_log_level(logging.WARNING)
    return tuple(_ct2_info(line) for line in lines if re.search(r"backend|Selected ISA|Intel MKL", line))


@contextlib.contextmanager
def _stderr_lines():
    """The lines written to file descriptor 2 inside the block (C++ libraries log there)."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines += capture.read().splitlines()


def utilisation(model_flops: float, executed_flops: float, model_s: float, peak: dict | None,
                provider: str) -> tuple[dict[str, float], str | None]:
    """(figures, note) of one run against its kernel's peak entry. No peak entry or no measured
    figure: no utilisation, the entry's reason. Above 100%: no utilisation either, the note
    NOT_MEASURABLE and a WARNING naming what would have been printed."""
    if peak is None:
        return {}, "n/a (no peak measured for its kernels)"
    rate = peak.get("flops_per_s")
    if not rate:
        return {}, peak.get("note") or "n/a (no peak measured for its kernels)"
    figures = {"matmul_peak_gflops": rate / 1e9}
    by_model = model_flops / model_s / rate
    by_executed = executed_flops / model_s / rate
    if max(by_model, by_executed) > 1.0:
        log.warning("%s: utilisation would be %.0f%% (model FLOPs) / %.0f%% (executed FLOPs) of the %s peak "
                    "(%.1f GFLOP/s, %s): the provider outran that peak, so the peak is wrong for it; "
                    "reported as %s", provider, 100 * by_model, 100 * by_executed, peak["kernel"], rate / 1e9,
                    peak.get("how", ""), NOT_MEASURABLE)
        return figures, NOT_MEASURABLE
    figures.update(utilisation_model=by_model, utilisation_executed=by_executed)
    return figures, None
