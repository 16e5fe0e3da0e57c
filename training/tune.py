"""Instruction tuning: train a T5 checkpoint (or a randomly initialised preset) on the instruction
dataset with the plain sequence-to-sequence objective, NLL of the target given the instruction.

`train(TrainConfig(...))` is the whole pipeline; `instructrec train` (tune_cli.py) maps flags onto
the config one to one. The stages, in order:

1. Check everything that can be checked before a single step: hyper-parameters, the dataset's
   columns and row counts, the model source, the tokenizer against the model's vocabulary, the
   validation instances. Each problem is an `InputError` naming the field and the fix.
2. Tokenize every row once into flat int32 arrays (a 100k-row dataset of ~300-token instructions
   is ~120 MB as int32, ~2.4 GB as Python lists).
3. Train. The data order is a pure function of (seed, epoch): one seeded permutation per epoch,
   optionally grouped by length. An optimiser step sums the token NLL over `grad_accum`
   micro-batches and divides by their total target-token count, so accumulation gives the same
   gradient as one big batch (a per-micro-batch mean would weight short targets more).
4. Periodically: loss on a fixed subset of valid rows, and HR@1 / NDCG@5 on the sequential-
   recommendation validation instances ranked by `instructrec.engine.Reranker`, the inference
   path itself (training holds no scorer of its own).
5. Checkpoints (`OUT/checkpoints/step-NNNNNN/`): the model in `save_pretrained` layout with the
   tokenizer, and `trainer_state.pt` with optimiser, scheduler, RNG (python, numpy, torch) and
   data-order state (epoch, position). `--resume` continues from the newest one and reproduces
   the uninterrupted run's per-step losses (tested to 1e-6 in fp32 on CPU).
6. The final model in `OUT/` itself (so `OUT` is a checkpoint directory the engine loads),
   `OUT/metrics.jsonl` (one record per step and per evaluation), `OUT/loss_curve.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError, ModelLoadError

from .presets import preset_config

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ("instruction", "target", "template")
# Columns that select and rank the sequential-recommendation validation instances.
SEQREC_COLUMNS = ("preference", "intention", "task", "scenario", "candidates", "candidate_ids",
                  "target_item_id")
SEQREC_FILTER = dict(preference="P1", intention="I0", task="T3", scenario="recommendation")

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Defaults per optimiser. Adafactor 1e-3 constant is the T5 fine-tuning recipe (T5 paper, sec.
# 3.1.2; the settings transformers documents for Adafactor fine-tuning); AdamW 3e-4 is the usual
# safe value for encoder-decoders of this size.
DEFAULT_LR = {"adafactor": 1e-3, "adamw": 3e-4}
# Length grouping sorts rows by source length inside windows of this many batches, then shuffles
# the batches: padding falls from ~45% to ~3% of source tokens on the Video Games instructions
# (the template mixture spans 40 to 500 tokens) while each batch still mixes templates.
LENGTH_GROUP_WINDOW_BATCHES = 64
STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1
# Fields that change the loss curve: a resumed run must agree with its checkpoint on all of them.
_CURVE_FIELDS = ("model", "max_source_length", "max_target_length", "batch_size", "grad_accum",
                 "max_steps", "epochs", "optimizer", "lr", "weight_decay", "warmup_steps",
                 "schedule", "max_grad_norm", "precision", "dropout", "lora_r", "lora_alpha",
                 "lora_dropout", "lora_targets", "length_grouped", "seed")


@dataclass
class TrainConfig:
    instructions: Path
    model: str  # a checkpoint directory or a preset name (presets.PRESETS)
    out: Path
    tokenizer: Path | None = None  # default: the model directory, when it holds a tokenizer
    max_source_length: int = 512
    max_target_length: int = 64
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # optimiser steps; None: `epochs` passes over train.parquet
    epochs: float = 1.0
    optimizer: str = "adafactor"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    precision: str = "auto"  # auto: bf16 on CUDA with bf16 and on CPUs with AMX, else fp32
    gradient_checkpointing: bool = False
    dropout: float | None = None  # None: the model's own dropout_rate
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (needs the `lora` extra: peft)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")
    length_grouped: bool = True
    eval_every: int = 0  # optimiser steps between validations; 0: only at the end
    eval_max_rows: int = 512  # valid rows for the loss; 0: all
    eval_max_instances: int = 500  # sequential-recommendation instances for HR/NDCG; 0: all
    rank_eval: bool = True  # HR/NDCG through the engine at each validation (False: loss only)
    save_every: int = 0  # optimiser steps between checkpoints; 0: only when stopped early
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int | None = None  # save a checkpoint and stop at this step count (job splits)
    # Wall-clock cap in minutes (from the start of `train`): after the step that crosses it, save
    # a resumable checkpoint, validate, and write the current weights to OUT as the final model,
    # so a run on a shared machine ends on time with a model the engine loads.
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    progress: bool = True

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def curve_fields(self) -> dict:
        values = {name: getattr(self, name) for name in _CURVE_FIELDS}
        values["lr"] = self.resolved_lr()
        values["lora_targets"] = list(self.lora_targets)
        return values

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    out: Path
    steps_done: int  # optimiser steps completed in total (resumed ones included)
    total_steps: int
    stopped_early: bool  # stop_after, an interrupt or max_minutes: a checkpoint was saved
    step_losses: dict[int, float] = field(default_factory=dict)  # steps run by this call (1-based)
    evaluations: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None  # the newest checkpoint written by this call
    time_capped: bool = False  # max_minutes ended the run (OUT still holds the model, validated)
    wall_s: float = 0.0
    examples_per_s: float = 0.0
    precision: str = "fp32"


# ---------------------------------------------------------------------------------------------
# Checks before training


def validate_config(cfg: TrainConfig) -> None:
    """Raise `InputError` for the first bad hyper-parameter, naming its flag."""
    def positive_int(name, value):
        if not isinstance(value, int) or value < 1:
            raise InputError(name, f"must be a positive integer, got {value!r}")

    def non_negative_int(name, value):
        if not isinstance(value, int) or value < 0:
            raise InputError(name, f"must be an integer >= 0, got {value!r}")

    for name in ("max_source_length", "max_target_length", "batch_size", "grad_accum",
                 "keep_checkpoints"):
        positive_int(name, getattr(cfg, name))
    if cfg.threads is not None:
        positive_int("threads", cfg.threads)
    for name in ("warmup_steps", "eval_every", "save_every", "eval_max_rows",
                 "eval_max_instances", "lora_r"):
        non_negative_int(name, getattr(cfg, name))
    if cfg.max_source_length < 2 or cfg.max_target_length < 2:
        raise InputError("max_source_length/max_target_length",
                         "must leave room for at least one token plus </s>", "use 2 or more")
    if cfg.max_steps is not None:
        positive_int("max_steps", cfg.max_steps)
    elif not (isinstance(cfg.epochs, (int, float)) and math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise InputError("epochs", f"must be a positive number, got {cfg.epochs!r}",
                         "or set max_steps")
    if cfg.stop_after is not None:
        positive_int("stop_after", cfg.stop_after)
        if cfg.max_steps is not None and cfg.stop_after >= cfg.max_steps:
            raise InputError("stop_after", f"{cfg.stop_after} >= max_steps {cfg.max_steps}: it would never stop early",
                             "drop --stop-after or lower it")
    if cfg.max_minutes is not None and not (
            isinstance(cfg.max_minutes, (int, float)) and math.isfinite(cfg.max_minutes)
            and cfg.max_minutes > 0):
        raise InputError("max_minutes", f"must be a positive number of minutes, got {cfg.max_minutes!r}",
                         "drop it to train for the full step budget")
    if cfg.optimizer not in OPTIMIZERS:
        raise InputError("optimizer", f"unknown optimiser {cfg.optimizer!r}",
                         f"use one of: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise InputError("schedule", f"unknown schedule {cfg.schedule!r}",
                         f"use one of: {', '.join(SCHEDULES)}")
    if cfg.precision == "fp16":
        raise InputError("precision", "fp16 is not supported: T5 activations overflow float16",
                         "use bf16 or fp32")
    if cfg.precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision {cfg.precision!r}",
                         f"use one of: {', '.join(PRECISIONS)}")
    lr = cfg.resolved_lr()
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError("lr", f"must be a positive finite number, got {lr!r}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise InputError("weight_decay", f"must be >= 0, got {cfg.weight_decay!r}")
    if cfg.max_grad_norm is not None and not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise InputError("max_grad_norm", f"must be >= 0 (0: no clipping), got {cfg.max_grad_norm!r}")
    for name in ("dropout", "lora_dropout"):
        value = getattr(cfg, name)
        if value is not None and not (0.0 <= value < 1.0):
            raise InputError(name, f"must lie in [0, 1), got {value!r}")
    if cfg.lora_r and not cfg.lora_targets:
        raise InputError("lora_targets", "is empty", "name T5 linear layers, e.g. q,v or q,k,v,o")
    if cfg.lora_r and not (cfg.lora_alpha > 0):
        raise InputError("lora_alpha", f"must be positive, got {cfg.lora_alpha!r}")
    if cfg.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", cfg.device):
        raise InputError("device", f"unknown device {cfg.device!r}", "use auto, cpu, cuda or cuda:N")


def _read_split(path: Path, required: tuple[str, ...], label: str):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError("instructions", f"{path} does not exist",
                         "point --instructions at the folder written by `instructrec instructions build`")
    table = pq.read_table(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InputError(f"{label}: columns", f"{path} lacks column(s) {', '.join(missing)}",
                         "rebuild it with `instructrec instructions build`")
    if table.num_rows == 0:
        raise InputError(label, f"{path} has no rows",
                         "build the instructions from a non-empty split, or check its filters")
    for column in ("instruction", "target"):
        if column in required and table.column(column).null_count:
            raise InputError(f"{label}: {column}",
                             f"{table.column(column).null_count} null value(s) in {path}",
                             "drop or fill those rows")
    return table


def _detect_amx() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_device_and_precision(cfg: TrainConfig):
    import torch

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device", f"{cfg.device} asked for but CUDA is not available",
                             "use --device cpu or auto")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        # bf16 matmuls on AMX run ~7x the fp32 rate here; without AMX (AVX512-BF16 at best)
        # autocast bf16 is usually no faster than fp32 on CPU, so auto stays fp32.
        bf16_ok = _detect_amx()
    if cfg.precision == "auto":
        precision = "bf16" if bf16_ok else "fp32"
    elif cfg.precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise InputError("precision", "bf16 asked for but this GPU has no bf16 support",
                         "use --precision fp32")
    else:
        precision = cfg.precision
    return device, precision


def _model_config(cfg: TrainConfig):
    """(T5Config, checkpoint directory or None). A directory wins over a preset of the same name."""
    from transformers import AutoConfig

    path = Path(cfg.model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model: {path} holds no config.json (not a save_pretrained checkpoint)")
        config = AutoConfig.from_pretrained(path)
        if config.model_type != "t5":
            raise InputError("model", f"{path} is a {config.model_type!r} model, not T5",
                             "pass a T5 / Flan-T5 checkpoint")
        checkpoint = path
    else:
        config = preset_config(cfg.model)
        checkpoint = None
    if cfg.dropout is not None:
        config.dropout_rate = cfg.dropout
    config.use_cache = False
    return config, checkpoint


def _load_tokenizer(cfg: TrainConfig, checkpoint: Path | None):
    from transformers import AutoTokenizer

    source = cfg.tokenizer if cfg.tokenizer is not None else checkpoint
    if source is None:
        raise InputError("tokenizer", f"model {cfg.model!r} is a preset, which has no tokenizer",
                         "pass --tokenizer DIR (e.g. ../shared/assets/flan-t5-tokenizer)")
    source = Path(source)
    if not source.is_dir():
        raise InputError("tokenizer", f"{source} is not a directory", "pass a tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InputError("tokenizer", f"cannot load a tokenizer from {source}: {exc}",
                         "pass a folder written by save_pretrained (tokenizer.json or spiece.model)") from exc
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise InputError("tokenizer", f"{source} defines no pad or eos token", "use a T5 tokenizer")
    return tokenizer


def check_vocabulary(tokenizer, model_config) -> None:
    """The tokenizer's ids must all index the model's embedding (T5: 32100 tokens in 32128 rows)."""
    if len(tokenizer) > model_config.vocab_size:
        raise InputError(
            "tokenizer", f"has {len(tokenizer)} tokens but the model's vocabulary holds "
            f"{model_config.vocab_size} (ids past it would index outside the embedding)",
            "use the tokenizer the model was trained with, or a model of vocab_size >= "
            f"{len(tokenizer)}")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class TokenizedRows:
    """Sources and targets as flat int32 arrays with row offsets (row i: flat[off[i]:off[i+1]])."""

    source_flat: np.ndarray
    source_offsets: np.ndarray
    target_flat: np.ndarray
    target_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.source_offsets) - 1

    @property
    def source_lengths(self) -> np.ndarray:
        return np.diff(self.source_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.source_flat[self.source_offsets[i]:self.source_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.target_flat[self.target_offsets[i]:self.target_offsets[i + 1]]


def _tokenize_column(tokenizer, texts: list[str], max_length: int, label: str):
    """Token ids with </s>; rows over `max_length` keep their first max_length-1 tokens + </s>."""
    eos = tokenizer.eos_token_id
    pieces, offsets, truncated = [], [0], 0
    for start in range(0, len(texts), 4096):
        for ids in tokenizer(texts[start:start + 4096], add_special_tokens=True)["input_ids"]:
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [eos]
                truncated += 1
            pieces.append(np.asarray(ids, dtype=np.int32))
            offsets.append(offsets[-1] + len(ids))
    if truncated:
        log.warning("%s: %d of %d rows exceed %d tokens and were truncated (raise the limit to keep them)",
                    label, truncated, len(texts), max_length)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return flat, np.asarray(offsets, dtype=np.int64)


def tokenize_rows(tokenizer, instructions: list[str], targets: list[str], cfg: TrainConfig,
                  label: str) -> TokenizedRows:
    sf, so = _tokenize_column(tokenizer, instructions, cfg.max_source_length, f"{label} instructions")
    tf, to = _tokenize_column(tokenizer, targets, cfg.max_target_length, f"{label} targets")
    return TokenizedRows(sf, so, tf, to)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  length_grouped: bool) -> list[np.ndarray]:
    """The micro-batches of one epoch, a pure function of (seed, epoch): resuming needs only the
    epoch and the position in this list."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not length_grouped:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * LENGTH_GROUP_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """Endless micro-batches over epochs; (epoch, position) is the whole data-order state."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, length_grouped: bool,
                 epoch: int = 0, position: int = 0):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.length_grouped = length_grouped
        self.epoch, self.position = epoch, position
        self.batches = epoch_batches(lengths, batch_size, seed, epoch, length_grouped)

    def __next__(self) -> np.ndarray:
        if self.position >= len(self.batches):
            self.epoch += 1
            self.position = 0
            self.batches = epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch,
                                         self.length_grouped)
        batch = self.batches[self.position]
        self.position += 1
        return batch

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.position / len(self.batches)


def collate(rows: TokenizedRows, indices: np.ndarray, pad_id: int, device):
    """input_ids/attention_mask [B, S] right-padded with pad; labels [B, T] padded with -100."""
    import torch

    sources = [rows.source(i) for i in indices]
    targets = [rows.target(i) for i in indices]
    src_len = max(len(s) for s in sources)
    tgt_len = max(len(t) for t in targets)
    input_ids = np.full((len(indices), src_len), pad_id, dtype=np.int64)
    attention = np.zeros((len(indices), src_len), dtype=np.int64)
    labels = np.full((len(indices), tgt_len), -100, dtype=np.int64)
    for r, (s, t) in enumerate(zip(sources, targets)):
        input_ids[r, :len(s)] = s
        attention[r, :len(s)] = 1
        labels[r, :len(t)] = t
    return (torch.from_numpy(input_ids).to(device), torch.from_numpy(attention).to(device),
            torch.from_numpy(labels).to(device))


@dataclass
class SeqRecInstance:
    instruction: str
    candidates: list[str]
    candidate_ids: list[str]
    positive_id: str


def seqrec_instances(table, path: Path) -> list[SeqRecInstance]:
    """Valid rows P1/I0/T3/recommendation: one positive among listed candidates."""
    columns = {c: table.column(c).to_pylist() for c in ("instruction", *SEQREC_COLUMNS)}
    instances = []
    for i in range(table.num_rows):
        if any(columns[k][i] != v for k, v in SEQREC_FILTER.items()):
            continue
        candidates, ids, positive = columns["candidates"][i], columns["candidate_ids"][i], columns["target_item_id"][i]
        if not candidates or not ids or len(candidates) != len(ids):
            raise InputError("valid: candidates", f"row {i} of {path} has {len(candidates or [])} "
                             f"candidates and {len(ids or [])} candidate_ids",
                             "rebuild the instructions: T3 rows list aligned candidates and ids")
        if positive not in ids:
            raise InputError("valid: target_item_id", f"row {i} of {path}: {positive!r} is not "
                             "among its candidate_ids", "rebuild the instructions")
        instances.append(SeqRecInstance(columns["instruction"][i], list(candidates), list(ids), positive))
    return instances


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of `limit` row indices in ascending order (all when limit is 0)."""
    if limit == 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7919]).choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def _require_peft():
    try:
        import peft
    except ImportError as exc:
        raise InputError("lora_r", "LoRA needs the peft package, which is not installed",
                         "pip install 'instructrec[lora]' (or pip install peft)") from exc
    return peft


def build_model(cfg: TrainConfig, config, checkpoint: Path | None, resume_dir: Path | None, device):
    """The trainable model: weights from the resume checkpoint, else the given checkpoint, else a
    seeded random init of the preset; LoRA adapters wrapped around it when lora_r > 0."""
    import torch
    from transformers import T5ForConditionalGeneration

    full_weights = resume_dir if (resume_dir is not None and not cfg.lora_r) else checkpoint
    torch.manual_seed(cfg.seed)
    if full_weights is not None:
        try:
            model = T5ForConditionalGeneration.from_pretrained(full_weights, config=config,
                                                               dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model: cannot load weights from {full_weights}: {exc}") from exc
    else:
        model = T5ForConditionalGeneration(config)
        # HF draws an untied LM head with std 1.0, so initial logits have std ~sqrt(d_model)
        # (16 for t5-mini) and the first losses are 35-70 nats; std d_model^-0.5 (the Mesh TF
        # init of T5 v1.1's separate logits layer) starts near log(32128) = 10.4 instead.
        with torch.no_grad():
            model.lm_head.weight.mul_(config.d_model ** -0.5)
    if cfg.lora_r:
        peft = _require_peft()
        if resume_dir is not None:
            model = peft.PeftModel.from_pretrained(model, resume_dir / "adapter", is_trainable=True)
        else:
            lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                   target_modules=list(cfg.lora_targets), task_type="SEQ_2_SEQ_LM")
            try:
                model = peft.get_peft_model(model, lora)
            except ValueError as exc:
                raise InputError("lora_targets", str(exc), "T5 linear layers are q, k, v, o, wi_0, wi_1, wo") from exc
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and keeps dropout's RNG.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def hf_model_of(model):
    """The plain T5ForConditionalGeneration under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_optimizer(cfg: TrainConfig, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.resolved_lr()
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed external lr (relative_step False) so warm-up and decay come from the schedule,
        # and scale_parameter False: with it Adafactor multiplies lr by each tensor's RMS, which on
        # a random init ranges 0.05 (embeddings) to 1 (norms) and would make lr mean a different
        # thing per tensor. Update clipping at RMS 1.0 and decay -0.8 are the paper's defaults.
        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False,
                         warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                         weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based): linear warm-up reaching the
    peak at step warmup-1, then linear / cosine decay towards 0 at step `total`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule))


def sequence_nll_sum(model, input_ids, attention_mask, labels, autocast):
    """Summed token NLL of `labels` (-100 ignored) and the count of target tokens.

    The loss is computed here (not by HF's mean) so that accumulated micro-batches are weighted
    by their token counts; log-softmax runs in fp32 even under bf16 autocast.
    """
    import torch
    import torch.nn.functional as F

    # Teacher forcing: decoder input = labels shifted right behind decoder_start (pad, id 0),
    # -100 read as pad. Passing labels instead would make HF compute a second, mean loss.
    decoder_input_ids = hf_model_of(model)._shift_right(labels)
    with autocast():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=decoder_input_ids).logits
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


# ---------------------------------------------------------------------------------------------
# Validation


def validation_loss(model, rows: TokenizedRows, cfg: TrainConfig, pad_id: int, device, autocast) -> float:
    import torch

    order = np.argsort(-rows.source_lengths, kind="stable")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), cfg.batch_size):
            ids, mask, labels = collate(rows, order[start:start + cfg.batch_size], pad_id, device)
            nll, n = sequence_nll_sum(model, ids, mask, labels, autocast)
            total += float(nll)
            tokens += n
    return total / tokens


def seqrec_validation(model, tokenizer, instances: list[SeqRecInstance], device, precision: str,
                      max_source_tokens: int = 512) -> dict:
    """HR@1/3/5 and NDCG@3/5 of `instances` ranked by the engine on the in-memory model."""
    import copy

    from instructrec.engine import Reranker, Request

    from .metrics import rank_in_result, summarize_ranks

    hf_model = model
    if hasattr(model, "merge_and_unload"):
        # The engine reads plain T5 weights; merge a copy so the adapters keep training unmerged
        # (merge + unmerge in place would perturb the frozen base by fp32 rounding).
        hf_model = copy.deepcopy(model).merge_and_unload()
    # from_model copies the weights into the engine's own layout, so training never shares them.
    reranker = Reranker.from_model(hf_model, tokenizer, device=str(device),
                                   dtype="bfloat16" if precision == "bf16" else "float32",
                                   max_source_tokens=max_source_tokens)
    requests = [Request(instruction=x.instruction, candidates=x.candidates,
                        candidate_ids=x.candidate_ids, request_id=str(i))
                for i, x in enumerate(instances)]
    results = reranker.rank(requests, errors="return")
    ranks, errors = [], 0
    for instance, result in zip(instances, results, strict=True):
        if result.error is not None:
            errors += 1
            if errors <= 3:
                log.warning("validation instance %s failed in the engine: %s", result.request_id, result.error)
            ranks.append(len(instance.candidates) + 1)  # a failure counts as a miss
            continue
        ranks.append(rank_in_result(result.ranked_ids, result.scores, instance.positive_id))
    summary = summarize_ranks(ranks)
    summary["errors"] = errors
    return summary


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(model, tokenizer, directory: Path, merge_lora: bool) -> None:
    """`save_pretrained` layout with the tokenizer. LoRA: the adapter in `adapter/` (resumable),
    or merged into the base weights (`merge_lora`, the final model the engine loads)."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        if merge_lora:
            model.merge_and_unload().save_pretrained(directory)
        else:
            model.save_pretrained(directory / "adapter")
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, stream: BatchStream,
                    cfg: TrainConfig, examples_seen: int) -> Path:
    """Write to a temporary folder and rename, so a crash never leaves a half checkpoint that
    --resume would pick up."""
    import torch

    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".staging-step-{step:06d}"
    if staging.exists():
        shutil.rmtree(staging)
    save_model(model, tokenizer, staging, merge_lora=False)
    torch.save({
        "version": STATE_VERSION, "step": step, "epoch": stream.epoch, "position": stream.position,
        "examples_seen": examples_seen, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": _rng_state(), "config": cfg.to_json(),
        "curve_fields": cfg.curve_fields(),
    }, staging / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def _load_state(checkpoint: Path, cfg: TrainConfig) -> dict:
    import torch

    # weights_only=False: the file holds numpy and python RNG states; it is one this program
    # wrote into the user's own output folder.
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("version") != STATE_VERSION:
        raise ModelLoadError(f"resume: {checkpoint / STATE_FILE} has version {state.get('version')}, "
                             f"this program writes {STATE_VERSION}")
    saved, now = state["curve_fields"], cfg.curve_fields()
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if differ:
        raise InputError("resume", "the run's settings differ from the checkpoint's: " + "; ".join(differ),
                         "resume with the original settings (only eval/save/progress/stop flags may change)")
    return state


# ---------------------------------------------------------------------------------------------
# Metrics log and plot


class MetricsLog:
    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is None:
            path.write_text("")
        else:
            # Drop records written after the checkpoint we resume from: the resumed run writes
            # them again, so the file stays one curve.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    ranked = [r for r in evals if "hr@1" in r]
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(11 if ranked else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train (per step)")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"train ({window}-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["valid_loss"] for r in evals], "o-", label="valid")
    if ranked:
        ax2 = axes[0][1]
        for key in ("hr@1", "ndcg@5"):
            ax2.plot([r["step"] for r in ranked], [r[key] for r in ranked], "o-", label=key.upper())
        ax2.set_xlabel("optimiser step")
        ax2.set_title("sequential recommendation (valid)")
        ax2.set_ylim(0, 1)
        ax2.legend()
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("token NLL")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Interrupts


class _StopRequest:
    """SIGINT asks for a checkpoint at the end of the current step; a second one aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving a checkpoint after this step (interrupt again to abort)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training run; see the module docstring for the stages."""
    import torch

    validate_config(cfg)
    if cfg.threads is None:
        return _train(cfg)
    # The thread count is process-wide: set it for this run only.
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: TrainConfig) -> TrainResult:
    import contextlib

    import torch
    from tqdm import tqdm

    started = time.perf_counter()
    cfg.out = Path(cfg.out)
    instructions = Path(cfg.instructions)
    device, precision = resolve_device_and_precision(cfg)

    # --- checks before training -----------------------------------------------------------
    train_table = _read_split(instructions / "train.parquet", TRAIN_COLUMNS, "train")
    valid_table = _read_split(instructions / "valid.parquet",
                              TRAIN_COLUMNS + (SEQREC_COLUMNS if cfg.rank_eval else ()), "valid")
    model_config, checkpoint = _model_config(cfg)
    tokenizer = _load_tokenizer(cfg, checkpoint)
    check_vocabulary(tokenizer, model_config)
    if cfg.lora_r:
        _require_peft()
    instances: list[SeqRecInstance] = []
    if cfg.rank_eval:
        instances = seqrec_instances(valid_table, instructions / "valid.parquet")
        if not instances:
            raise InputError("valid", f"{instructions / 'valid.parquet'} has no sequential-recommendation "
                             "instances (preference P1, intention I0, task T3, scenario recommendation)",
                             "build the instructions with that template family included, or pass --no-rank-eval")
        import instructrec.engine as engine_module

        if not hasattr(engine_module, "Reranker"):
            raise InstructRecError("validation ranks through instructrec.engine.Reranker, which this "
                                   "installation lacks (pass --no-rank-eval for loss-only validation)")

    resume_dir = None
    if cfg.resume:
        found = _checkpoints(cfg.out)
        if not found:
            raise InputError("resume", f"no checkpoint under {cfg.out / 'checkpoints'}",
                             "drop --resume to start a new run, or point --out at the interrupted run")
        resume_dir = found[-1]
        state = _load_state(resume_dir, cfg)
    elif (cfg.out / "metrics.jsonl").exists() or _checkpoints(cfg.out):
        raise InputError("out", f"{cfg.out} already holds a training run",
                         "pass --resume to continue it, or choose another --out")

    # --- data -------------------------------------------------------------------------------
    train_rows = tokenize_rows(tokenizer, train_table.column("instruction").to_pylist(),
                               train_table.column("target").to_pylist(), cfg, "train")
    valid_pick = _subset(valid_table.num_rows, cfg.eval_max_rows, cfg.seed)
    valid_sub = valid_table.take(valid_pick)
    valid_rows = tokenize_rows(tokenizer, valid_sub.column("instruction").to_pylist(),
                               valid_sub.column("target").to_pylist(), cfg, "valid")
    instances = [instances[i] for i in _subset(len(instances), cfg.eval_max_instances, cfg.seed)]
    templates = train_table.column("template").value_counts().to_pylist()
    log.info("train: %d rows over %d templates; valid: %d rows for the loss, %d ranking instances",
             len(train_rows), len(templates), len(valid_rows), len(instances))

    micro_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    # --- model and optimiser ----------------------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, model_config, checkpoint, resume_dir, device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    start_step, examples_seen = 0, 0
    stream = BatchStream(train_rows.source_lengths, cfg.batch_size, cfg.seed, cfg.length_grouped)
    if resume_dir is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        stream = BatchStream(train_rows.source_lengths, cfg.batch_size, cfg.seed, cfg.length_grouped,
                             epoch=state["epoch"], position=state["position"])
        start_step, examples_seen = state["step"], state["examples_seen"]
        if cfg.stop_after is not None and cfg.stop_after <= start_step:
            raise InputError("stop_after", f"the checkpoint is already at step {start_step}",
                             f"pass a --stop-after above {start_step}, or drop it to finish the run")
        log.info("resuming from %s (step %d of %d)", resume_dir, start_step, total_steps)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.1fM trainable parameters; %s on %s; %d steps of %d x %d rows",
             cfg.model, n_trainable / 1e6, precision, device, total_steps, cfg.grad_accum, cfg.batch_size)

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "training_config.json").write_text(json.dumps(
        dict(cfg.to_json(), resolved_precision=precision, resolved_device=str(device),
             total_steps=total_steps), indent=2) + "\n")
    metrics = MetricsLog(cfg.out / "metrics.jsonl", start_step if resume_dir is not None else None)

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    pad_id = tokenizer.pad_token_id
    result = TrainResult(out=cfg.out, steps_done=start_step, total_steps=total_steps,
                         stopped_early=False, precision=precision)

    def evaluate(step: int) -> dict:
        # Eval runs without dropout and consumes no RNG; fork_rng makes that a guarantee, so a
        # run with more evaluations keeps the same training curve.
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            t0 = time.perf_counter()
            record = {"kind": "eval", "step": step,
                      "valid_loss": validation_loss(model, valid_rows, cfg, pad_id, device, autocast),
                      "valid_rows": len(valid_rows)}
            if instances:
                record.update(seqrec_validation(model, tokenizer, instances, device, precision,
                                                cfg.max_source_length))
            record["eval_s"] = round(time.perf_counter() - t0, 3)
        model.train()
        metrics.write(record)
        result.evaluations.append(record)
        if instances:
            log.info("step %d: valid loss %.4f, HR@1 %.4f, NDCG@5 %.4f over %d instances",
                     step, record["valid_loss"], record["hr@1"], record["ndcg@5"], int(record["n"]))
        else:
            log.info("step %d: valid loss %.4f", step, record["valid_loss"])
        return record

    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, disable=not cfg.progress,
               desc="train", unit="step", dynamic_ncols=True)
    # examples/s counts the time of training steps only (not validation or checkpoints).
    train_s, loop_examples = 0.0, 0
    step = start_step
    with _StopRequest() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            step_tokens = sum(int(sum(len(train_rows.target(i)) for i in b)) for b in micro)
            step_nll = 0.0
            optimizer.zero_grad(set_to_none=True)
            for indices in micro:
                ids, mask, labels = collate(train_rows, indices, pad_id, device)
                nll, _ = sequence_nll_sum(model, ids, mask, labels, autocast)
                (nll / step_tokens).backward()
                step_nll += float(nll.detach())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            n_examples = sum(len(b) for b in micro)
            examples_seen += n_examples
            loop_examples += n_examples
            loss = step_nll / step_tokens
            if not math.isfinite(loss):
                raise InstructRecError(f"training diverged: loss {loss} at step {step}; lower --lr "
                                       "or use --precision fp32")
            dt = time.perf_counter() - t0
            train_s += dt
            result.step_losses[step] = loss
            metrics.write({"kind": "train", "step": step, "epoch": round(stream.fractional_epoch, 4),
                           "loss": loss, "lr": lr_used, "examples": n_examples,
                           "target_tokens": step_tokens, "examples_per_s": round(n_examples / dt, 2),
                           "examples_seen": examples_seen})
            rate = loop_examples / train_s
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.1f}", epoch=f"{stream.fractional_epoch:.2f}")
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                evaluate(step)
            out_of_time = (cfg.max_minutes is not None
                           and time.perf_counter() - started >= cfg.max_minutes * 60.0)
            stopping = stop.requested or out_of_time or \
                (cfg.stop_after is not None and step >= cfg.stop_after)
            if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or \
                    (stopping and step < total_steps):
                result.checkpoint = save_checkpoint(cfg.out, step, model, tokenizer, optimizer,
                                                    scheduler, stream, cfg, examples_seen)
            if stopping and step < total_steps:
                result.stopped_early = True
                result.time_capped = out_of_time and not stop.requested
                break
    bar.close()
    result.steps_done = step
    result.examples_per_s = loop_examples / train_s if train_s > 0 else 0.0
    if not result.stopped_early or result.time_capped:
        if result.time_capped:
            log.warning("max_minutes %.1f reached at step %d of %d: the current weights become the "
                        "final model (checkpoint %s resumes the run)", cfg.max_minutes, step,
                        total_steps, result.checkpoint)
        evaluate(step)
        save_model(model, tokenizer, cfg.out, merge_lora=True)
        log.info("final model saved to %s", cfg.out)
    else:
        log.info("stopped at step %d of %d; continue with --resume (checkpoint %s)",
                 step, total_steps, result.checkpoint)
    plot_loss_curve(cfg.out / "metrics.jsonl", cfg.out / "loss_curve.png")
    result.wall_s = time.perf_counter() - started
    return result
