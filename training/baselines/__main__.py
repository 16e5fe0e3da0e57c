"""Fit baselines on a prepared data directory and print their valid/test metrics as JSON.

    python -m instructrec.training.baselines --data DIR --methods popularity,sasrec [--tune] [--seed 0]

Scores the stored test candidates of `candidates.parquet` (the sampled-negative sequential
scenario). The full scenario matrix, the untuned model and the report belong to `instructrec eval`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

import torch

from instructrec.engine.errors import InputError
from instructrec.training.baselines import BERT4Rec, Popularity, SASRec, TEM, TwoTowerRetriever, load_prepared, tune
from instructrec.training.baselines.common import evaluate

METHODS = {"popularity": Popularity, "sasrec": SASRec, "bert4rec": BERT4Rec,
           "two_tower_user": lambda **kw: TwoTowerRetriever(kind="user", **kw), "tem": TEM}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.training.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--methods", default="popularity,sasrec", help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--tune", action="store_true", help="grid-search each method's documented grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=0, help="cap on epochs (0: each config's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise InputError("--methods", f"unknown method(s) {', '.join(unknown)}", f"use {', '.join(METHODS)}")
    data = load_prepared(args.data)
    if any(m == "tem" for m in args.methods.split(",")):
        # TEM needs a query: the target's category path (the original's specific intention, I2)
        for split in (data.valid, data.test):
            split[:] = [replace(lr, request=replace(lr.request, query=data.train.items.category_path(lr.target_item_id)))
                        for lr in split]
    overrides = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    results = {}
    for name in args.methods.split(","):
        factory = METHODS[name]
        if args.tune and name != "popularity":
            grid = (factory.grid if hasattr(factory, "grid") else TwoTowerRetriever.grid)
            tuned = tune(lambda **p: factory(seed=args.seed, **overrides, **p), grid, data.train, data.valid)
            model, report, table = tuned.best_model, tuned.best_report, tuned.table()
        else:
            model = factory() if name == "popularity" else factory(seed=args.seed, **overrides)
            report, table = model.fit(data.train, data.valid), None
        test = evaluate(model.score([t.request for t in data.test]), data.test)
        results[name] = {"test": test, "valid_best": report.best_valid, "best_epoch": report.best_epoch,
                         "train_seconds": round(report.train_seconds, 1), "config": report.config, "grid": table}
        print(json.dumps({name: results[name]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
