"""`instructrec eval`: HR@1/3/5 and NDCG@3/5 per scenario and method (training/evaluate.py), and
`instructrec eval-train-set`: the evaluated model's training folder (held-out instruction type
removed, product-search evaluation items never a target), and `instructrec mine-negatives`: that
folder with each row's retrieved negatives (training/mine_negatives.py). Heavy imports happen in
the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one to show: not for required flags, switches
    or flags whose default is "unset" (None)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    from .eval_scenarios import METHODS, METRIC_KEYS, SCENARIOS, SELECTION_METRIC

    p = subparsers.add_parser(
        "eval", help="evaluate the tuned model, the untuned model and the baselines per scenario",
        description="Rank the same candidate lists with every method and report HR@1/3/5 and NDCG@3/5 "
                    "per scenario as OUT/metrics.json and OUT/results.md. Scenarios: "
                    + "; ".join(f"{s.name} {s.notation} {s.title}" for s in SCENARIOS.values()),
        formatter_class=_DefaultsShown)
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (instructrec data prepare)")
    p.add_argument("--instructions", type=Path, required=True,
                   help="instruction folder built from --data whose valid/test rows hold the scenarios' T2/T3 "
                        "templates (instructrec instructions build --eval-templates ...)")
    p.add_argument("--model", default=None,
                   help="the tuned model: a checkpoint folder (instructrec train), a Hugging Face Hub id such as "
                        "google/flan-t5-base (with --revision), or random:<shape> (e.g. random:flan-t5-small: "
                        "the zero-shot reference only, with --tokenizer); its identity (a Hub id's commit) is "
                        "recorded in metrics.json")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id --model")
    p.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                   help="repeatable: a further trained checkpoint (same tokenizer as --model, e.g. another seed "
                        "of its recipe) whose scores the tuned methods sum with --model's, each standardised per "
                        "list (docs/engine.md, ensembles)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder for a random:<shape> --model, which brings none")
    p.add_argument("--scenario", action="append", default=None, metavar="NAME",
                   help=f"repeatable: {', '.join(SCENARIOS)}, or all (default: all)")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)}, or all")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--train-instructions", type=Path, default=None,
                   help="the folder the model was trained on (default: read from MODEL/training_config.json); "
                        "product-search instances whose target is one of its training targets are dropped")
    p.add_argument("--cross-data", type=Path, default=None, help="prepared data of another domain (cross-domain)")
    p.add_argument("--cross-instructions", type=Path, default=None, help="its instruction folder")
    p.add_argument("--max-instances", type=int, default=1000, help="seeded test instances per scenario; 0: all")
    p.add_argument("--max-instances-100", type=int, default=300, help="the same for candidates-100")
    p.add_argument("--valid-instances", type=int, default=200,
                   help="validation instances per template for the best-template choice")
    p.add_argument("--valid-instances-100", type=int, default=None,
                   help="the same for candidates-100, whose lists cost ten times as much to score "
                        "(default: --valid-instances)")
    p.add_argument("--baseline-valid", type=int, default=3000,
                   help="validation lists for the baselines' early stopping; 0: all")
    p.add_argument("--baseline-max-epochs", type=int, default=0, help="cap on baseline epochs; 0: their defaults")
    p.add_argument("--baseline-set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="repeatable: one baseline config field, e.g. tem.pairs_per_user=2 (fields: "
                        "training/baselines configs)")
    p.add_argument("--tune", action="store_true", help="grid-search every baseline (training/baselines/README.md)")
    p.add_argument("--dtype", default="auto", help="engine dtype: auto (bf16 on CUDA and on CPUs where it is native and measured "
                        "faster, else float32; docs/engine.md), float32, bfloat16")
    p.add_argument("--score-forms", default="sum,mean,calibrated",
                   help="comma list of the candidate score forms each model method chooses between on validation "
                        "(with the template): sum (the title's log-likelihood), mean (per title token), "
                        "calibrated (minus the title's log-likelihood under an empty instruction), calibrated:W "
                        "(minus W times it; a negative W adds it, e.g. calibrated:-0.5)")
    p.add_argument("--select-by", default=SELECTION_METRIC, metavar="METRIC",
                   help="the validation metric that chooses each model method's template and score form and "
                        f"instructrec+popularity's weight: one of {', '.join(METRIC_KEYS)} (NDCG@5 is the "
                        "original's rule)")
    p.add_argument("--combine-templates", action="store_true",
                   help="also choose between sums of two or more of a scenario's templates (e.g. "
                        "seq-rec-01+seq-rec-02: each template's scores standardised per list, then summed); "
                        "a chosen sum scores each of its templates on test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-to", type=Path, default=None, metavar="DIR",
                   help="a previous run's --out: rank exactly its instances and add this run's methods to its "
                        "metrics (e.g. baselines first, the model once trained)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (use 1 on a machine shared with other jobs)")
    p.set_defaults(func=run)

    h = subparsers.add_parser(
        "eval-train-set", help="the evaluated model's training folder: hold out an instruction type",
        description="Copy train.parquet without the rows of --hold-out (every task form of that "
                    "preference+intention) and without rows whose target is a product-search valid/test "
                    "item; valid/test are linked. Writes OUT/restrict.json with the counts.")
    h.add_argument("--instructions", type=Path, required=True, help="instruction folder (instructions build)")
    h.add_argument("--data", type=Path, required=True, help="the prepared directory it was built from")
    h.add_argument("--hold-out", default=None, metavar="P+I", help="e.g. P2+I1; none: hold nothing out")
    h.add_argument("--out", type=Path, required=True)
    h.set_defaults(func=run_train_set)

    m = subparsers.add_parser(
        "mine-negatives", help="add retrieved negatives to a training folder (train --rank-negatives-from mined)",
        description="Fit the two-tower retriever `instructrec eval` fits on --data's training sequences and store, "
                    "for every training row with a history, the items it ranks highest for that history (never "
                    "one the user interacted with) as column negative_ids of OUT/train.parquet, with the retriever's "
                    "scores (negative_scores, target_score: the soft targets of train --rank-distill); valid/test "
                    "are linked. Writes OUT/negatives.json with the counts and the retriever's fit.")
    m.add_argument("--instructions", type=Path, required=True,
                   help="training folder (instructions build or eval-train-set)")
    m.add_argument("--data", type=Path, required=True, help="the prepared directory it was built from")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--per-row", type=int, default=20, help="retrieved negatives stored per row; training draws "
                   "--rank-negatives of them per step; 0 with --random-per-row M: uniform items only, still "
                   "scored by the retriever (default: 20)")
    m.add_argument("--random-per-row", type=int, default=0, help="uniformly drawn items stored after the retrieved "
                   "ones, never one the user touched, so that training's draws mix easy and hard negatives "
                   "(default: 0)")
    m.add_argument("--max-epochs", type=int, default=6, help="the retriever's epoch cap (default: 6)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=run_mine_negatives)


def run(args) -> int:
    from .evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        data=args.data, instructions=args.instructions, model=args.model, out=args.out,
        scenarios=tuple(args.scenario or ["all"]),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        train_instructions=args.train_instructions, cross_data=args.cross_data,
        cross_instructions=args.cross_instructions, max_instances=args.max_instances,
        max_instances_100=args.max_instances_100, valid_instances=args.valid_instances,
        valid_instances_100=args.valid_instances_100,
        baseline_valid=args.baseline_valid, baseline_max_epochs=args.baseline_max_epochs, tune=args.tune,
        dtype=args.dtype, seed=args.seed, threads=args.threads, add_to=args.add_to, revision=args.revision,
        tokenizer=args.tokenizer, select_by=args.select_by, ensemble=tuple(args.ensemble),
        combine_templates=args.combine_templates,
        score_forms=tuple(f.strip() for f in args.score_forms.split(",") if f.strip()),
        baseline_overrides=parse_baseline_settings(args.baseline_set))
    evaluate(cfg)
    print((args.out / "results.md").read_text())
    return 0


def parse_baseline_settings(items: list[str]) -> dict:
    """["tem.pairs_per_user=2"] -> {"tem": {"pairs_per_user": 2}} (numbers parsed as JSON)."""
    from instructrec.engine.errors import InputError

    from .eval_scenarios import BASELINE_METHODS

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name or method not in BASELINE_METHODS:
            raise InputError("baseline_set", f"{item!r} is not METHOD.FIELD=VALUE with METHOD one of "
                             f"{', '.join(BASELINE_METHODS)}", "write e.g. tem.pairs_per_user=2")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def run_train_set(args) -> int:
    from .eval_train_set import restrict_training_set

    print(json.dumps(restrict_training_set(args.instructions, args.data, args.out, args.hold_out), indent=2))
    return 0


def run_mine_negatives(args) -> int:
    from .mine_negatives import mine_negatives

    print(json.dumps(mine_negatives(args.instructions, args.data, args.out, per_row=args.per_row, seed=args.seed,
                                    max_epochs=args.max_epochs, random_per_row=args.random_per_row), indent=2))
    return 0
