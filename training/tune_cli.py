"""`instructrec train`: instruction tuning of a T5 checkpoint or a random-init preset.

Each flag maps onto one `training.tune.TrainConfig` field of the same name. torch and
transformers are imported inside the command only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def register(subparsers) -> None:
    from .presets import PRESETS

    p = subparsers.add_parser(
        "train", help="instruction-tune a T5 model on an instruction dataset",
        description="Train a T5 checkpoint (or a randomly initialised preset) with the seq2seq NLL "
                    "of each instruction's target. Writes the final model (save_pretrained "
                    "layout, with the tokenizer) to --out, plus checkpoints/, metrics.jsonl and "
                    "loss_curve.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--instructions", type=Path, required=True,
                    help="folder with train.parquet and valid.parquet from `instructrec instructions build`")
    io.add_argument("--model", required=True,
                    help=f"a checkpoint directory, or a preset initialised at random: {', '.join(PRESETS)}")
    io.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer folder (default: the model directory)")
    io.add_argument("--out", type=Path, required=True, help="output folder")
    io.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint under OUT/checkpoints")
    io.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                    help="save a checkpoint and stop after this many steps (split a run into jobs)")
    io.add_argument("--max-minutes", type=float, default=None, metavar="MINUTES",
                    help="wall-clock cap: after the step that crosses it, save a checkpoint, validate "
                         "and write the current weights to --out as the final model")
    io.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    io.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: one per core). On a machine shared with other "
                         "jobs use 1: OpenMP threads spin-wait on busy cores (here, at load 10 on 2 "
                         "cores, a t5-mini step took 16 s with 2 threads and 2.7 s with 1)")
    io.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    data = p.add_argument_group("data")
    data.add_argument("--max-source-length", type=int, default=512)
    data.add_argument("--max-target-length", type=int, default=64)
    data.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    data.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    data.add_argument("--no-length-grouping", dest="length_grouped", action="store_false",
                      help="plain shuffled batches (default groups rows of similar length)")
    data.add_argument("--seed", type=int, default=0)

    opt = p.add_argument_group("optimisation")
    budget = opt.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None, help="optimiser steps")
    budget.add_argument("--epochs", type=float, default=1.0, help="passes over train.parquet")
    opt.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 1e-3 Adafactor, 3e-4 AdamW)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear",
                     help="decay after warm-up")
    opt.add_argument("--max-grad-norm", type=_float_or_none, default=1.0, help="0 or none: no clipping")
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 autocast on CUDA with bf16 and on CPUs with AMX, else fp32")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--dropout", type=float, default=None, help="override the model's dropout_rate")

    lora = p.add_argument_group("LoRA (needs the `lora` extra: peft)")
    lora.add_argument("--lora-r", type=int, default=0, help="adapter rank; 0: train all weights")
    lora.add_argument("--lora-alpha", type=float, default=16.0)
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument("--lora-targets", default="q,v", help="comma-separated T5 linear layer names")

    ev = p.add_argument_group("validation and checkpoints")
    ev.add_argument("--eval-every", type=int, default=0, help="steps between validations; 0: at the end only")
    ev.add_argument("--eval-max-rows", type=int, default=512, help="valid rows for the loss; 0: all")
    ev.add_argument("--eval-max-instances", type=int, default=500,
                    help="sequential-recommendation instances ranked through the engine; 0: all")
    ev.add_argument("--no-rank-eval", dest="rank_eval", action="store_false",
                    help="validate the loss only (no HR/NDCG through the engine)")
    ev.add_argument("--save-every", type=int, default=0, help="steps between checkpoints; 0: none")
    ev.add_argument("--keep-checkpoints", type=int, default=2)
    p.set_defaults(func=run)


def run(args) -> int:
    from .tune import TrainConfig, train

    config = TrainConfig(
        instructions=args.instructions, model=args.model, out=args.out, tokenizer=args.tokenizer,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        dropout=args.dropout, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        length_grouped=args.length_grouped, eval_every=args.eval_every,
        eval_max_rows=args.eval_max_rows, eval_max_instances=args.eval_max_instances,
        rank_eval=args.rank_eval, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after,
        max_minutes=args.max_minutes,
        seed=args.seed, device=args.device, threads=args.threads, progress=args.progress)
    result = train(config)
    summary = {"out": str(result.out), "steps_done": result.steps_done,
               "total_steps": result.total_steps, "stopped_early": result.stopped_early,
               "time_capped": result.time_capped,
               "precision": result.precision, "wall_s": round(result.wall_s, 1),
               "examples_per_s": round(result.examples_per_s, 2),
               "final_train_loss": result.step_losses[max(result.step_losses)] if result.step_losses else None,
               "final_eval": result.evaluations[-1] if result.evaluations else None}
    print(json.dumps(summary, indent=2))
    return 0
