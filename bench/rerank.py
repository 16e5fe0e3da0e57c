"""Rerank-10 throughput: our engine (fp32, bf16) against Hugging Face transformers batched scoring
with the encoder repeated per candidate, on the same model, inputs, machine and thread count.

    python -m instructrec.bench.rerank --requests 256 --threads 2

Model: flan-t5-small shape with random weights and the real tokenizer (../shared/assets): fair
for speed, never for quality. Requests: a history of 20 generated titles formatted through the
engine's default template, 10 candidate titles each. Tokenization is timed apart; warm-up
excluded. Prints one JSON object with candidates/s and the bf16 top-1 agreement against fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .workloads import MODEL_SHAPES, make_requests, make_title  # noqa: F401  (make_title: rerank_memory.py)
from .workloads import build_checkpoint as _build_checkpoint

log = logging.getLogger(__name__)

# The inputs and the checkpoint are the harness's (bench/workloads.py); this script stays as the
# quick engine-vs-HF check, `instructrec bench` is the full comparison.
FLAN_T5_SMALL = MODEL_SHAPES["flan-t5-small"]


def build_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """flan-t5-small shape, random weights, the real tokenizer (see workloads.build_checkpoint)."""
    return _build_checkpoint(out_dir, FLAN_T5_SMALL, seed)


def bench_engine(path: Path, requests, dtype: str, warmup: int, **options):
    from instructrec.engine import Reranker

    rr = Reranker.from_pretrained(path, dtype=dtype, **options)
    rr.rank(requests[:warmup])
    rr.reset_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    results = rr.rank(requests)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(r.candidates) for r in requests)
    tok = rr.timings["tokenize_s"]
    s = rr.stats
    return results, {
        # cpu_s: this process's CPU time, a fairer comparison than wall time when other jobs
        # share the cores (with --threads 1 it is the compute time).
        "dtype": dtype, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tokenize_s": round(tok, 3),
        "candidates_per_cpu_s": round(n / cpu, 1),
        "candidates_per_s": round(n / wall, 1), "candidates_per_s_model": round(n / (wall - tok), 1),
        "encoder_passes": s.encoder_passes, "batches": s.batches,
        "decoder_padding": round(s.decoder_padding_fraction, 3),
        "encoder_padding": round(1 - s.encoder_tokens / s.padded_encoder_tokens, 3),
    }


def bench_hf(path: Path, requests, dtype: torch.dtype, warmup: int, pairs_per_batch: int):
    """Hugging Face batched scoring as a user would write it: every (instruction, candidate) pair
    a row, the encoder run per pair, full [rows, n, V] logits, log_softmax + gather."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from instructrec.engine.formatting import build_instruction

    tok = AutoTokenizer.from_pretrained(path)
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    t0 = time.perf_counter()
    pairs = [(build_instruction(history=r.history, tokenizer=tok), c) for r in requests for c in r.candidates]
    batches = []
    for i in range(0, len(pairs), pairs_per_batch):
        chunk = pairs[i:i + pairs_per_batch]
        enc = tok([p[0] for p in chunk], return_tensors="pt", padding=True)
        labels = tok(text_target=[p[1] for p in chunk], return_tensors="pt", padding=True).input_ids
        labels[labels == tok.pad_token_id] = -100
        batches.append((enc, labels))
    tokenize = time.perf_counter() - t0

    def run(bs):
        out = []
        with torch.inference_mode():
            for enc, labels in bs:
                logits = model(**enc, labels=labels).logits  # [rows, n, V]
                lp = torch.log_softmax(logits.float(), -1)
                picked = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                out.append((picked * (labels != -100)).sum(-1).double())
        return torch.cat(out).numpy() if out else np.zeros(0)

    run(batches[:max(1, warmup * 10 // pairs_per_batch)])
    t0, c0 = time.perf_counter(), time.process_time()
    scores = run(batches)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return scores, {"dtype": str(dtype).replace("torch.", ""), "wall_s_model": round(wall, 3),
                    "cpu_s_model": round(cpu, 3), "candidates_per_cpu_s_model": round(len(pairs) / cpu, 1),
                    "tokenize_s": round(tokenize, 3), "candidates_per_s_model": round(len(pairs) / wall, 1),
                    "pairs_per_batch": pairs_per_batch}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--row-tokens", type=int, default=None)
    p.add_argument("--hf-pairs-per-batch", type=int, default=80)
    p.add_argument("--hf-bf16", action="store_true", help="also time Hugging Face in bf16")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "instructrec-bench-flan-t5-small")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = build_checkpoint(args.model_dir)
    requests = make_requests(args.requests, args.history, args.candidates)
    options = {k: v for k, v in (("batch_tokens", args.batch_tokens), ("row_tokens", args.row_tokens)) if v}
    report: dict = {"threads": args.threads, "requests": args.requests, "candidates": args.candidates,
                    "history": args.history}
    r32, report["engine_fp32"] = bench_engine(path, requests, "float32", args.warmup, **options)
    r16, report["engine_bf16"] = bench_engine(path, requests, "bfloat16", args.warmup, **options)
    report["bf16_top1_agreement"] = float(np.mean([a.ranked_ids[0] == b.ranked_ids[0] for a, b in zip(r32, r16)]))
    if not args.skip_hf:
        hf_scores, report["hf_fp32"] = bench_hf(path, requests, torch.float32, args.warmup, args.hf_pairs_per_batch)
        ours = np.concatenate([np.array(r.scores)[np.argsort(np.array(r.ranked_ids, dtype=int))] for r in r32])
        report["hf_fp32_max_abs_diff"] = float(np.abs(ours - hf_scores).max())
        report["speedup_fp32_vs_hf_fp32"] = round(
            report["engine_fp32"]["candidates_per_s_model"] / report["hf_fp32"]["candidates_per_s_model"], 2)
        report["speedup_bf16_vs_hf_fp32"] = round(
            report["engine_bf16"]["candidates_per_s_model"] / report["hf_fp32"]["candidates_per_s_model"], 2)
        report["speedup_fp32_vs_hf_fp32_cpu_time"] = round(
            report["engine_fp32"]["candidates_per_cpu_s"] / report["hf_fp32"]["candidates_per_cpu_s_model"], 2)
        if args.hf_bf16:
            _, report["hf_bf16"] = bench_hf(path, requests, torch.bfloat16, args.warmup, args.hf_pairs_per_batch)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
