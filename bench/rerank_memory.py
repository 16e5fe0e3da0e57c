"""Peak memory of scoring one instruction against many candidates (flan-t5-small shape).

    python -m instructrec.bench.rerank_memory --candidates 2000 --row-tokens 256

Each measurement runs in a fresh subprocess and reports its peak RSS (ru_maxrss), so model
loading is included and nothing from an earlier run is counted. Materialising the fp32 log-probs
of 2,000 candidates x 25 tokens x 32128 would alone take 6.4 GB; the issue's bar is 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> None:
    import numpy as np
    import torch

    from instructrec.bench.workloads import build_checkpoint, make_title
    from instructrec.engine import Reranker
    from instructrec.engine.presets import shape_config

    torch.set_num_threads(args.threads)
    path = build_checkpoint(args.model_dir, shape_config("flan-t5-small"))  # random weights
    rng = np.random.default_rng(0)
    titles = []
    while len(titles) < args.candidates:  # ~25 target tokens each: two generated titles joined
        titles.append(f"{make_title(rng)} {make_title(rng)} #{len(titles)}")
    rr = Reranker.from_pretrained(path, dtype=args.dtype, row_tokens=args.row_tokens,
                                  batch_tokens=args.batch_tokens)
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    scores = rr.score("The user bought racing games and a steering wheel. Recommend the next item.", titles)
    wall = time.perf_counter() - t0
    s = rr.stats
    print(json.dumps({
        "candidates": args.candidates, "dtype": args.dtype, "row_tokens": args.row_tokens,
        "batch_tokens": args.batch_tokens, "decoder_tokens": s.decoder_tokens,
        "mean_title_tokens": round(s.decoder_tokens / args.candidates, 1),
        "decoder_padding": round(s.decoder_padding_fraction, 4), "decoder_passes": s.decoder_passes,
        "encoder_passes": s.encoder_passes, "wall_s": round(wall, 2),
        "peak_rss_after_load_mib": round(load_rss / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "finite": bool(np.isfinite(scores).all()),
    }))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--row-tokens", type=int, nargs="+", default=[256])
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "instructrec-bench-flan-t5-small")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.row_tokens = args.row_tokens[0]
        _child(args)
        return []
    out = []
    for row_tokens in args.row_tokens:
        cmd = [sys.executable, "-m", "instructrec.bench.rerank_memory", "--child",
               "--candidates", str(args.candidates), "--dtype", args.dtype, "--row-tokens", str(row_tokens),
               "--batch-tokens", str(args.batch_tokens), "--threads", str(args.threads),
               "--model-dir", str(args.model_dir)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]))
    return out


if __name__ == "__main__":
    main()
