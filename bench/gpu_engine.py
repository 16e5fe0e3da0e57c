"""The engine step of `make gpu-check` (bench/gpu_check.py): this engine in bf16 on the GPU with
random flan-t5-base and flan-t5-xl shapes built on the device, rerank-10 / rerank-100 / latency,
candidates/s, p50/p95, peak GPU memory and model-FLOP utilisation against the measured bf16
matmul peak. Runs inside the checking environment (instructrec installed), unlike gpu_check's
setup, which runs under a bare python3:

    python -m instructrec.bench.gpu_engine --tokenizer DIR --json engine.json [--models flan-t5-base]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instructrec.bench.gpu_check import (ENGINE_BATCH_TOKEN_FACTORS, ENGINE_MODELS, ENGINE_REQUESTS,
                                         ENGINE_WORKLOADS)


def random_engine_model(shape_name: str, device, dtype):
    """The engine's T5 of a Flan-T5 shape with random weights, built on the GPU (no checkpoint
    on disk: flan-t5-xl's would be 11 GB): norms 1, other weights N(0, 1/fan_in)."""
    import torch

    from instructrec.engine.model import RMSNorm, T5, T5Config
    from instructrec.engine.presets import shape_config

    cfg = T5Config.from_hf(shape_config(shape_name))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = T5(cfg)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
    return model.eval().requires_grad_(False)


def bf16_peak(shape_name: str, device: str = "cuda") -> float:
    """Measured bf16 matmul FLOP/s on `device`, utilisation's denominator: on a GPU the peak of
    `instructrec bench` (bench/peaks.py: GEMMs shaped like the model's and one large square,
    timed with CUDA events); elsewhere the best of the model-shaped GEMMs."""
    import torch

    from instructrec.bench.flops import T5Shape, matmul_peak
    from instructrec.bench.peaks import cuda_bf16_peak
    from instructrec.engine.presets import shape_config

    shape = T5Shape.from_config(shape_config(shape_name))
    if torch.device(device).type == "cuda":
        rate, where = cuda_bf16_peak(shape, device)
        if rate is None:
            raise RuntimeError(f"no bf16 peak on {device}: {where['note']}")
        return rate
    return matmul_peak(shape, "bfloat16", 1, device)["flops_per_s"]


def engine_measure(tok: Path, models: list[str], device: str = "cuda", requests: dict | None = None,
                   batch_tokens: tuple | None = None, seed: int = 0) -> list[dict]:
    """This engine in bf16 on `device`, one row per (model, batch tokens, workload): rerank-10 at
    every batch size, rerank-100 and latency at the last. batch_tokens: None in it is the engine's
    default; None for the whole tuple: ENGINE_BATCH_TOKEN_FACTORS times the default, then the
    default itself. `requests`: rerank-10 requests per model (default ENGINE_REQUESTS; rerank-100
    takes a tenth, latency a quarter)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from instructrec.bench.flops import T5Shape, model_flops
    from instructrec.bench.workloads import model_work, workload_inputs
    from instructrec.engine import Reranker
    from instructrec.engine.backend import TorchBackend
    from instructrec.engine.presets import shape_config
    from instructrec.engine.runner import default_batch_tokens

    tokenizer = AutoTokenizer.from_pretrained(tok)
    dev = torch.device(device)
    if batch_tokens is None:
        batch_tokens = (*(int(default_batch_tokens(dev) * f) for f in ENGINE_BATCH_TOKEN_FACTORS), None)
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    requests = requests or ENGINE_REQUESTS
    rows = []
    for model_name in models:
        peak = bf16_peak(model_name, device)
        model = random_engine_model(model_name, dev, torch.bfloat16)
        shape = T5Shape.from_config(shape_config(model_name))
        for tokens in batch_tokens:
            rr = Reranker(TorchBackend(model, dev), tokenizer,
                          **({} if tokens is None else {"batch_tokens": tokens}))
            rr.rank(workload_inputs("rerank-10", 8, seed + 1, tokenizer).requests)  # warm-up, Triton autotune
            for workload in ENGINE_WORKLOADS:
                if workload != "rerank-10" and tokens != batch_tokens[-1]:
                    continue  # rerank-100 and latency once per model, at the largest batch
                n = max(1, requests[model_name] // {"rerank-10": 1, "rerank-100": 10, "latency": 4}[workload])
                inputs = workload_inputs(workload, n, seed, tokenizer)
                sync()
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(dev)
                rr.reset_stats()
                latencies = []
                t0 = time.perf_counter()
                if workload == "latency":
                    for request in inputs.requests:
                        start = time.perf_counter()
                        rr.rank([request])  # returns after the scores reached the host
                        latencies.append(time.perf_counter() - start)
                else:
                    rr.rank(inputs.requests)
                wall = time.perf_counter() - t0
                needed = model_flops(shape, model_work(inputs, tokenizer, seed))
                row = {"model": model_name, "workload": workload, "dtype": "bfloat16", "device": device,
                       "batch_tokens": rr.batch_tokens, "requests": n, "candidates": inputs.n_candidates,
                       "wall_s": round(wall, 3), "candidates_per_s": round(inputs.n_candidates / wall, 1),
                       "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if on_gpu else None,
                       "mfu": round(needed.total / wall / peak, 4), "bf16_peak_tflops": round(peak / 1e12, 3),
                       "decoder_padding": round(rr.stats.decoder_padding_fraction, 3)}
                if latencies:
                    row["p50_ms"] = round(float(np.percentile(latencies, 50)) * 1e3, 2)
                    row["p95_ms"] = round(float(np.percentile(latencies, 95)) * 1e3, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del rr
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instructrec.bench.gpu_engine")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--models", default=",".join(ENGINE_MODELS))
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    tok = Path(a.tokenizer)
    rows = engine_measure(tok, [m for m in a.models.split(",") if m])
    a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
