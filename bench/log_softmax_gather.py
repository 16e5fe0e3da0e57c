"""Benchmark: chunked LM head + log_softmax_gather against the naive full log_softmax + gather.

    python -m instructrec.bench.log_softmax_gather            # Markdown table, N in {1024, 8192}
    python -m instructrec.bench.log_softmax_gather --sweep    # chunk_tokens sweep (the default's evidence)
    python -m instructrec.bench.log_softmax_gather --device cuda --sweep --sizes 16384   # the CUDA default's

Shapes are flan-t5-small's head: D=512, V=32128. Each configuration runs in its own subprocess so
that its peak RSS (ru_maxrss, which only ever grows) belongs to it alone; the figure reported is
that peak minus the RSS with only the inputs alive, i.e. the working memory of the method itself.
On CUDA the table adds the Triton kernel, and memory is torch's peak allocation above the inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from instructrec.kernels import default_chunk_tokens, lm_head_log_softmax_gather

D, V = 512, 32128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What a plain implementation does: the whole [N, V] fp32 log-prob tensor, then gather."""
    log_probs = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)  # [N, V]
    return log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]


def _rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(method: str, dtype: str, n: int, chunk: int | None, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(n, D, device=device).to(DTYPES[dtype])  # [N, D]
    weight = (torch.randn(V, D, device=device) * D ** -0.5).to(DTYPES[dtype])  # [V, D]
    targets = torch.randint(0, V, (n,), device=device)  # [N]
    if method == "naive":
        fn = lambda: naive(hidden, weight, targets)  # noqa: E731
    elif method in ("chunked-torch", "chunked-triton"):
        kwargs = {} if chunk is None else {"chunk_tokens": chunk}
        use_triton = method == "chunked-triton"
        fn = lambda: lm_head_log_softmax_gather(hidden, weight, targets, use_triton=use_triton, **kwargs)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}: naive, chunked-torch or chunked-triton")
    is_cuda = device.startswith("cuda")
    base_rss = _current_rss_bytes()
    with torch.inference_mode():
        fn()  # warm-up (allocator, oneDNN/AMX kernels, Triton compile)
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        best = best_cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
    if method != "naive" and chunk is None:
        chunk = default_chunk_tokens(device)
    result = {"method": method, "dtype": dtype, "n": n, "chunk": chunk, "device": device,
              "seconds": best, "tokens_per_s": n / best, "cpu_seconds": best_cpu,
              "peak_extra_bytes": _rss_bytes() - base_rss}
    if is_cuda:
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    return result


SWEEP_CHUNKS = {"cpu": (64, 128, 256, 512, 1024, 2048), "cuda": (128, 256, 512, 1024, 2048, 4096)}


def sweep(n: int, repeats: int, device: str = "cpu") -> str:
    """chunk_tokens sweep of the LM head (the torch path on CPU, the Triton kernel on CUDA), in one
    process with the chunk sizes interleaved round by round (best of `repeats`), so that load from
    other processes on a shared machine hits every size alike; CPU seconds (all threads) are
    reported beside wall seconds because they are far less disturbed by such load (on CUDA they
    are host time only). The tile is chunk * V * its bytes: bf16 on CPU plus an fp32 copy for the
    reduction, fp32 on CUDA (bf16 inputs, fp32 GEMM output)."""
    is_cuda = device.startswith("cuda")
    chunks = SWEEP_CHUNKS["cuda" if is_cuda else "cpu"]
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    lines = ["| device | dtype | chunk | tile (MiB) | tokens/s (wall) | ms/call (wall) | CPU ms/call |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dtype in DTYPES.values():
        torch.manual_seed(0)
        hidden = torch.randn(n, D).to(dtype).to(device)  # [N, D]
        weight = (torch.randn(V, D) * D ** -0.5).to(dtype).to(device)  # [V, D]
        targets = torch.randint(0, V, (n,)).to(device)  # [N]
        best = {c: float("inf") for c in chunks}
        best_cpu = {c: float("inf") for c in chunks}
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms up (and autotunes on CUDA)
                for chunk in chunks:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=chunk, check_targets=False)
                    sync()
                    best[chunk] = min(best[chunk], time.perf_counter() - t0)
                    best_cpu[chunk] = min(best_cpu[chunk], time.process_time() - c0)
        name = next(k for k, v in DTYPES.items() if v is dtype)
        for chunk in chunks:
            tile_bytes = 4 if is_cuda or dtype is torch.float32 else 2 + 4
            tile = chunk * V * tile_bytes / 2**20
            lines.append(f"| {device} | {name} | {chunk} | {tile:,.0f} | {n / best[chunk]:,.0f} "
                         f"| {best[chunk] * 1e3:,.2f} | {best_cpu[chunk] * 1e3:,.0f} |")
    return "\n".join(lines)


def _in_subprocess(method, dtype, n, chunk, device, repeats) -> dict:
    cmd = [sys.executable, "-m", "instructrec.bench.log_softmax_gather", "--one",
           json.dumps([method, dtype, n, chunk, device, repeats])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {method} {dtype} N={n} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    # CPU ms (all threads of the process) is shown because on a shared machine wall time mostly
    # measures the other jobs; on CUDA it is host time only.
    lines = ["| device | method | dtype | N | chunk | tokens/s | ms/call | CPU ms/call | peak extra memory (MiB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['method']} | {r['dtype']} | {r['n']} | {r['chunk'] or '-'} "
            f"| {r['tokens_per_s']:,.0f} | {r['seconds'] * 1e3:,.1f} | {r['cpu_seconds'] * 1e3:,.0f} "
            f"| {r['peak_extra_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help="sweep chunk_tokens of the torch path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="sweep: the device (default cpu); table: only this device (default: cpu, and cuda if present)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one))))
        return
    if args.sweep:
        print(sweep(max(args.sizes), args.repeats, args.device or "cpu"))
        return
    rows = []
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        methods = ["naive", "chunked-torch"] + (["chunked-triton"] if device == "cuda" else [])
        for dtype in DTYPES:
            for n in args.sizes:
                for method in methods:
                    rows.append(_in_subprocess(method, dtype, n, None, device, args.repeats))
                    print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(_table(rows))


if __name__ == "__main__":
    main()
