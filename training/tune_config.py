"""The settings of one training run: `TrainConfig`, each field one `instructrec train` flag.

The dataclass is the single definition of every flag's name, default, type and help text:
tune_cli.py builds the parser from these fields (as `HfArgumentParser` does), so a new setting is
one field here. `validate_config` checks them all before any work. Imports nothing heavy: the CLI
reads this module on every `instructrec` invocation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from instructrec.engine.errors import InputError
from instructrec.engine.types import parse_score_form

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Where a random model's token embeddings start (training/embedding_init.py).
INIT_EMBEDDINGS = ("random", "minilm", "minilm-input")
# Where the ranking term draws its negatives (train --rank-negatives-from).
NEGATIVE_SOURCES = ("template", "mined")
DEFAULT_DISTILL_SHARE = 0.5  # --rank-distill-share: the highest share that keeps the target the soft target's top
# Trackers accelerate logs to (`--report-to`); each needs its own package installed.
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# Defaults per optimiser. Adafactor 1e-3 constant is the T5 fine-tuning recipe (T5 paper, sec.
# 3.1.2; the settings transformers documents for Adafactor fine-tuning); AdamW 3e-4 is the usual
# safe value for encoder-decoders of this size.
DEFAULT_LR = {"adafactor": 1e-3, "adamw": 3e-4}
# Fields that change the loss curve: a resumed run must agree with its checkpoint on all of them.
# The per-process batch size, accumulation and process count are not among them, only their
# product (`global_batch_size`): a run saved with 2 processes x 4 rows resumes with 1 x 8.
_CURVE_FIELDS = ("model", "revision", "max_source_length", "max_target_length", "max_steps", "epochs",
                 "optimizer", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm",
                 "precision", "dropout", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                 "length_grouped", "seed")


# --spell-rows with --item-tokens: a fifth of the rows again with the title spelt (as --prior-rows 0.2).
DEFAULT_SPELL_ROWS = 0.2

_REQUIRED = object()


def _flag(default, help: str, group: str, **cli):
    """A field with its CLI metadata: `help`, `group` and argparse extras (`flag` for a name other
    than --field-name, `type`, `choices`, `metavar`, `exclusive` for a mutually exclusive group).
    `_REQUIRED` as the default: a field without default, a required flag."""
    metadata = dict(help=help, group=group, required=default is _REQUIRED, **cli)
    if default is _REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


IO, DATA, OPT, LORA, EVAL = ("inputs and outputs", "data", "optimisation",
                             "LoRA (needs the `lora` extra: peft)", "validation and checkpoints")


@dataclass
class TrainConfig:
    instructions: Path = _flag(_REQUIRED, "folder with train.parquet and valid.parquet from `instructrec "
                               "instructions build`", IO, type=Path)
    model: str = _flag(_REQUIRED, "a save_pretrained folder, a Hugging Face Hub id (org/name, see "
                       "--revision) or random:<shape> (random weights; shapes: {shapes})", IO)
    out: Path = _flag(_REQUIRED, "output folder", IO, type=Path)
    revision: str | None = _flag(None, "Hub revision (branch, tag or commit) of a Hub id --model", IO)
    init_embeddings: str = _flag("random", "with a random:<shape> --model, start the token embeddings (and an "
                                 "untied LM head) of the pieces the training data uses from "
                                 "all-MiniLM-L6-v2 vectors of their text, projected to d_model (needs "
                                 "the `text` extra); minilm-input: the input embedding only, the head "
                                 "stays random", IO, choices=INIT_EMBEDDINGS)
    tokenizer: Path | None = _flag(None, "tokenizer folder (default: the model's folder)", IO, type=Path)
    compact_vocab: bool = _flag(False, "with a random:<shape> --model, give the model only the tokens its "
                                "text can use (the pieces of the training and validation rows, of every "
                                "template's wording and of --vocab-catalog's titles, plus single "
                                "characters and special tokens): a far smaller embedding, LM head and "
                                "softmax; the model's folder holds the compact tokenizer", IO)
    vocab_catalog: Path | None = _flag(None, "with --compact-vocab, also keep the pieces of every item title "
                                       "in this folder from `instructrec data prepare` (the catalogue the "
                                       "model will rank, unseen items included)", IO, type=Path, metavar="DIR")
    # A title the model learns to name as one token: naming an item becomes one softmax over the
    # catalogue (a sequential recommender's output layer) and a history ten ids, not ~150 pieces;
    # docs/results.md, "item tokens".
    item_tokens: bool = _flag(False, "with --compact-vocab, give every training target's title one token "
                              "of its own (matched as a whole in any text: histories, candidates); "
                              "other titles, new items' included, are spelt in pieces", IO)
    spell_rows: float | None = _flag(None, "with --item-tokens, add this fraction of the training rows again "
                                     "with the target spelt in pieces, so titles without a token (new items) "
                                     "are scored by a trained speller (default with --item-tokens: 0.2)",
                                     IO, metavar="FRACTION")
    resume: bool = _flag(False, "continue from the newest checkpoint under OUT/checkpoints (any "
                         "number of processes, same global batch)", IO)
    stop_after: int | None = _flag(None, "save a checkpoint and stop after this many steps (split a run "
                                   "into jobs)", IO, metavar="STEPS")
    # Wall-clock cap in minutes from the start of `train`. The schedule is fitted into it: after a
    # few steps the step time is measured and the step budget set to what fits (refitted as the
    # run goes, up to the planned steps), so the learning rate completes its decay. If the cap is
    # crossed anyway, the run saves a resumable checkpoint, validates and writes the current
    # weights to OUT as the final model.
    max_minutes: float | None = _flag(None, "wall-clock cap: the step budget is fitted to it "
                                      "(measured after a few steps) so the schedule ends inside it",
                                      IO, metavar="MINUTES")
    device: str = _flag("auto", "auto, cpu, cuda or cuda:N (one process; launchers assign devices "
                        "per process)", IO)
    threads: int | None = _flag(None, "torch CPU threads per process (default: torch's). On a machine "
                                "shared with other jobs use 1: OpenMP threads spin-wait on busy cores "
                                "(at load 10 on 2 cores a t5-mini step took 16 s with 2 threads, 2.7 s "
                                "with 1)", IO)
    progress: bool = _flag(True, "no progress bar", IO, flag="--no-progress")
    report_to: str = _flag("none", "also log metrics to this tracker through accelerate (needs its "
                           "package, e.g. pip install tensorboard); logs go under OUT/runs",
                           IO, choices=TRACKERS)

    max_source_length: int = _flag(512, "instruction tokens kept per row", DATA)
    max_target_length: int = _flag(64, "target tokens kept per row", DATA)
    batch_size: int = _flag(8, "rows per micro-batch per process (global batch: batch size x "
                            "processes x grad accum)", DATA)
    grad_accum: int = _flag(1, "micro-batches per optimiser step", DATA)
    length_grouped: bool = _flag(True, "plain shuffled batches (default groups rows of similar "
                                 "length)", DATA, flag="--no-length-grouping")
    seed: int = _flag(0, "seed of the initialisation and of the data order", DATA)
    pad_to_multiple: int | None = _flag(None, "round each batch's source and target lengths up to a multiple "
                                        "of this, so the matmul kernels compiled for one batch's shapes serve "
                                        "the next (default: 16 where the step runs in bf16 on a CPU, whose "
                                        "oneDNN kernels are built per shape; else 1, no rounding)", DATA,
                                        metavar="N")

    # The calibrated score forms (`instructrec eval --score-forms`, the engine's normalize) use a
    # title's log-likelihood under the empty instruction as its prior; without these rows the model
    # never sees that input, and its answer there follows the training targets only as far as the
    # decoder's habits carry (docs/results.md, "title-prior rows"). With them it is trained there.
    prior_rows: float = _flag(0.0, "add this fraction of the training rows again as title-prior rows: the "
                              "empty instruction answered by a target drawn from the training rows, so "
                              "the title's log-likelihood under the empty instruction (the calibrated "
                              "score forms' prior) learns how often each title is a target; 0: none",
                              DATA, metavar="FRACTION")

    max_steps: int | None = _flag(None, "optimiser steps", OPT, exclusive="budget")
    epochs: float = _flag(1.0, "passes over train.parquet", OPT, exclusive="budget")
    optimizer: str = _flag("adafactor", "optimiser", OPT, choices=OPTIMIZERS)
    lr: float | None = _flag(None, "peak learning rate (default: 1e-3 Adafactor, 3e-4 AdamW)", OPT)
    weight_decay: float = _flag(0.0, "decoupled weight decay", OPT)
    warmup_steps: int = _flag(0, "linear warm-up steps", OPT)
    schedule: str = _flag("linear", "decay after warm-up", OPT, choices=SCHEDULES)
    max_grad_norm: float | None = _flag(1.0, "gradient clipping norm; 0 or none: no clipping", OPT,
                                        type=_float_or_none)
    precision: str = _flag("auto", "auto: bf16 mixed precision on CUDA with bf16 and on CPUs that run "
                           "bf16 natively and faster (engine.capabilities), else fp32", OPT,
                           choices=PRECISIONS)
    gradient_checkpointing: bool = _flag(False, "recompute activations in the backward pass", OPT)
    dropout: float | None = _flag(None, "override the model's dropout_rate", OPT)
    # A ranking term beside the NLL: the evaluation ranks candidate titles by their summed
    # log-likelihood, and the NLL alone mostly teaches each title's prior (its popularity). Scoring
    # each row's target against K other targets of its template and adding the softmax
    # cross-entropy of those K + 1 scores trains the history-conditional difference directly.
    rank_negatives: int = _flag(0, "also rank each row's target against this many other targets of its "
                                "template (drawn uniformly from the distinct ones) and add the softmax "
                                "cross-entropy of their summed log-likelihoods to the loss; 0: the plain "
                                "NLL (one process only)", OPT, metavar="K")
    rank_weight: float = _flag(1.0, "weight of the ranking term per row, beside the NLL per target token",
                               OPT)
    # Uniform negatives are mostly easy (another genre, another console); a reranker served by a
    # retriever sees the retriever's look-alikes. Mined ones (`instructrec mine-negatives`) train that.
    rank_negatives_from: str = _flag("template", "where the ranking term's negatives come from: template "
                                     "(other targets of the row's template, uniformly) or mined (the items "
                                     "`instructrec mine-negatives` retrieved for the row's history, as titles of "
                                     "its template; rows with too few are filled uniformly)", OPT,
                                     choices=NEGATIVE_SOURCES)
    # A one-hot target says nothing about how the negatives compare with each other; the retriever
    # that mined them scored them all for the history. Its softmax over [target, negatives] at a
    # temperature is a soft target carrying that collaborative signal (knowledge distillation).
    rank_distill: float = _flag(0.0, "with --rank-negatives-from mined: the ranking term's target is the "
                                "retriever's softmax over the row's target and drawn negatives at this "
                                "temperature (1: its own training logits) instead of the target alone; rows "
                                "with a uniformly filled negative keep the one-hot target; 0: off", OPT,
                                metavar="T")
    # The retriever ranks its own look-alikes above a training row's target on average (it is a
    # retriever, not an oracle): the one-hot target keeps (1 - share) of the mass, so at share <= 0.5
    # the target stays the soft target's top candidate.
    rank_distill_share: float = _flag(DEFAULT_DISTILL_SHARE, "with --rank-distill: the retriever's share of the "
                                      "soft target, the rest on the row's own target (0 < S <= 1)", OPT, metavar="S")
    # The LM head over 32128 tokens is most of a candidate's cost, and the history moves mostly a
    # title's first tokens: ranking by a prefix scores K negatives for a fraction of the price.
    rank_prefix_tokens: int = _flag(0, "rank the candidates by the log-likelihood of their first N tokens "
                                    "(negatives are decoded that far only); 0: whole targets", OPT, metavar="N")
    # Evaluation chooses a score form per scenario on validation (seq-rec mostly picks
    # calibrated:0.5); the ranking term can train the form that will be used to rank. The prior of
    # a calibrated form is the title's log-likelihood under the empty instruction, taken without
    # gradient: a baseline the conditional score has to beat, not a quantity the term trains.
    rank_score: str = _flag("sum", "the candidates' score in the ranking term: sum, mean (per token), "
                            "calibrated or calibrated:W (minus W times the title's log-likelihood under an "
                            "empty instruction), as `instructrec eval --score-forms` names them", OPT,
                            metavar="FORM")

    lora_r: int = _flag(0, "adapter rank; 0: train all weights", LORA)
    lora_alpha: float = _flag(16.0, "adapter scaling", LORA)
    lora_dropout: float = _flag(0.05, "dropout on the adapter input", LORA)
    lora_targets: tuple[str, ...] = _flag(("q", "v"), "comma-separated T5 linear layer names", LORA,
                                          type=_csv)

    eval_every: int = _flag(0, "steps between validations; 0: at the end only", EVAL)
    eval_max_rows: int = _flag(512, "valid rows for the loss; 0: all", EVAL)
    eval_max_instances: int = _flag(500, "sequential-recommendation instances ranked through the "
                                    "engine, per template (T3 listed, T2 unlisted); 0: all", EVAL)
    rank_eval: bool = _flag(True, "validate the loss only (no HR/NDCG through the engine)", EVAL,
                            flag="--no-rank-eval")
    save_every: int = _flag(0, "steps between checkpoints; 0: only when stopped early", EVAL)
    keep_checkpoints: int = _flag(2, "checkpoints kept (the newest)", EVAL)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def resolved_pad_multiple(self, precision: str, device_type: str) -> int:
        """--pad-to-multiple, or its default for the run's resolved precision and device."""
        if self.pad_to_multiple is not None:
            return self.pad_to_multiple
        from .tune_data import SHAPE_MULTIPLE

        return SHAPE_MULTIPLE if precision == "bf16" and device_type == "cpu" else 1

    def resolved_spell_rows(self) -> float:
        """--spell-rows, or its default: 0.2 with --item-tokens, else 0."""
        if self.spell_rows is not None:
            return self.spell_rows
        return DEFAULT_SPELL_ROWS if self.item_tokens else 0.0

    def curve_fields(self, global_batch_size: int) -> dict:
        values = {name: getattr(self, name) for name in _CURVE_FIELDS}
        values["lr"] = self.resolved_lr()
        values["lora_targets"] = list(self.lora_targets)
        values["global_batch_size"] = global_batch_size
        if self.init_embeddings != "random":  # only when set: older checkpoints predate the field
            values["init_embeddings"] = self.init_embeddings
        if self.compact_vocab:  # only when on, as above
            values["compact_vocab"] = True
        if self.prior_rows:  # only when set, as above
            values["prior_rows"] = self.prior_rows
        if self.item_tokens:  # only when on, as above
            values.update(item_tokens=True, spell_rows=self.resolved_spell_rows())
        if self.rank_negatives:  # only when on: checkpoints of plain-NLL runs predate these fields
            values.update(rank_negatives=self.rank_negatives, rank_weight=self.rank_weight,
                          rank_prefix_tokens=self.rank_prefix_tokens)
            if self.rank_score != "sum":  # only when set, as above
                values["rank_score"] = self.rank_score
            if self.rank_negatives_from != "template":  # only when set, as above
                values["rank_negatives_from"] = self.rank_negatives_from
            if self.rank_distill:  # only when set, as above
                values.update(rank_distill=self.rank_distill, rank_distill_share=self.rank_distill_share)
        return values

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def validate_config(cfg: TrainConfig) -> None:
    """Raise `InputError` for the first bad setting, naming its flag."""
    def positive_int(name, value):
        if not isinstance(value, int) or value < 1:
            raise InputError(name, f"must be a positive integer, got {value!r}")

    def non_negative_int(name, value):
        if not isinstance(value, int) or value < 0:
            raise InputError(name, f"must be an integer >= 0, got {value!r}")

    for name in ("max_source_length", "max_target_length", "batch_size", "grad_accum", "keep_checkpoints"):
        positive_int(name, getattr(cfg, name))
    if cfg.threads is not None:
        positive_int("threads", cfg.threads)
    if cfg.pad_to_multiple is not None:
        positive_int("pad_to_multiple", cfg.pad_to_multiple)
    for name in ("warmup_steps", "rank_negatives", "rank_prefix_tokens", "eval_every", "save_every", "eval_max_rows",
                 "eval_max_instances", "lora_r"):
        non_negative_int(name, getattr(cfg, name))
    if not (isinstance(cfg.prior_rows, (int, float)) and math.isfinite(cfg.prior_rows) and 0 <= cfg.prior_rows <= 1):
        raise InputError("prior_rows", f"must be a fraction of the training rows in [0, 1], got {cfg.prior_rows!r}",
                         "e.g. 0.1 adds a tenth of the rows as title-prior rows; 0 adds none")
    if cfg.max_source_length < 2 or cfg.max_target_length < 2:
        raise InputError("max_source_length/max_target_length",
                         "must leave room for at least one token plus </s>", "use 2 or more")
    if cfg.max_steps is not None:
        positive_int("max_steps", cfg.max_steps)
    elif not (isinstance(cfg.epochs, (int, float)) and math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise InputError("epochs", f"must be a positive number, got {cfg.epochs!r}", "or set max_steps")
    if cfg.stop_after is not None:
        positive_int("stop_after", cfg.stop_after)
        if cfg.max_steps is not None and cfg.stop_after >= cfg.max_steps:
            raise InputError("stop_after", f"{cfg.stop_after} >= max_steps {cfg.max_steps}: it would never "
                             "stop early", "drop --stop-after or lower it")
    if cfg.max_minutes is not None and not (
            isinstance(cfg.max_minutes, (int, float)) and math.isfinite(cfg.max_minutes) and cfg.max_minutes > 0):
        raise InputError("max_minutes", f"must be a positive number of minutes, got {cfg.max_minutes!r}",
                         "drop it to train for the full step budget")
    _check_choices(cfg)
    lr = cfg.resolved_lr()
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError("lr", f"must be a positive finite number, got {lr!r}")
    if cfg.rank_negatives and not (isinstance(cfg.rank_weight, (int, float)) and math.isfinite(cfg.rank_weight)
                                   and cfg.rank_weight > 0):
        raise InputError("rank_weight", f"must be a positive number, got {cfg.rank_weight!r}",
                         "or drop --rank-negatives for the plain NLL")
    parse_score_form(cfg.rank_score, field="rank_score")
    if cfg.rank_negatives_from != "template" and not cfg.rank_negatives:
        raise InputError("rank_negatives_from", f"{cfg.rank_negatives_from!r} feeds the ranking term, which is off",
                         "add --rank-negatives K, or drop --rank-negatives-from")
    if cfg.rank_distill:
        temperature = cfg.rank_distill
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise InputError("rank_distill", f"must be a positive temperature, got {cfg.rank_distill!r}",
                             "e.g. 1 (the retriever's own logits), or 0 for the one-hot target")
        share = cfg.rank_distill_share
        if not (isinstance(share, (int, float)) and math.isfinite(share) and 0 < share <= 1):
            raise InputError("rank_distill_share", f"must be in (0, 1], got {share!r}",
                             "e.g. 0.5: half the soft target the retriever's, half the row's own target")
        if cfg.rank_negatives_from != "mined":
            raise InputError("rank_distill", "distils the scores of mined negatives, and this run's come from "
                             f"{cfg.rank_negatives_from!r}", "add --rank-negatives K --rank-negatives-from mined")
    elif cfg.rank_distill_share != DEFAULT_DISTILL_SHARE:
        raise InputError("rank_distill_share", f"{cfg.rank_distill_share!r} shares the soft target of --rank-distill, "
                         "which is off", "add --rank-distill T, or drop --rank-distill-share")
    if cfg.rank_score != "sum" and not cfg.rank_negatives:
        raise InputError("rank_score", f"{cfg.rank_score!r} scores the ranking term, which is off",
                         "add --rank-negatives K, or drop --rank-score")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise InputError("weight_decay", f"must be >= 0, got {cfg.weight_decay!r}")
    if cfg.max_grad_norm is not None and not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise InputError("max_grad_norm", f"must be >= 0 (0: no clipping), got {cfg.max_grad_norm!r}")
    for name in ("dropout", "lora_dropout"):
        value = getattr(cfg, name)
        if value is not None and not (0.0 <= value < 1.0):
            raise InputError(name, f"must lie in [0, 1), got {value!r}")
    if cfg.item_tokens and not cfg.compact_vocab:
        raise InputError("item_tokens", "adds tokens to the compact vocabulary", "add --compact-vocab, or drop --item-tokens")
    if cfg.item_tokens and cfg.init_embeddings != "random":
        raise InputError("item_tokens", f"a title token has no text vector for --init-embeddings {cfg.init_embeddings}",
                         "drop one of --item-tokens and --init-embeddings")
    if cfg.spell_rows is not None:
        if not cfg.item_tokens:
            raise InputError("spell_rows", "spells the titles --item-tokens gives a token", "add --item-tokens, or drop --spell-rows")
        if not (math.isfinite(cfg.spell_rows) and 0.0 <= cfg.spell_rows <= 1.0):
            raise InputError("spell_rows", f"must be a fraction of the training rows in [0, 1], got {cfg.spell_rows!r}")
    if cfg.vocab_catalog is not None and not cfg.compact_vocab:
        raise InputError("vocab_catalog", "only shapes a compact vocabulary", "add --compact-vocab, or drop --vocab-catalog")
    if cfg.lora_r and not cfg.lora_targets:
        raise InputError("lora_targets", "is empty", "name T5 linear layers, e.g. q,v or q,k,v,o")
    if cfg.lora_r and not (cfg.lora_alpha > 0):
        raise InputError("lora_alpha", f"must be positive, got {cfg.lora_alpha!r}")


def _check_choices(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise InputError("optimizer", f"unknown optimiser {cfg.optimizer!r}", f"use one of: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise InputError("schedule", f"unknown schedule {cfg.schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
    if cfg.precision == "fp16":
        raise InputError("precision", "fp16 is not supported: T5 activations overflow float16", "use bf16 or fp32")
    if cfg.precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision {cfg.precision!r}", f"use one of: {', '.join(PRECISIONS)}")
    if cfg.rank_negatives_from not in NEGATIVE_SOURCES:
        raise InputError("rank_negatives_from", f"unknown source {cfg.rank_negatives_from!r}",
                         f"use one of: {', '.join(NEGATIVE_SOURCES)}")
    if cfg.init_embeddings not in INIT_EMBEDDINGS:
        raise InputError("init_embeddings", f"unknown initialisation {cfg.init_embeddings!r}",
                         f"use one of: {', '.join(INIT_EMBEDDINGS)}")
    if cfg.report_to not in TRACKERS:
        raise InputError("report_to", f"unknown tracker {cfg.report_to!r}", f"use one of: {', '.join(TRACKERS)}")
    if cfg.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", cfg.device):
        raise InputError("device", f"unknown device {cfg.device!r}", "use auto, cpu, cuda or cuda:N")
