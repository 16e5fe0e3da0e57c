"""`instructrec bench`: throughput, latency, memory, utilisation and ranking agreement of this
engine against its peers (see bench/harness.py and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    from instructrec.engine.presets import RANDOM_PREFIX, SHAPES

    from .harness import DEFAULT_CACHE, DEFAULT_MODELS
    from .providers import PROVIDERS
    from .workloads import WORKLOADS

    p = subparsers.add_parser(
        "bench", help="benchmark the engine against Hugging Face, Optimum and CTranslate2",
        description="Every provider on the same model, seeded inputs and thread count, each in its own "
                    "subprocess. Writes results.csv, results.md, results.png and results.json to --out.")
    p.add_argument("--workloads", type=_names, default=list(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--providers", type=_names, default=None,
                   help=f"comma-separated, from {','.join(PROVIDERS)} (default: every installed one)")
    p.add_argument("--models", type=_names, default=list(DEFAULT_MODELS),
                   help=f"comma-separated: {RANDOM_PREFIX}<shape> (random weights, fair for speed only; shapes: "
                        f"{', '.join(SHAPES)}), a Hub id (org/name) or a checkpoint folder. A bare shape name is "
                        f"refused, as everywhere: it could mean pretrained or random weights "
                        f"(default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--requests", type=int, default=64,
                   help="rerank-10 requests for the engine providers "
                        "(rerank-100 and pointwise: a tenth, latency: half)")
    p.add_argument("--peer-requests", type=int, default=6,
                   help="cap for the peers that run the encoder per pair: they score the first N of the same "
                        "requests, and agreement is computed on that shared prefix")
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime / CTranslate2 threads, all alike")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N: every provider runs there or is skipped with the reason "
                        "in the report (never run on the CPU instead); on a GPU the report adds peak GPU memory "
                        "and model-FLOP utilisation against the GPU's measured bf16 tensor-core peak")
    p.add_argument("--seed", type=int, default=0, help="inputs, weights and tournament groups")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per workload (other seeded inputs)")
    p.add_argument("--pairs-per-batch", type=int, default=40,
                   help="(instruction, candidate) pairs per batch for hf-batched, optimum-ort and ct2")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="checkpoints, exports and conversions, reused across runs")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .harness import BenchConfig, run_bench

    cfg = BenchConfig(workloads=args.workloads, providers=args.providers, models=args.models,
                      requests=args.requests, peer_requests=args.peer_requests, threads=args.threads,
                      seed=args.seed, warmup=args.warmup, pairs_per_batch=args.pairs_per_batch, out=args.out,
                      cache=args.cache, device=args.device)
    summary = run_bench(cfg)
    print((cfg.out / "results.md").read_text())
    failed = any(entry["status"] == "failed" for entry in summary["not_run"].values())
    return 0 if summary["records"] and not failed else 1
