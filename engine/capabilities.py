"""What this machine's CPU runs natively, and the precision policy built on it.

One probe, cached per process, used by the engine (`dtype="auto"`), training (`--precision auto`)
and the benchmarks (which peaks to report). CPUs differ by two orders of magnitude in bf16:
- Xeon with AMX: bf16 matmuls ~7x fp32 (this project's first machine);
- AVX512-BF16 without AMX (AMD Zen 4): native bf16 dot products, about 2x fp32 at best;
- AVX2 only (AMD Zen 3): no bf16 instructions; torch emulates, 0.28 GFLOP/s against 103 for fp32.
So the policy is measured, not assumed: bf16 only where the CPU has bf16 instructions AND a short
matmul probe shows it faster than fp32 at the thread count in use.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuInfo", "cpu_info", "matmul_gflops", "cpu_bf16_is_faster", "auto_dtype_name"]

log = logging.getLogger(__name__)

# bf16 must beat fp32 by this factor to be chosen: below it the rounding (rankings agree with fp32
# only ~99%) is not worth a few percent.
BF16_MIN_SPEEDUP = 1.15
# Probe shape: a decoder-sized GEMM (rows x d_model @ d_model x d_ff of flan-t5-base); ~0.2 GFLOP,
# a few ms per call in fp32 on one core: long enough to time, short enough to run at every start.
_PROBE_M, _PROBE_K, _PROBE_N = 256, 768, 2048


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    isa: str  # torch's dispatch level: "AVX512", "AVX2", "DEFAULT", ...
    cores: int

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 multiply instructions: AMX tiles or AVX512-BF16 dot products."""
        return self.amx or "avx512_bf16" in self.flags

    @property
    def native_int8(self) -> bool:
        """int8 dot-product instructions (VNNI) that fbgemm / oneDNN / CTranslate2 int8 GEMMs use."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def features(self) -> list[str]:
        """The flags that decide precision, for reports."""
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
        return [f for f in wanted if f in self.flags]

    def summary(self) -> str:
        return f"{self.model} ({self.cores} cores; torch ISA {self.isa}; {' '.join(self.features()) or 'no SIMD flags'})"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = "unknown CPU", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    isa = "unknown"
    try:
        import torch

        isa = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):  # torch absent or older than 2.1
        pass
    return CpuInfo(model=model, flags=flags, isa=isa, cores=os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def matmul_gflops(dtype_name: str, threads: int, repeats: int = 5) -> float:
    """Measured GFLOP/s of torch.matmul on the probe shape in `dtype_name` ("float32" | "bfloat16")
    at `threads` intra-op threads (the best of `repeats` after one warm-up)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(_PROBE_M, _PROBE_K, generator=gen).to(dtype)
        b = torch.randn(_PROBE_K, _PROBE_N, generator=gen).to(dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * _PROBE_M * _PROBE_K * _PROBE_N / best / 1e9


def cpu_bf16_is_faster(threads: int | None = None) -> bool:
    """True where bf16 matmuls are native on this CPU and measured at least BF16_MIN_SPEEDUP x fp32.
    Without bf16 instructions nothing is measured (emulated bf16 would take seconds to time)."""
    info = cpu_info()
    if not info.native_bf16:
        return False
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    fp32, bf16 = matmul_gflops("float32", threads), matmul_gflops("bfloat16", threads)
    faster = bf16 >= BF16_MIN_SPEEDUP * fp32
    log.debug("CPU matmul probe (%s, %d threads): fp32 %.1f, bf16 %.1f GFLOP/s -> %s", info.model, threads,
              fp32, bf16, "bf16" if faster else "fp32")
    return faster


def auto_dtype_name(device_type: str, threads: int | None = None) -> str:
    """The precision `auto` means on a device: "bfloat16" on CUDA GPUs with bf16 and on CPUs where
    it is native and faster, else "float32". Never float16 (T5 activations overflow in fp16)."""
    if device_type == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_bf16_is_faster(threads) else "float32"
