"""Matmul FLOPs of T5 work counted from shapes and real token counts, and the measured matmul
peak of this device: utilisation = FLOPs / wall time / peak.

The peaks of the other libraries a provider runs on (onnxruntime, CTranslate2, torch's dynamic
int8 linear) are in bench/peaks.py.

Only matrix products are counted (2*m*n*k each), as torch.utils.flop_counter does: projections,
attention scores and mixing, feed-forward, LM head. Norms, softmax, the relative position bias
and embedding lookups are left out (well under 1% of the total at these shapes).

Two conventions:
- model FLOPs: what the work needs. Each instruction encoded once, cross-attention K/V once per
  instruction, each candidate decoded over its own tokens with causal self-attention counted
  exactly (position i attends i keys), the head on real target tokens only.
- executed FLOPs: what a provider's algorithm computes, e.g. the encoder again for every
  (instruction, candidate) pair, padding, dense n x n self-attention, the head on padding.

    python -m instructrec.bench.flops --model flan-t5-base --dtype bfloat16 --threads 2   # torch's peak
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Iterable

from instructrec.engine.flops import FlopCount, T5Shape, encoding_flops  # noqa: F401  (re-exported)

from .workloads import Encoding

PEAK_DTYPES = ("float32", "bfloat16")
PEAK_TOKENS = 2048  # GEMM rows: a batch of decoder tokens or instruction tokens


def model_flops(shape: T5Shape, work: Iterable[Encoding]) -> FlopCount:
    """What the work needs: each encoding once, causal self-attention, the head on real tokens."""
    total = FlopCount()
    for e in work:
        total = total + encoding_flops(shape, len(e.source), [len(t) for t in e.targets])
    return total


def per_pair_flops(shape: T5Shape, pairs: Iterable[tuple[int, int]]) -> FlopCount:
    """Each (source length, target length) pair run alone: the encoder repeated per pair, dense
    self-attention (a masked n x n product), the head on every decoder position."""
    total = FlopCount()
    for s, n in pairs:
        total = total + encoding_flops(shape, s, [n], causal=False)
    return total


def padded_batch_flops(shape: T5Shape, batches: Iterable[list[tuple[int, int]]]) -> FlopCount:
    """Batches of (source length, target length) pairs, each padded to its longest source and
    target, every row computed in full (as Hugging Face and Optimum run a padded batch)."""
    total = FlopCount()
    for batch in batches:
        if not batch:
            continue
        s = max(p[0] for p in batch)
        n = max(p[1] for p in batch)
        one = encoding_flops(shape, s, [n], causal=False)
        total = total + FlopCount(one.encoder * len(batch), one.cross_kv * len(batch), one.decoder * len(batch),
                                  one.head * len(batch))
    return total


def padding_scaled(needed: FlopCount, encoder_tokens: int, padded_encoder_tokens: int, decoder_tokens: int,
                   padded_decoder_tokens: int) -> FlopCount:
    """The engine's executed FLOPs, approximately: the model FLOPs with the encoder scaled by its
    padding and the decoder by its row padding (the head runs on real tokens only). Attention
    inside a packed row is dense over the row, which this leaves out (small next to the FFN)."""
    enc = padded_encoder_tokens / encoder_tokens if encoder_tokens else 1.0
    dec = padded_decoder_tokens / decoder_tokens if decoder_tokens else 1.0
    return FlopCount(needed.encoder * enc, needed.cross_kv * enc, needed.decoder * dec, needed.head)


# ---- the measured peak -------------------------------------------------------------------------


def gemm_shapes(shape: T5Shape, tokens: int = PEAK_TOKENS) -> list[tuple[int, int, int]]:
    """(m, k, n) products shaped like the model's: attention projection, FFN in and out, an LM-head chunk."""
    return [(tokens, shape.d_model, shape.inner), (tokens, shape.d_model, shape.d_ff),
            (tokens, shape.d_ff, shape.d_model), (tokens, shape.d_model, 4096)]


def best_rate(call, flops: float, seconds: float, sync=lambda: None, warmups: int = 3, min_calls: int = 3) -> float:
    """FLOP/s of the fastest of repeated `call()`s (`warmups` untimed calls, then at least
    `min_calls` timed ones and about `seconds` of them)."""
    for _ in range(warmups):
        call()
    sync()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return flops / min(times)


def matmul_peak(shape: T5Shape, dtype: str, threads: int, device: str = "cpu", seconds: float = 0.4) -> dict:
    """Best FLOP/s of torch.matmul over `gemm_shapes`, each timed for about `seconds` after a
    warm-up, at `threads` torch threads. The caller's thread count is restored afterwards."""
    import torch

    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {PEAK_DTYPES}")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best: dict = {"flops_per_s": 0.0}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in gemm_shapes(shape):
            g = torch.Generator().manual_seed(0)
            a = torch.randn(m, k, generator=g).to(dev, getattr(torch, dtype))
            b = torch.randn(k, n, generator=g).to(dev, getattr(torch, dtype))
            with torch.inference_mode():
                rate = best_rate(lambda: a @ b, 2 * m * k * n, seconds, sync)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "m": m, "k": k, "n": n}
    finally:
        torch.set_num_threads(previous)
    return {"dtype": dtype, "threads": threads, "device": device, **best}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Measured matmul peak of this device (GEMMs shaped like a model's).")
    from instructrec.engine.presets import SHAPES

    p.add_argument("--model", default="flan-t5-small", choices=sorted(SHAPES), help="a shape of engine/presets.py")
    p.add_argument("--dtype", default="float32", choices=PEAK_DTYPES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    result = matmul_peak(T5Shape.from_config(SHAPES[args.model]), args.dtype, args.threads, args.device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
