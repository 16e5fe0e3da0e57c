"""`instructrec train`: instruction tuning, one process or many (torchrun / accelerate launch).

The flags are built from `TrainConfig`'s fields (name, default, type, help: tune_config.py), so the
parser and the config cannot disagree. torch and transformers are imported inside the command only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

_EPILOG = """\
several processes (batch size is per process; global batch = batch size x processes x grad accum):
  torchrun --standalone --nproc_per_node 2 -m instructrec train ...
  accelerate launch --num_processes 2 -m instructrec train ...   (DDP, FSDP or DeepSpeed from `accelerate config`)
"""


def register(subparsers) -> None:
    from instructrec.engine.presets import RANDOM_PREFIX, SHAPES

    from .tune_config import TrainConfig

    p = subparsers.add_parser(
        "train", help="instruction-tune a T5 model on an instruction dataset",
        description="Train a T5 checkpoint (a folder, a Hub id, or random:<shape>) with the seq2seq NLL\n"
                    "of each instruction's target, on one process or many. Writes the final model\n"
                    "(save_pretrained layout, with the tokenizer and a model card) to --out, plus\n"
                    "checkpoints/, training_config.json, metrics.jsonl and loss_curve.png.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        if "exclusive" in meta:
            group = exclusive.get(meta["exclusive"]) or exclusive.setdefault(
                meta["exclusive"], group.add_mutually_exclusive_group())
        help_text = meta["help"].replace("{shapes}", ", ".join(RANDOM_PREFIX + s for s in SHAPES))
        _add_flag(group, f, hints[f.name], help_text)
    p.set_defaults(func=run)


def _add_flag(group, f: dataclasses.Field, hint, help_text: str) -> None:
    """One argparse flag for one field: --field-name (or meta["flag"]); booleans are switches that
    flip the default, shown without a "(default: ...)" that would describe the field, not the flag."""
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    if hint is bool:
        group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=help_text)
        return
    kwargs = dict(dest=f.name, help=help_text, required=meta["required"])
    if not meta["required"]:
        kwargs["default"] = f.default
        if f.default is not None:
            shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            kwargs["help"] = f"{help_text} (default: {shown})"
    kwargs["type"] = meta.get("type") or _scalar_type(hint)
    for key in ("choices", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    group.add_argument(flag, **kwargs)


def _scalar_type(hint):
    """int / float / str / Path from `X` or `X | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (int, float, Path) else str


def run(args) -> int:
    from .tune import train
    from .tune_config import TrainConfig

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    result = train(config)
    if not result.main_process:
        return 0
    summary = {"out": str(result.out), "steps_done": result.steps_done, "total_steps": result.total_steps,
               "planned_steps": result.planned_steps, "stopped_early": result.stopped_early,
               "time_capped": result.time_capped, "precision": result.precision,
               "processes": result.world_size, "global_batch_size": result.global_batch_size,
               "wall_s": round(result.wall_s, 1), "examples_per_s": round(result.examples_per_s, 2),
               "model_gflops_per_s": round(result.model_flops_per_s / 1e9, 1),
               "flop_utilisation": None if result.flop_utilisation is None else round(result.flop_utilisation, 3),
               "final_train_loss": result.step_losses[max(result.step_losses)] if result.step_losses else None,
               "final_eval": result.evaluations[-1] if result.evaluations else None}
    print(json.dumps(summary, indent=2))
    return 0
