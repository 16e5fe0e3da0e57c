"""`instructrec data prepare | synth | stats`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="prepare Amazon review logs, generate a synthetic dataset, show stats",
        description="Amazon Reviews 2018/2023 logs to clean Parquet tables, splits and "
                    "evaluation candidates.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prepare = commands.add_parser(
        "prepare", help="raw reviews + meta to Parquet tables, splits, candidates, stats.json")
    prepare.add_argument("--reviews", required=True, nargs="+", metavar="PATH",
                         help="review file(s): .json/.json.gz (2018) or .jsonl/.jsonl.gz (2023)")
    prepare.add_argument("--meta", required=True, nargs="+", metavar="PATH",
                         help="item metadata file(s) of the same format")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output directory")
    prepare.add_argument("--format", default="auto", choices=("auto", "amazon2018", "amazon2023"),
                         help="input format; auto reads the keys of the first lines "
                              "(default: auto)")
    prepare.add_argument("--k-core", type=int, default=5, metavar="K",
                         help="keep only users and items with at least K interactions, "
                              "iterated until stable; 0 or 1: no filter (default: 5)")
    prepare.add_argument("--seed", type=int, default=0,
                         help="seed of the splits and negatives (default: 0)")
    prepare.add_argument("--negatives", type=int, default=9, metavar="N",
                         help="sampled negatives per validation/test instance (default: 9)")
    prepare.add_argument("--strict", action="store_true",
                         help="fail on the first malformed line instead of counting it")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    prepare.set_defaults(func=_reporting_data_errors(_prepare))

    synth = commands.add_parser(
        "synth", help="write a small realistic dataset in the Amazon 2018 format")
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory")
    synth.add_argument("--users", type=int, default=300, metavar="N",
                       help="number of users (default: 300)")
    synth.add_argument("--items", type=int, default=200, metavar="M",
                       help="number of items, at least 8 (default: 200)")
    synth.add_argument("--seed", type=int, default=0, metavar="S",
                       help="the same seed gives byte-identical files (default: 0)")
    synth.add_argument("--malformed", action="store_true",
                       help="also write a few malformed lines (to see how they are reported)")
    synth.set_defaults(func=_synth)

    stats = commands.add_parser("stats", help="print the stats of a prepared directory")
    stats.add_argument("dir", metavar="DIR", help="a directory written by `data prepare`")
    stats.add_argument("--json", action="store_true", help="print stats.json as it is")
    stats.set_defaults(func=_reporting_data_errors(_stats))


def _reporting_data_errors(command):
    """A DataError (bad input, named file and line) ends the command with exit status 2 and a
    one-line message instead of a traceback."""
    def run(args) -> int:
        from instructrec.training.data.errors import DataError

        try:
            return command(args)
        except DataError as exc:
            print(f"instructrec data {args.data_command}: error: {exc}", file=sys.stderr)
            return 2
    return run


def _prepare(args) -> int:
    from instructrec.training.data import prepare

    stats = prepare(args.reviews, args.meta, args.out, format=args.format, k_core=args.k_core,
                    seed=args.seed, negatives=args.negatives, strict=args.strict,
                    progress=not args.no_progress)
    print(format_stats(stats))
    return 0


def _synth(args) -> int:
    from instructrec.training.data import synth

    reviews, meta = synth(args.out, users=args.users, items=args.items, seed=args.seed,
                          malformed=args.malformed)
    print(f"reviews: {reviews}\nmeta:    {meta}")
    return 0


def _stats(args) -> int:
    from instructrec.training.data.errors import DataError

    path = Path(args.dir) / "stats.json"
    if not path.exists():
        raise DataError(f"{args.dir}: no stats.json; run `instructrec data prepare` into it first")
    stats = json.loads(path.read_text())
    print(json.dumps(stats, indent=2, ensure_ascii=False) if args.json else format_stats(stats))
    return 0


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(key) for key, _ in rows), default=0)
    value_width = max((len(value) for _, value in rows), default=0)
    lines = [title, "-" * max(len(title), width + 2 + value_width)]
    lines += [f"{key:<{width}}  {value:>{value_width}}" for key, value in rows]
    return lines


def format_stats(stats: dict) -> str:
    """stats.json as aligned plain-text tables."""
    def num(value) -> str:
        return f"{value:,}" if isinstance(value, int) else str(value)

    splits = stats.get("splits", {})
    summary = [
        ("format", str(stats.get("format"))),
        ("k-core", str(stats.get("k_core"))),
        ("seed", str(stats.get("seed"))),
        ("users", num(stats["users"])),
        ("items", num(stats["items"])),
        ("interactions", num(stats["interactions"])),
        ("sparsity", f"{stats['sparsity']:.6f}"),
        ("avg_seq_len", f"{stats['avg_seq_len']:.2f}"),
        *((f"split {name}", num(count)) for name, count in splits.items()),
        *((f"search split {name}", num(count))
          for name, count in stats.get("search_splits", {}).items()),
        ("candidate lists", num(stats.get("candidates", {}).get("rows", 0))),
    ]
    lines = _table("dataset", summary)
    read = stats.get("records_read", {})
    lines += [""] + _table("records read and discarded", [
        *((f"read {kind}", num(count)) for kind, count in read.items()),
        *((reason, num(count)) for reason, count in stats.get("discarded", {}).items()),
    ])
    if stats.get("malformed"):
        lines += [""] + _table("malformed lines", [
            (name, num(count)) for name, count in stats["malformed"].items()])
        for example in stats.get("malformed_examples", [])[:5]:
            lines.append(f"  {example['file']}:{example['line']}: {example['reason']}")
    if stats.get("nulled_fields"):
        lines += [""] + _table("optional fields set to null (unusable value)", [
            (name, num(count)) for name, count in stats["nulled_fields"].items()])
    if stats.get("cleaning"):
        lines += [""] + _table("cleaning", [
            (name, num(count)) for name, count in stats["cleaning"].items()])
    if stats.get("warnings"):
        lines += [""] + [f"WARNING: {warning}" for warning in stats["warnings"]]
    return "\n".join(lines)
