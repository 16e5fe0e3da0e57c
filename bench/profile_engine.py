"""Where the engine's time goes: one rerank-10 run under torch.profiler, operators grouped by
the part of the model they serve, next to the FLOPs of each part.

    python -m instructrec.bench.profile_engine --model flan-t5-base --dtype bfloat16 --requests 16 --threads 1

The same seeded requests and random-weight checkpoint as `instructrec bench` (bench/workloads.py).
Prints a Markdown table: per group, CPU milliseconds, share of the profiled operator time and the
achieved GFLOP/s where the group does matmul work, and a JSON line with the raw figures.
Profiling adds a little overhead per operator; the shares, not the absolute times, are the figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .harness import DEFAULT_CACHE

# Operator name -> group. Matmuls are split by what they compute through their input shapes below.
_GROUPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::_scaled_dot_product_attention_math": "attention (SDPA)",
    "aten::gelu": "FFN activation",
    "aten::exp_": "LM head log-softmax",
    "aten::amax": "LM head log-softmax",
    "aten::sub_": "LM head log-softmax",
    "aten::clamp_": "LM head log-softmax",
    "aten::gather": "LM head log-softmax",
}
_ELEMENTWISE = {"aten::mul", "aten::add", "aten::copy_", "aten::mean", "aten::rsqrt", "aten::sum", "aten::pow",
                "aten::to", "aten::_to_copy", "aten::masked_fill", "aten::where", "aten::embedding",
                "aten::index_select", "aten::index_add_", "aten::div_", "aten::zeros", "aten::fill_"}


def _group(name: str, shapes: list) -> str:
    if name in _GROUPS:
        return _GROUPS[name]
    if name == "aten::mm":
        if len(shapes) >= 2 and shapes[1] and shapes[1][-1] >= 32000:
            return "LM head matmul"
        return "matmuls (projections, FFN)"
    if name in _ELEMENTWISE:
        return "norms, residuals, casts, masks"
    return "other operators"


def profile(model: str, dtype: str, n_requests: int, threads: int, seed: int, cache: Path) -> dict:
    import torch

    from instructrec.engine import Reranker

    from .flops import T5Shape, model_flops
    from .workloads import MODEL_SHAPES, build_checkpoint, make_requests, workload_inputs, model_work

    torch.set_num_threads(threads)
    checkpoint = build_checkpoint(cache / model / "checkpoint", MODEL_SHAPES[model], seed)  # as `bench` caches it
    reranker = Reranker.from_pretrained(checkpoint, dtype=dtype, seed=seed)
    reranker.rank(make_requests(8, 20, 10, seed=seed + 1))  # warm-up on other inputs
    inputs = workload_inputs("rerank-10", n_requests, seed, reranker.tokenizer)
    reranker.reset_stats()
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        reranker.rank(inputs.requests)
    wall = time.perf_counter() - started
    groups: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        key = _group(event.key, list(event.input_shapes or []))
        groups[key] = groups.get(key, 0.0) + event.self_cpu_time_total / 1e3  # ms
    total_ms = sum(groups.values())
    flops = model_flops(T5Shape.from_config(MODEL_SHAPES[model]), model_work(inputs, reranker.tokenizer, seed)).total
    return {"model": model, "dtype": dtype, "threads": threads, "requests": n_requests,
            "wall_s": round(wall, 3), "operator_ms": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "operator_total_ms": round(total_ms, 1), "model_gflop": round(flops / 1e9, 2),
            "tokenize_s": round(reranker.timings["tokenize_s"], 3), "stats": reranker.stats.as_dict()}


def to_markdown(report: dict) -> str:
    total = report["operator_total_ms"]
    lines = [f"Engine rerank-10, {report['model']} {report['dtype']}, {report['requests']} requests, "
             f"{report['threads']} thread(s): wall {report['wall_s']} s under the profiler, "
             f"{report['model_gflop']} GFLOP of model work.", "",
             "| part | CPU ms | share |", "|---|---:|---:|"]
    for name, ms in report["operator_ms"].items():
        lines.append(f"| {name} | {ms:,.0f} | {ms / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.bench.profile_engine",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flan-t5-base")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the `instructrec bench` cache")
    args = parser.parse_args(argv)
    report = profile(args.model, args.dtype, args.requests, args.threads, args.seed, args.cache)
    print(to_markdown(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
