"""Data-preparation benchmark: records/s and peak memory of `prepare` on a generated 2018 file.

    python -m instructrec.bench.data_prepare --reviews 2000000 [--workdir DIR [--reuse]] [--keep]

Generates a 2018-format review file (gzip, realistic text lengths, long-tailed users and items)
and its meta file, then runs `prepare` in a child process so that its peak RSS
(getrusage RUSAGE_CHILDREN) is the preparation's alone. Prints one JSON object: wall time and
records/s, CPU time (user + system) and records per CPU-second, peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_WORDS = ("great game controller works fine my son loves it graphics are amazing story "
          "battery lasts long would buy again gift for husband fun with friends online "
          "multiplayer is laggy sometimes cheap plastic but does the job fast shipping "
          "the sequel is better than the first one highly recommended").split()


def _texts(rng: np.random.Generator, count: int) -> list[str]:
    """A pool of review texts of 20 to 200 words (about 600 characters on average, like the
    real Video Games reviews); json-escaped already."""
    lengths = rng.integers(20, 200, size=count)
    return [json.dumps(" ".join(rng.choice(_WORDS, size=n).tolist()).capitalize() + ".")
            for n in lengths]


def generate(directory: Path, n_reviews: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write reviews and meta files; returns their paths and the uncompressed review bytes."""
    rng = np.random.default_rng(seed)
    n_users = max(10, n_reviews // 8)
    n_items = max(10, n_reviews // 25)
    # Long tails on both sides: Zipf-like user activity and item popularity.
    users = np.minimum((n_users * rng.power(0.35, size=n_reviews)).astype(np.int64), n_users - 1)
    items = np.minimum((n_items * rng.power(0.45, size=n_reviews)).astype(np.int64), n_items - 1)
    times = rng.integers(1_300_000_000, 1_540_000_000, size=n_reviews) // 86_400 * 86_400
    ratings = rng.integers(1, 6, size=n_reviews)
    texts = _texts(rng, 4096)
    text_index = rng.integers(0, len(texts), size=n_reviews)
    reviews_path = directory / "Bench_5.json.gz"
    meta_path = directory / "meta_Bench.json.gz"
    raw_bytes = 0
    block = 100_000
    with gzip.open(reviews_path, "wb", compresslevel=1) as out:
        for start in range(0, n_reviews, block):
            stop = min(start + block, n_reviews)
            lines = [
                f'{{"reviewerID": "A{u:013d}", "asin": "B{i:09d}", "unixReviewTime": {t}, '
                f'"overall": {r}.0, "summary": "Review {k}", "reviewText": {texts[k]}, '
                f'"verified": true}}\n'
                for u, i, t, r, k in zip(users[start:stop].tolist(), items[start:stop].tolist(),
                                         times[start:stop].tolist(), ratings[start:stop].tolist(),
                                         text_index[start:stop].tolist())]
            data = "".join(lines).encode()
            raw_bytes += len(data)
            out.write(data)
    with gzip.open(meta_path, "wb", compresslevel=1) as out:
        for i in range(n_items):
            out.write((f'{{"asin": "B{i:09d}", "title": "Bench Item {i} &amp; Co - PC", '
                       f'"category": ["Video Games", "PC", "Games"], "brand": "Brand {i % 97}"}}\n'
                       ).encode())
    return reviews_path, meta_path, raw_bytes


def _child(reviews: str, meta: str, out: str) -> None:
    from instructrec.training.data import prepare

    started = time.perf_counter()
    stats = prepare(reviews, meta, out)
    print(json.dumps({"prepare_s": time.perf_counter() - started, "stats": stats}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reviews", type=int, default=2_000_000, help="reviews to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the files a previous run left in --workdir when they were "
                             "generated with the same --reviews and --seed")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = workdir / "generated.json"
    wanted = {"reviews": args.reviews, "seed": args.seed}
    previous = json.loads(manifest.read_text()) if manifest.exists() else {}
    started = time.perf_counter()
    if args.reuse and {k: previous.get(k) for k in wanted} == wanted:
        reviews, meta = Path(previous["reviews_path"]), Path(previous["meta_path"])
        raw_bytes = previous["raw_bytes"]
    else:
        reviews, meta, raw_bytes = generate(workdir, args.reviews, args.seed)
        manifest.write_text(json.dumps({**wanted, "reviews_path": str(reviews),
                                        "meta_path": str(meta), "raw_bytes": raw_bytes}))
    generate_s = time.perf_counter() - started
    child = subprocess.run(
        [sys.executable, "-m", "instructrec.bench.data_prepare", "--child",
         str(reviews), str(meta), str(workdir / "prepared")],
        check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib = usage.ru_maxrss  # KiB on Linux
    # CPU seconds too: on a shared machine the wall time also measures the neighbours.
    cpu_s = usage.ru_utime + usage.ru_stime
    stats = result["stats"]
    report = {
        "reviews": args.reviews,
        "review_file_bytes": reviews.stat().st_size,
        "review_bytes_uncompressed": raw_bytes,
        "generate_s": round(generate_s, 2),
        "prepare_s": round(result["prepare_s"], 2),
        "records_per_s": round(args.reviews / result["prepare_s"]),
        "prepare_cpu_s": round(cpu_s, 2),
        "records_per_cpu_s": round(args.reviews / cpu_s),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "users": stats["users"], "items": stats["items"], "interactions": stats["interactions"],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
