"""The engine's precisions side by side in one process, interleaved: fp32, bf16, int8 (and what
`auto` resolves to), rerank-10 on the bench's seeded requests.

    python -m instructrec.bench.precisions --model random:flan-t5-base --requests 16 --rounds 5 --threads 1

Each round ranks the same requests once per precision, in turn, so a load that comes and goes on a
shared machine falls on every precision alike; the figure is the median round's candidates/s
(model time: tokenization excluded). Rankings of every precision are compared with fp32's: top-1
agreement and Kendall tau over all requests. `instructrec bench` measures each provider in a
subprocess of its own, one after the other; this is the quicker, noise-robust comparison of
precisions alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from .agreement import ranking_agreement
from .harness import DEFAULT_CACHE

log = logging.getLogger(__name__)
PRECISIONS = ("float32", "bfloat16", "int8")


def compare(model: str, n_requests: int, rounds: int, threads: int, seed: int, cache: Path) -> dict:
    import torch

    from instructrec.engine import Reranker
    from instructrec.engine.capabilities import auto_dtype_name, cpu_info
    from .workloads import make_requests, model_checkpoint, resolve_bench_model, workload_inputs

    checkpoint = model_checkpoint(resolve_bench_model(model), cache, seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engines = {}
        for name in PRECISIONS:
            engines[name] = Reranker.from_pretrained(checkpoint, dtype=name, seed=seed)
        inputs = workload_inputs("rerank-10", n_requests, seed, engines["float32"].tokenizer)
        warm = make_requests(2, 20, 10, seed=seed + 1)
        rates: dict[str, list[float]] = {name: [] for name in PRECISIONS}
        rankings: dict[str, list] = {}
        for name, engine in engines.items():
            engine.rank(warm)
        for _ in range(rounds):
            for name, engine in engines.items():
                engine.reset_stats()
                t0 = time.perf_counter()
                results = engine.rank(inputs.requests)
                model_s = time.perf_counter() - t0 - engine.timings["tokenize_s"]
                rates[name].append(inputs.n_candidates / model_s)
                rankings[name] = [[int(i) for i in r.ranked_ids] for r in results]
        auto = auto_dtype_name("cpu", threads)
    finally:
        torch.set_num_threads(previous)
    out = {"model": model, "threads": threads, "requests": n_requests, "rounds": rounds,
           "cpu": cpu_info().summary(), "auto_resolves_to": auto, "precisions": {}}
    for name in PRECISIONS:
        agreement = ranking_agreement(rankings[name], rankings["float32"])
        out["precisions"][name] = {"candidates_per_s_median": float(np.median(rates[name])),
                                   "candidates_per_s_rounds": [round(r, 2) for r in rates[name]],
                                   "top1_vs_fp32": agreement["top1_agreement"],
                                   "kendall_tau_vs_fp32": agreement["kendall_tau"]}
    return out


def to_markdown(report: dict) -> str:
    fp32 = report["precisions"]["float32"]["candidates_per_s_median"]
    lines = [f"rerank-10, {report['model']}, {report['requests']} requests x {report['rounds']} interleaved rounds, "
             f"{report['threads']} thread(s); {report['cpu']}; auto resolves to {report['auto_resolves_to']}.", "",
             "| precision | candidates/s (median round) | x fp32 | rounds | top-1 vs fp32 | tau vs fp32 |",
             "|---|---:|---:|---|---:|---:|"]
    for name, p in report["precisions"].items():
        lines.append(f"| {name} | {p['candidates_per_s_median']:.1f} | {p['candidates_per_s_median'] / fp32:.2f} "
                     f"| {', '.join(f'{r:.1f}' for r in p['candidates_per_s_rounds'])} | {p['top1_vs_fp32']:.3f} "
                     f"| {p['kendall_tau_vs_fp32']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.bench.precisions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:flan-t5-base",
                        help="random:<shape>, a Hub id or a checkpoint folder (as `instructrec bench --models`)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the `instructrec bench` cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = compare(args.model, args.requests, args.rounds, args.threads, args.seed, args.cache)
    print(to_markdown(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
