"""Rerank-10 on this CPU: the engine's onnx backend vs its torch backend (fp32, bf16) vs Optimum's
stock ORTModelForSeq2SeqLM used the obvious way, same model, requests, machine and threads.

    python -m instructrec.bench.onnx_rerank --requests 128 --threads 2

Model: flan-t5-small shape, random weights, the real tokenizer (bench.rerank's checkpoint):
fair for speed, never for quality. Requests: a history of 20 generated titles through the
engine's default template, 10 candidates each. Exports: ours with `export_model` (4 graphs),
Optimum's stock one with `main_export(task="text2text-generation")` from the same checkpoint.
The stock peer repeats the instruction per candidate (10 pairs per request in one batch), takes
full logits [10, n, 32128] and gathers log_softmax at the labels.
Each provider runs in its own subprocess, so peak memory (ru_maxrss) is its own: model load,
sessions and the run. Warm-up excluded; tokenization included for every provider.
Prints a Markdown table (and --json FILE for the numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROVIDERS = ("onnx-fp32", "torch-fp32", "torch-bf16", "optimum-ort-fp32")


def _requests(args):
    from .rerank import make_requests

    return make_requests(args.requests, args.history, args.candidates)


def _engine(args, path: Path, backend: str, dtype: str) -> tuple[list[list[float]], float, dict]:
    import torch

    from instructrec.engine import Reranker

    torch.set_num_threads(args.threads)
    options = {"threads": args.threads} if backend == "onnx" else {}
    rr = Reranker.from_pretrained(path, backend=backend, dtype=dtype, **options)
    requests = _requests(args)
    rr.rank(requests[:args.warmup])
    rr.reset_stats()
    t0 = time.perf_counter()
    results = rr.rank(requests)
    wall = time.perf_counter() - t0
    # scores in candidate order (ranked_ids are positions "0".."9")
    scores = [list(np.array(r.scores)[np.argsort(np.array(r.ranked_ids, dtype=int))]) for r in results]
    return scores, wall, {"encoder_passes": rr.stats.encoder_passes, "decoder_padding":
                          round(rr.stats.decoder_padding_fraction, 3)}


def _optimum_stock(args, stock_dir: Path) -> tuple[list[list[float]], float, dict]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import AutoTokenizer

    from instructrec.engine.formatting import build_instruction

    torch.set_num_threads(args.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    model = ORTModelForSeq2SeqLM.from_pretrained(stock_dir, use_cache=False, session_options=so)
    tok = AutoTokenizer.from_pretrained(stock_dir)
    requests = _requests(args)

    def score(r) -> list[float]:
        instruction = build_instruction(history=r.history, tokenizer=tok)
        enc = tok([instruction] * len(r.candidates), return_tensors="pt", padding=True)  # repeated per candidate
        labels = tok(text_target=list(r.candidates), return_tensors="pt", padding=True).input_ids
        labels[labels == tok.pad_token_id] = -100
        dec_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp(min=0)], 1)  # start = pad = 0
        logits = model(**enc, decoder_input_ids=dec_in).logits  # [K, n, V]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * (labels != -100)).double().sum(-1).tolist()

    with torch.inference_mode():
        for r in requests[:args.warmup]:
            score(r)
        t0 = time.perf_counter()
        scores = [score(r) for r in requests]
        wall = time.perf_counter() - t0
    return scores, wall, {"encoder_passes": sum(len(r.candidates) for r in requests)}


def worker(args) -> None:
    work = Path(args.work)
    if args.worker == "onnx-fp32":
        scores, wall, extra = _engine(args, work / "onnx", "onnx", "float32")
    elif args.worker == "torch-fp32":
        scores, wall, extra = _engine(args, work / "checkpoint", "torch", "float32")
    elif args.worker == "torch-bf16":
        scores, wall, extra = _engine(args, work / "checkpoint", "torch", "bfloat16")
    else:
        scores, wall, extra = _optimum_stock(args, work / "optimum-stock")
    n = sum(len(s) for s in scores)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    json.dump({"provider": args.worker, "wall_s": wall, "candidates": n, "candidates_per_s": n / wall,
               "peak_rss_mib": peak_mib, "scores": scores, **extra}, open(args.result, "w"))


def prepare(work: Path) -> None:
    """Checkpoint, our export and Optimum's stock export (each made once, reused)."""
    from .rerank import build_checkpoint

    ckpt = build_checkpoint(work / "checkpoint")
    if not (work / "onnx" / "instructrec_onnx.json").exists():
        from instructrec.export import export_model

        if (work / "onnx").exists():
            raise SystemExit(f"{work / 'onnx'} holds a partial export: remove it and run again")
        t0 = time.perf_counter()
        export_model(ckpt, work / "onnx")
        log.info("our export: %.1f s", time.perf_counter() - t0)
    if not (work / "optimum-stock" / "encoder_model.onnx").exists():
        from optimum.exporters.onnx import main_export

        t0 = time.perf_counter()
        main_export(str(ckpt), work / "optimum-stock", task="text2text-generation", do_validation=False)
        log.info("Optimum stock export: %.1f s", time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "instructrec-bench-onnx"))
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        worker(args)
        return {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    rows = {}
    for prov in args.providers.split(","):
        result = work / f"result-{prov}.json"
        cmd = [sys.executable, "-m", "instructrec.bench.onnx_rerank", "--worker", prov, "--result", str(result),
               "--work", str(work)] + [f"--{k}={getattr(args, k)}" for k in ("requests", "history", "candidates",
                                                                               "threads", "warmup")]
        log.info("running %s", prov)
        subprocess.run(cmd, check=True)
        rows[prov] = json.loads(result.read_text())
    ref = rows.get("torch-fp32")
    table = ["| provider | candidates/s | peak RSS (MiB) | encoder passes | max abs score diff vs torch fp32 "
             "| top-1 agreement vs torch fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for prov, r in rows.items():
        if ref is not None:
            a, b = np.array(r["scores"]), np.array(ref["scores"])
            diff = f"{np.abs(a - b).max():.2e}"
            top1 = f"{np.mean(a.argmax(1) == b.argmax(1)):.3f}"
        else:
            diff = top1 = "n/a"
        table.append(f"| {prov} | {r['candidates_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['encoder_passes']} "
                     f"| {diff} | {top1} |")
    print(f"\nrerank-{args.candidates}, {args.requests} requests, history {args.history}, "
          f"{args.threads} threads, flan-t5-small shape (random weights)\n")
    print("\n".join(table))
    summary = {p: {k: v for k, v in r.items() if k != "scores"} for p, r in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
