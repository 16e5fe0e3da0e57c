"""`instructrec instructions templates|build|catalog`: list the templates, build instruction datasets,
build the catalogue pretraining corpus."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    group = subparsers.add_parser("instructions", help="instruction templates and instruction datasets",
                                  description="List the instruction templates, or build instruction datasets.")
    commands = group.add_subparsers(dest="instructions_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("templates", help="list the templates with their P/I/T attributes")
    listing.add_argument("--json", action="store_true", help="print every attribute as JSON")
    listing.set_defaults(func=_templates)

    build = commands.add_parser(
        "build", help="build train/valid/test instruction Parquet files from a prepared data directory",
        description="Build instruction datasets (train.parquet, valid.parquet, test.parquet, stats.json, "
                    "stats.md) from a directory written by `instructrec data prepare`.")
    build.add_argument("--data", required=True, type=Path, help="prepared data directory")
    build.add_argument("--out", required=True, type=Path, help="output directory")
    build.add_argument("--annotator", choices=("offline", "teacher"), default="offline",
                       help="offline: sentences from the data, no network (default); teacher: an "
                            "OpenAI-compatible endpoint from INSTRUCTREC_TEACHER_BASE_URL / _MODEL / _API_KEY")
    build.add_argument("--templates", default="all", help="template ids for training rows, comma-separated, or 'all'")
    build.add_argument("--eval-templates", default=None,
                       help="template ids for valid/test rows (default: those of seq-rec-02, pers-search-07, "
                            "pers-search-08, prod-search-03, prod-search-04, seq-rec-01, pers-search-01, "
                            "pers-search-02, prod-search-01, prod-search-02 that --templates selects: each "
                            "evaluated type's listed (T3) and unlisted (T2) form)")
    build.add_argument("--per-user", type=int, default=4, help="training instructions per user (default 4)")
    build.add_argument("--search-per-item", type=int, default=1,
                       help="product-search training instructions per search-train item (default 1)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--max-source-tokens", type=int, default=512)
    build.add_argument("--tokenizer", type=Path, default=None,
                       help="tokenizer or checkpoint directory used to fit sources to --max-source-tokens "
                            "(default: none, only the 20-item history cap applies; the Flan-T5 tokenizer "
                            "is the one the model will read with)")
    build.add_argument("--max-users", type=int, default=None, help="a seeded subset of users (quick builds)")
    build.add_argument("--max-items", type=int, default=None,
                       help="a seeded subset of product-search items per split (quick builds)")
    build.add_argument("--teacher-cache", type=Path, default=None,
                       help="teacher answer cache (default: $INSTRUCTREC_TEACHER_CACHE_DIR, else OUT/.teacher-cache)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    catalog = commands.add_parser(
        "catalog", help="build the catalogue pretraining corpus (next title, category <-> title, span corruption)",
        description="Write OUT/train.parquet: short rows that teach a randomly initialised T5 the catalogue "
                    "(which title follows which, how a category path reads as a title) from the TRAIN split "
                    "only, never targeting a product-search valid/test item. Train on it with `instructrec "
                    "train --instructions OUT`, then instruction-tune from that checkpoint (docs/training.md).")
    catalog.add_argument("--data", required=True, type=Path, help="prepared data directory")
    catalog.add_argument("--out", required=True, type=Path, help="output directory")
    catalog.add_argument("--valid-from", type=Path, default=None,
                         help="an `instructions build` folder whose valid.parquet the corpus validates on "
                              "(linked as OUT/valid.parquet; `instructrec train` needs one)")
    catalog.add_argument("--history", type=int, default=10, help="newest titles in a next-title source (default 10)")
    catalog.add_argument("--objectives", default="all",
                         help="comma-separated: next-title, category-title, title-category, span-corruption, or all")
    catalog.add_argument("--span-copies", type=int, default=2,
                         help="span-corruption rows per item (each a different draw; default 2)")
    catalog.add_argument("--seed", type=int, default=0)
    catalog.set_defaults(func=_catalog)


def _templates(args: argparse.Namespace) -> int:
    from instructrec.engine.templates import describe_templates

    described = describe_templates()
    if args.json:
        json.dump(described, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ("id", "P", "I", "T", "scenario", "strategy", "target_kind", "description")
    rows = [[str(entry[key]) for key in header] for entry in described]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1])
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    print(f"\n{len(rows)} templates")
    return 0


def _build(args: argparse.Namespace) -> int:
    from instructrec.training.annotation import make_annotator
    from instructrec.training.build import build_instructions

    overrides = {}
    if args.annotator == "teacher":
        if args.teacher_cache is not None:
            overrides["cache_dir"] = args.teacher_cache
        elif not os.environ.get("INSTRUCTREC_TEACHER_CACHE_DIR", "").strip():
            overrides["cache_dir"] = args.out / ".teacher-cache"
    annotator = make_annotator(args.annotator, progress=not args.no_progress, **overrides)
    report = build_instructions(
        args.data, args.out, annotator=annotator, templates=args.templates, eval_templates=args.eval_templates,
        per_user=args.per_user, search_per_item=args.search_per_item, seed=args.seed, tokenizer=args.tokenizer,
        max_source_tokens=args.max_source_tokens, max_users=args.max_users, max_items=args.max_items,
        progress=not args.no_progress)
    print((args.out / "stats.md").read_text(encoding="utf-8"))
    print(f"rows: {report['rows']} in {report['seconds']}s -> {args.out}")
    return 0


def _catalog(args: argparse.Namespace) -> int:
    from instructrec.training.catalog_corpus import OBJECTIVES, build_catalog_corpus

    objectives = OBJECTIVES if args.objectives == "all" else tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    report = build_catalog_corpus(args.data, args.out, history=args.history, objectives=objectives,
                                  span_copies=args.span_copies, seed=args.seed, valid_from=args.valid_from)
    print(json.dumps(report, indent=2))
    return 0
