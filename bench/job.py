"""Benchmark of the nightly job (`instructrec rerank`): memory as the input grows, and overhead
against `Reranker.rank` on the same requests.

    python -m instructrec.bench.job [--rows 20000 200000] [--compare-rows 5000] [--ray-rows 20000] [--workdir DIR]

1. Peak memory: for each size in --rows, a requests Parquet of that many small requests (written
   streaming, 10k rows per row group) is reranked by a fresh `python -m instructrec rerank`
   subprocess; its peak RSS comes from wait4(). Flat means: the job reads by row groups and
   writes parts, so only the duplicate-id set (16 bytes/row) grows with the input.
2. Overhead: in one process, the same --compare-rows requests go through `Reranker.rank` (Requests
   already built, one call per 1024 as the job does) and through the job (Parquet read, id pass,
   conversion, Parquet write); candidates/s of both.
3. Ray (with --ray-rows N, needs the `ray` extra): the same N requests through the in-process job
   and through the Ray job with 1 and 2 actors, every engine at 1 thread (each actor reserves one
   CPU): rows/s over each run's wall time, and for Ray the cost of starting Ray itself, apart.

The model is a micro T5 (d_model 16, one layer each side, real Flan-T5 tokenizer) with random
weights, so the engine is as cheap as it gets and the job's own overhead shows as much as it can.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MICRO_T5 = dict(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "flan-t5-tokenizer"


def build_micro_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(0)
    config = T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **MICRO_T5)
    T5ForConditionalGeneration(config).eval().save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def write_requests(path: Path, rows: int, candidates: int = 2, rows_per_group: int = 10_000) -> Path:
    """Small requests, written group by group so generating 1M rows needs no more memory than 10k."""
    schema = pa.schema([("request_id", pa.string()), ("candidates", pa.list_(pa.string())),
                        ("instruction", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, rows_per_group):
            ids = range(start, min(start + rows_per_group, rows))
            writer.write_table(pa.table({
                "request_id": [f"r{i}" for i in ids],
                "candidates": [[f"game {i % 97} {j}" for j in range(candidates)] for i in ids],
                "instruction": [f"pick a game {i % 13}" for i in ids],
            }, schema=schema))
    return path


def peak_rss_of_job(model: Path, input_path: Path, output: Path) -> dict:
    command = [sys.executable, "-m", "instructrec", "rerank", "--model", str(model), "--input", str(input_path),
               "--output", str(output), "--no-progress", "--dtype", "float32"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    return {"rows": summary["rows"], "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            "candidates_per_s": summary["candidates_per_s"]}


def compare_with_rank(model: Path, input_path: Path, output: Path, chunk_rows: int = 1024) -> dict:
    from instructrec.engine import Reranker
    from instructrec.engine.batch import rows_to_requests, run_job_with_reranker

    reranker = Reranker.from_pretrained(model)
    table = pq.read_table(input_path)  # the baseline gets its Requests built outside the timing
    requests = rows_to_requests(table, {})
    reranker.rank(requests[:chunk_rows], errors="return")  # warm-up
    started = time.perf_counter()
    for start in range(0, len(requests), chunk_rows):
        reranker.rank(requests[start:start + chunk_rows], errors="return")
    rank_wall = time.perf_counter() - started
    candidates = sum(len(r.candidates) for r in requests)
    summary = run_job_with_reranker(reranker, input_path, output, chunk_rows=chunk_rows, progress=False)
    return {"rows": len(requests), "rank_candidates_per_s": round(candidates / rank_wall, 1),
            "job_candidates_per_s": summary["candidates_per_s"],
            "job_over_rank": round(summary["candidates_per_s"] / (candidates / rank_wall), 3),
            "rank_wall_s": round(rank_wall, 2), "job_wall_s": summary["wall_s"]}


def compare_with_ray(model: Path, input_path: Path, work: Path, actor_counts=(1, 2),
                     rows_per_part: int = 1000) -> list[dict]:
    """In-process vs Ray (1 and 2 actors) on the same input, 1 engine thread each."""
    import ray

    from instructrec.engine.batch import run_job
    from instructrec.engine.ray_job import run_ray_job

    options = dict(dtype="float32", threads=1, rows_per_part=rows_per_part)
    figures = []
    started = time.perf_counter()
    summary = run_job(model, input_path, work / f"ray-compare-local-{time.time_ns()}", progress=False, **options)
    wall = time.perf_counter() - started
    figures.append({"runner": "in-process", "actors": 0, "rows": summary["rows"], "wall_s": round(wall, 2),
                    "rows_per_s": round(summary["rows"] / wall, 1), "ray_start_s": 0.0})
    for actors in actor_counts:
        started = time.perf_counter()
        # As run_ray_job starts a local instance: the actors plus one CPU for Ray Data's own tasks.
        ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, actors + 1), logging_level="warning")
        ray_started = time.perf_counter()
        try:
            summary = run_ray_job(model, input_path, work / f"ray-compare-{actors}-{time.time_ns()}", actors=actors,
                                  **options)
            wall = time.perf_counter() - ray_started  # actors' start and model load included
        finally:
            ray.shutdown()
        figures.append({"runner": "ray", "actors": actors, "rows": summary["rows"], "wall_s": round(wall, 2),
                        "rows_per_s": round(summary["rows"] / wall, 1),
                        "ray_start_s": round(ray_started - started, 2)})
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.bench.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[20_000, 200_000],
                        help="input sizes of the peak-memory runs (none: skip them)")
    parser.add_argument("--compare-rows", type=int, default=5_000, help="rows of the job vs Reranker.rank run (0: skip)")
    parser.add_argument("--ray-rows", type=int, default=0, help="also compare the Ray job (1 and 2 actors) on this "
                                                                 "many requests (default: skip)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here (default: temp)")
    parser.add_argument("--report", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_micro_model(work / "micro-t5", args.tokenizer)
        report = {"model": MICRO_T5, "cpu_count": os.cpu_count(), "memory": [], "overhead": None}
        for rows in args.rows:
            input_path = write_requests(work / f"requests-{rows}.parquet", rows)
            figures = peak_rss_of_job(model, input_path, work / f"out-{rows}-{time.time_ns()}")
            report["memory"].append(figures)
            print(f"memory   rows {rows:>9}  peak RSS {figures['peak_rss_mib']:8.1f} MiB  wall {figures['wall_s']:7.1f} s"
                  f"  {figures['candidates_per_s']:9.1f} candidates/s", flush=True)
        if args.compare_rows:
            input_path = write_requests(work / f"requests-{args.compare_rows}.parquet", args.compare_rows)
            report["overhead"] = compare_with_rank(model, input_path, work / f"out-compare-{time.time_ns()}")
            o = report["overhead"]
            print(f"overhead rows {o['rows']:>9}  Reranker.rank {o['rank_candidates_per_s']:9.1f} candidates/s  "
                  f"job {o['job_candidates_per_s']:9.1f} candidates/s  job/rank {o['job_over_rank']:.3f}")
        if args.ray_rows:
            input_path = write_requests(work / f"requests-{args.ray_rows}.parquet", args.ray_rows)
            report["ray"] = compare_with_ray(model, input_path, work)
            for f in report["ray"]:
                label = "in-process" if f["runner"] == "in-process" else f"ray, {f['actors']} actor(s)"
                print(f"ray      {label:<18} rows {f['rows']:>7}  wall {f['wall_s']:7.1f} s  {f['rows_per_s']:8.1f} rows/s"
                      + (f"  (+ Ray start {f['ray_start_s']:.1f} s)" if f["runner"] == "ray" else ""), flush=True)
        if args.report:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
