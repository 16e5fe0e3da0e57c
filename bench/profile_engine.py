"""Where the engine's time goes: one rerank-10 run under torch.profiler, operators grouped by
the part of the model they serve, and the projection / FFN matmuls split by weight, each with
its achieved GFLOP/s in place (to set against the measured peak of its dtype).

    python -m instructrec.bench.profile_engine --model random:flan-t5-base --dtype bfloat16 --requests 16 --threads 2

The same seeded requests and checkpoint as `instructrec bench` (bench/workloads.py, same --cache):
`--model` takes random:<shape>, a Hub id or a checkpoint folder. `--dtype int8` profiles the fp32
engine with its linear layers quantised (engine/quantize.py). Prints Markdown tables and a JSON
line with the raw figures. Profiling adds a little overhead per operator; the shares, not the
absolute times, are the figure.
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
    "aten::_scaled_dot_product_fused_attention_overrideable": "attention (SDPA)",
    "aten::gelu": "FFN activation",
    "aten::exp_": "LM head log-softmax",
    "aten::amax": "LM head log-softmax",
    "aten::sub_": "LM head log-softmax",
    "aten::clamp_": "LM head log-softmax",
    "aten::gather": "LM head log-softmax",
    "aten::logsumexp": "LM head log-softmax",
    "quantized::linear_dynamic": "matmuls (projections, FFN)",
}
_ELEMENTWISE = {"aten::mul", "aten::add", "aten::copy_", "aten::mean", "aten::rsqrt", "aten::sum", "aten::pow",
                "aten::to", "aten::_to_copy", "aten::masked_fill", "aten::where", "aten::embedding",
                "aten::index_select", "aten::index_add_", "aten::div_", "aten::zeros", "aten::fill_",
                "aten::add_", "aten::mul_", "aten::clone", "aten::contiguous", "aten::cat", "aten::eq",
                "aten::le", "aten::bitwise_and", "aten::masked_fill_", "aten::arange", "aten::ones"}


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


def _weight_name(k: int, n: int, cfg: dict) -> str:
    """Which linear layer a [M, k] x [k, n] product is, from its weight shape."""
    d, inner, ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated")
    names = {(d, 3 * inner): "self-attention q,k,v (fused)", (inner, d): "attention outputs (self and cross)",
             (d, 2 * inner): "cross-attention k,v (once per instruction)",
             (d, ff * (2 if gated else 1)): "FFN in" + (" (gate and linear fused)" if gated else ""),
             (ff, d): "FFN out"}
    # where inner == d_model (every Flan-T5) the cross-attention query has the outputs' shape
    names[(d, inner)] = "attention outputs and cross-attention q" if inner == d else "cross-attention q"
    return names.get((k, n), f"other [{k} x {n}]")


def profile(model: str, dtype: str, n_requests: int, threads: int, seed: int, cache: Path) -> dict:
    import torch

    from instructrec.engine import Reranker

    from .flops import T5Shape, model_flops
    from .workloads import make_requests, model_checkpoint, model_work, resolve_bench_model, workload_inputs

    checkpoint = model_checkpoint(resolve_bench_model(model), cache, seed)  # as `instructrec bench` caches it
    cfg = json.loads((checkpoint / "config.json").read_text())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reranker = Reranker.from_pretrained(checkpoint, dtype=dtype, seed=seed)
        reranker.rank(make_requests(8, 20, 10, seed=seed + 1))  # warm-up on other inputs
        inputs = workload_inputs("rerank-10", n_requests, seed, reranker.tokenizer)
        reranker.reset_stats()
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            reranker.rank(inputs.requests)
        wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    groups: dict[str, float] = {}
    weights: dict[str, list[float]] = {}  # name -> [ms, flops]
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = list(event.input_shapes or [])
        key = _group(event.key, shapes)
        ms = event.self_cpu_time_total / 1e3
        groups[key] = groups.get(key, 0.0) + ms
        if key == "matmuls (projections, FFN)" and event.key == "aten::mm" and len(shapes) >= 2 and shapes[0] \
                and shapes[1]:
            (m, k), n = shapes[0], shapes[1][-1]
            entry = weights.setdefault(_weight_name(k, n, cfg), [0.0, 0.0])
            entry[0] += ms
            entry[1] += 2.0 * m * k * n * event.count
    total_ms = sum(groups.values())
    flops = model_flops(T5Shape.from_config(cfg), model_work(inputs, reranker.tokenizer, seed)).total
    return {"model": model, "dtype": dtype, "threads": threads, "requests": n_requests,
            "candidates": inputs.n_candidates, "wall_s": round(wall, 3),
            "operator_ms": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "operator_total_ms": round(total_ms, 1), "model_gflop": round(flops / 1e9, 2),
            "matmul_by_weight": {k: {"ms": round(v[0], 1), "gflop": round(v[1] / 1e9, 2),
                                     "gflops": round(v[1] / 1e9 / (v[0] / 1e3), 1) if v[0] else None}
                                 for k, v in sorted(weights.items(), key=lambda kv: -kv[1][0])},
            "tokenize_s": round(reranker.timings["tokenize_s"], 3), "stats": reranker.stats.as_dict()}


def to_markdown(report: dict) -> str:
    total = report["operator_total_ms"]
    lines = [f"Engine rerank-10, {report['model']} {report['dtype']}, {report['requests']} requests "
             f"({report['candidates']} candidates), {report['threads']} thread(s): wall {report['wall_s']} s under "
             f"the profiler, {report['model_gflop']} GFLOP of model work "
             f"({report['model_gflop'] / report['wall_s']:.0f} GFLOP/s overall).", "",
             "| part | CPU ms | share |", "|---|---:|---:|"]
    for name, ms in report["operator_ms"].items():
        lines.append(f"| {name} | {ms:,.0f} | {ms / total:.1%} |")
    if report["matmul_by_weight"]:
        lines += ["", "| matmul (aten::mm by weight) | CPU ms | GFLOP | GFLOP/s in place |", "|---|---:|---:|---:|"]
        for name, w in report["matmul_by_weight"].items():
            lines.append(f"| {name} | {w['ms']:,.0f} | {w['gflop']:,.1f} | {w['gflops'] or 0:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.bench.profile_engine",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:flan-t5-base",
                        help="random:<shape>, a Hub id or a checkpoint folder (as `instructrec bench --models`)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"])
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
