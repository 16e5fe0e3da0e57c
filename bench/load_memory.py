"""Peak host memory of `Reranker.from_pretrained` against the size of the checkpoint it loads.

    python -m instructrec.bench.load_memory --shape flan-t5-large --dtypes float32 bfloat16

A random-weight checkpoint of the shape (engine/presets.py) is saved once with Hugging Face's
`save_pretrained(max_shard_size=...)`, sharded as the Hub's large checkpoints are, the real
Flan-T5 tokenizer beside it. Each dtype is then loaded in a fresh subprocess, which reports its
resident set before the load (torch and transformers imported), its peak (ru_maxrss, so file
pages mapped while reading count too) and the load time. `load_mib` = peak - before: what loading
cost on top of the interpreter; compare it with `checkpoint_mib` (the files) and `model_mib` (the
loaded weights at the target dtype). A loader that holds the whole state dict before converting
needs about checkpoint + model; a streaming one about model + one tensor (or one shard's mapping).

Measured on this project's CPU VM (AMD EPYC, Zen 4, 2 cores, 24 GiB; the machine was shared
with other jobs, so load times are loose, memory is not), flan-t5-large shape (783M parameters,
2,988 MiB of fp32 safetensors), one thread, in MiB:

    checkpoint            code                                  dtype     model  load_mib  /checkpoint
    7 shards (500MB)      before: load_file, cat, then cast     float32   2,987    3,814      1.28
    7 shards (500MB)      before                                bfloat16  1,494    6,462      2.16
    7 shards (500MB)      after: safe_open, tensor by tensor    float32   2,987    3,271      1.09
    7 shards (500MB)      after                                 bfloat16  1,494    1,777      0.59
    1 file (20GB)         before                                float32   2,987    3,814      1.28
    1 file (20GB)         before                                bfloat16  1,494    6,462      2.16
    1 file (20GB)         after, one map held per file          float32   2,987    5,280      1.77
    1 file (20GB)         after, one map held per file          bfloat16  1,494    4,639      1.55
    1 file (20GB)         after, file reopened per tensor       float32   2,987    3,271      1.09
    1 file (20GB)         after, file reopened per tensor       bfloat16  1,494    1,777      0.59

`before` kept part of the fp32 model as views of the file map (no copy, paged in at first use),
which is why its fp32 load looked cheap; its peak held the state dict and the fused copies at once.
The streamed loader copies every tensor once (3 GB of page faults: 6-19 s here under load, against
8-16 s before); after loading, RSS was 3,434 MiB (fp32) and 1,940 MiB (bf16) against 4,101 and
1,938 before.
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

DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "instructrec-bench-load-memory"
_MIB = 1024 * 1024


def _rss_mib() -> float:
    """The current resident set (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_sharded_checkpoint(out_dir: Path, shape: str, max_shard_size: str, tokenizer_dir: Path,
                             seed: int = 0) -> Path:
    """Save a random-weight T5 of `shape` with save_pretrained(max_shard_size=...) and the tokenizer
    beside it; reused when its index is already there."""
    if (out_dir / "model.safetensors.index.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from instructrec.engine.presets import shape_config

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**shape_config(shape))).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def _child(args) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as any caller has it)

    from instructrec.engine import Reranker

    torch.set_num_threads(args.threads)
    before = _rss_mib()
    t0 = time.perf_counter()
    reranker = Reranker.from_pretrained(str(args.checkpoint), dtype=args.dtype)
    load_s = time.perf_counter() - t0
    peak = _peak_rss_mib()
    params = reranker.backend.model.parameters()
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    files = [p for p in Path(args.checkpoint).iterdir() if p.suffix in (".safetensors", ".bin")]
    checkpoint_bytes = sum(p.stat().st_size for p in files)
    print(json.dumps({
        "dtype": args.dtype, "checkpoint_files": len(files), "checkpoint_mib": round(checkpoint_bytes / _MIB),
        "model_mib": round(model_bytes / _MIB), "rss_before_mib": round(before), "peak_rss_mib": round(peak),
        "load_mib": round(peak - before), "load_over_checkpoint": round((peak - before) * _MIB / checkpoint_bytes, 2),
        "rss_after_mib": round(_rss_mib()), "load_s": round(load_s, 1),
    }))


def main(argv=None) -> list[dict]:
    from instructrec.engine.presets import SHAPES

    from .workloads import SHARED_TOKENIZER

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="flan-t5-large", choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--max-shard-size", default="500MB", help="save_pretrained's max_shard_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="where the random checkpoint is saved (reused between runs)")
    p.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="saved beside the weights")
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return []
    checkpoint = args.work_dir / f"{args.shape}-shards-{args.max_shard_size}"
    # Built in its own process, so that this one stays small while the children run.
    build = [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from instructrec.bench.load_memory import build_sharded_checkpoint as b; "
             "b(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))",
             str(checkpoint), args.shape, args.max_shard_size, str(args.tokenizer)]
    subprocess.run(build, check=True)
    out = []
    for dtype in args.dtypes:
        cmd = [sys.executable, "-m", "instructrec.bench.load_memory", "--child", "--checkpoint", str(checkpoint),
               "--dtype", dtype, "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
