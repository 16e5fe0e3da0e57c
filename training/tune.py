"""Instruction tuning: train a T5 checkpoint (a folder, a Hub id, or random:<shape>) on the
instruction dataset with the plain sequence-to-sequence objective, NLL of the target given the
instruction, on one process or many, through Hugging Face `accelerate`.

`train(TrainConfig(...))` is the whole pipeline; `instructrec train` (tune_cli.py) builds its flags
from TrainConfig. Launch it as it is for one process, or under `torchrun --nproc_per_node N -m
instructrec train ...` / `accelerate launch -m instructrec train ...` for N; DDP, FSDP and DeepSpeed
come from the launcher's accelerate configuration, not from this code
(docs/training-distributed.md, with the Flan-T5-XL FSDP recipe).
The stages, in order:

1. Check everything that can be checked before a single step (tune_config, tune_model,
   tune_data): settings, the dataset's columns and rows, the model source, the tokenizer against
   the model's vocabulary, the validation instances, the output folder. Each problem is an
   `InputError` naming the flag and the fix, raised by every process alike.
2. Tokenize every row once into flat int32 arrays (tune_data).
3. Train. `Accelerator` owns the devices, mixed precision, gradient accumulation (and the DDP
   no-sync on all but the last micro-batch) and state saving. The data order is a pure function
   of (seed, epoch, global batch size) cut into per-process micro-batches (tune_data), and the
   loss of a step is the mean NLL over ALL its target tokens, across micro-batches and processes:
   N processes give the per-step losses of one process with the same global batch.
4. Periodically: the loss on a fixed subset of valid rows, and HR@1 / NDCG@5 ranked by
   `instructrec.engine.Reranker` on the main process (tune_eval); the others wait.
5. Checkpoints (tune_state): `accelerator.save_state` plus the data position, portable across
   world sizes; `--resume` continues the same loss curve. `--max-minutes` fits the learning-rate
   schedule into the cap (tune_schedule).
6. The final model in `OUT/` itself (save_pretrained, with the tokenizer and a model card
   README.md), `OUT/training_config.json`, `OUT/metrics.jsonl`, `OUT/loss_curve.png`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError
from instructrec.engine.flops import T5Shape, training_flops
from instructrec.engine.types import parse_score_form

from .compact_vocab import catalogue_titles, compact_tokenizer, vocab_rows, with_item_tokens, without_added_titles
from .embedding_init import minilm_encoder, require_encoder, warm_start_embeddings
from .tune_config import DEFAULT_LR, TrainConfig, validate_config  # noqa: F401  (the public API)
from .tune_data import (SEQREC_COLUMNS, TRAIN_COLUMNS, BatchStream, NegativePool,  # noqa: F401
                        MINED_COLUMN, MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN, MinedNegativePool, collate,
                        collate_negatives, epoch_batches,
                        head_rows_multiple, process_slots, read_split,
                        seeded_subset, per_template_subset, VALIDATION_SEED, seqrec_instances, tokenize_rows,
                        with_title_prior_rows, SPELLED_TEMPLATE, TITLE_PRIOR_TEMPLATE, spelled_picks, spelled_rows,
                        teacher_targets)
from .tune_eval import engine_device, seqrec_validation, validation_loss, weights_for_engine
from .tune_model import (build_model, build_optimizer, check_vocabulary, load_tokenizer, require_peft,
                         install_fused_activations, install_fused_norms, install_hidden_states_head,
                         resolve_device, resolve_precision, resolve_source, ranked_sequence_losses, sequence_nll_sum)
from .tune_schedule import RefitAnnouncer, StepSchedule, TimeBudget, lr_factor  # noqa: F401
from .tune_state import (STATE_FILE, MetricsLog, list_checkpoints, plot_loss_curve, portable_weights, read_trainer_state,
                         save_checkpoint, write_model_card, STATE_VERSION)

log = logging.getLogger(__name__)

# With --max-minutes, the step budget is refitted to the clock every this many steps (and after
# every evaluation and checkpoint): often enough to follow a shared machine's load, rarely
# enough that a multi-process run's broadcast of the new budget costs nothing measurable.
REFIT_EVERY_STEPS = 10


@dataclass
class TrainResult:
    out: Path
    steps_done: int  # optimiser steps completed in total (resumed ones included)
    total_steps: int  # the schedule's length (fitted by --max-minutes to what fits)
    stopped_early: bool  # stop_after, an interrupt or the hard time cap: a checkpoint was saved
    planned_steps: int = 0  # from max_steps / epochs, before any time fitting
    step_losses: dict[int, float] = field(default_factory=dict)  # steps run by this call (1-based)
    evaluations: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None  # the newest checkpoint written by this call
    time_capped: bool = False  # the cap was crossed before the schedule ended (OUT holds the model)
    wall_s: float = 0.0
    examples_per_s: float = 0.0
    # Model FLOPs of the steps run by this call (engine/flops.py: forward x 3) per second of them,
    # and that rate as a fraction of the measured matmul peak of the precision (CPU only: the
    # probe of engine/capabilities.py at this run's threads, times the processes; None on CUDA).
    model_flops: float = 0.0  # of the steps run by this call (with --rank-negatives, their decoding too)
    model_flops_per_s: float = 0.0
    flop_utilisation: float | None = None
    precision: str = "fp32"
    world_size: int = 1
    global_batch_size: int = 0
    main_process: bool = True


def train(cfg: TrainConfig, *, clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Run (or resume) one training run; see the module docstring for the stages. `clock` times
    the steps and the cap (injected by tests)."""
    import torch

    validate_config(cfg)
    previous_threads = torch.get_num_threads()
    run = _Run(cfg, clock)
    try:
        return run.run()
    finally:
        torch.set_num_threads(previous_threads)
        run.release()


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


class _Run:
    """One call of `train`: the stages of the module docstring as methods, in order."""

    def __init__(self, cfg: TrainConfig, clock: Callable[[], float]):
        self.cfg, self.clock = cfg, clock
        self.started = clock()
        self.accelerator = None

    def run(self) -> TrainResult:
        self.start_accelerator()
        self.check_inputs()
        self.prepare_data()
        self.build()
        self.write_run_config()
        self.loop()
        return self.finish()

    # ---------------------------------------------------------------- 1. checks before any step
    def _resumed_precision(self) -> str | None:
        """--resume with --precision auto continues in the precision the run resolved to: `auto`
        measures the machine (engine/capabilities.py), and a loaded machine must not switch a
        half-trained run between bf16 and fp32. None when there is nothing to continue."""
        if not (self.cfg.resume and self.cfg.precision == "auto"):
            return None
        found = list_checkpoints(Path(self.cfg.out))
        if not found:
            return None  # check_inputs says that --resume found nothing
        try:
            state = json.loads((found[-1] / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None  # read_trainer_state reports the damaged state
        precision = state.get("resolved_precision")
        if precision is not None:
            log.info("precision auto: continuing in %s, the precision of the run being resumed", precision)
        return precision

    def start_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.cfg
        cfg.out = Path(cfg.out)
        cpu = resolve_device(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.precision = self._resumed_precision() or resolve_precision(cfg, "cpu" if cpu else "cuda")
        _require_tracker(cfg.report_to)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision="bf16" if self.precision == "bf16" else "no",
            gradient_accumulation_steps=cfg.grad_accum,
            # The schedule counts optimiser steps; accelerate's default would step it once per
            # process per step.
            step_scheduler_with_optimizer=False,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "runs")))
        if cfg.threads is not None:  # accelerate sets its own count on multi-CPU runs
            torch.set_num_threads(cfg.threads)
        self.pad_multiple = cfg.resolved_pad_multiple(self.precision, self.accelerator.device.type)
        _refuse_dropped_sharding(self.accelerator)
        if not self.accelerator.is_main_process:
            logging.getLogger("instructrec").setLevel(logging.WARNING)

    def check_inputs(self) -> None:
        cfg = self.cfg
        # The model first: a bare shape name is refused before anything is read. The main process
        # fetches a Hub id into the cache; the others then find it there.
        with self.accelerator.main_process_first():
            self.source, self.model_config = resolve_source(cfg)
        folder = Path(cfg.instructions)
        self.train_table = read_split(folder / "train.parquet", TRAIN_COLUMNS, "train")
        self.valid_table = read_split(folder / "valid.parquet",
                                      TRAIN_COLUMNS + (SEQREC_COLUMNS if cfg.rank_eval else ()), "valid")
        self.tokenizer = load_tokenizer(cfg, self.source)
        check_vocabulary(self.tokenizer, self.model_config)
        if cfg.lora_r:
            require_peft()
        if cfg.init_embeddings != "random":
            if not self.source.is_random:
                raise InputError("init_embeddings", f"{self.source.describe()} has trained embeddings already",
                                 "use it with a random:<shape> --model, or drop --init-embeddings")
            require_encoder(cfg.init_embeddings)
        if cfg.compact_vocab and not self.source.is_random:
            raise InputError("compact_vocab", f"{self.source.describe()} has trained weights over its own vocabulary",
                             "use it with a random:<shape> --model, or drop --compact-vocab (a model trained "
                             "with it already holds its compact tokenizer)")
        self.catalogue_titles = catalogue_titles(cfg.vocab_catalog) if cfg.vocab_catalog is not None else []
        self.instances = []
        if cfg.rank_eval:
            path = folder / "valid.parquet"
            self.instances = seqrec_instances(self.valid_table, path)
            if not self.instances:
                raise InputError("valid", f"{path} has no sequential-recommendation instances (preference P1, "
                                 "intention I0, task T3 or a T2 template answered by the title, scenario "
                                 "recommendation)",
                                 "build the instructions with that template family included, or pass --no-rank-eval")
        self.resume_dir = None
        if cfg.resume:
            found = list_checkpoints(cfg.out)
            if not found:
                raise InputError("resume", f"no checkpoint under {cfg.out / 'checkpoints'}",
                                 "drop --resume to start a new run, or point --out at the interrupted run")
            self.resume_dir = found[-1]
        elif (cfg.out / "metrics.jsonl").exists() or list_checkpoints(cfg.out):
            raise InputError("out", f"{cfg.out} already holds a training run",
                             "pass --resume to continue it, or choose another --out")
        # Every process has looked at OUT before the main one writes into it.
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- 2. data
    def prepare_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        lengths = (cfg.max_source_length, cfg.max_target_length)
        mined = self.read_mined() if cfg.rank_negatives and cfg.rank_negatives_from == "mined" else None
        if cfg.prior_rows:
            before = self.train_table.num_rows
            self.train_table = with_title_prior_rows(self.train_table, cfg.prior_rows, cfg.seed)
            log.info("title-prior rows: %d added to the %d training rows (--prior-rows %g)",
                     self.train_table.num_rows - before, before, cfg.prior_rows)
        if cfg.compact_vocab:
            self.use_compact_vocabulary()
        table = self.train_table
        self.train_rows = tokenize_rows(self.tokenizer, table.column("instruction").to_pylist(),
                                        table.column("target").to_pylist(), *lengths, "train")
        spell = cfg.resolved_spell_rows()
        if spell:
            picks = spelled_picks(table.num_rows, spell, cfg.seed)
            self.train_rows = spelled_rows(self.train_rows, picks, table.column("target").to_pylist(),
                                           self.piece_tokenizer, cfg.max_target_length)
            import pyarrow as pa

            added = table.take(pa.array(picks)).set_column(
                table.column_names.index("template"), "template", pa.array([SPELLED_TEMPLATE] * len(picks), pa.string()))
            self.train_table = pa.concat_tables([table, added])
            log.info("spelled rows: %d training rows again with the target title spelt in pieces (--spell-rows %g)",
                     len(picks), spell)
        # The validation subsets do not follow --seed: runs of other seeds are measured on the
        # same rows and users, so their losses and HR@1 compare.
        valid = self.valid_table.take(seeded_subset(self.valid_table.num_rows, cfg.eval_max_rows, VALIDATION_SEED))
        self.valid_rows = tokenize_rows(self.tokenizer, valid.column("instruction").to_pylist(),
                                        valid.column("target").to_pylist(), *lengths, "valid")
        self.instances = per_template_subset(self.instances, cfg.eval_max_instances, VALIDATION_SEED)
        ranked = Counter(x.template for x in self.instances)
        log.info("train: %d rows over %d templates; valid: %d rows for the loss, %d ranking instances%s",
                 len(self.train_rows), len(self.train_table.column("template").unique()), len(self.valid_rows),
                 len(self.instances), f" ({', '.join(f'{t} {n}' for t, n in sorted(ranked.items()))})" if ranked else "")
        self.negatives = None
        self.negative_lengths: dict[int, list[int]] = {}  # per step: row -> its negatives' decoded lengths
        self.rank_score_form = parse_score_form(cfg.rank_score, field="rank_score")
        # The engine's empty instruction (its title priors): the tokenizer's ids for "".
        self.empty_ids = None
        if self.rank_score_form.kind == "calibrated":
            import torch

            empty = self.tokenizer("", add_special_tokens=True)["input_ids"]
            self.empty_ids = torch.tensor([empty], dtype=torch.long, device=acc.device)
        if cfg.rank_negatives:
            if acc.num_processes > 1:
                # The candidates are decoded against encoder states computed outside the wrapped
                # forward, which DDP's gradient synchronisation does not see.
                raise InputError("rank_negatives", f"runs in one process; this run has {acc.num_processes}",
                                 "train with one process, or drop --rank-negatives")
            self.negatives = NegativePool(table.column("template").to_pylist(), table.column("target").to_pylist())
            sizes = {t: self.negatives.distinct_targets(t) for t in self.negatives.group_of}
            few = sorted(t for t, n in sizes.items() if n <= cfg.rank_negatives)
            if few:
                log.warning("--rank-negatives %d: template(s) %s have at most %d distinct targets; their rows "
                            "rank against repeated negatives", cfg.rank_negatives, ", ".join(few), cfg.rank_negatives)
            log.info("ranking term: each row's target against %d others of its template (%d to %d distinct per "
                     "template), weight %g, score %s", cfg.rank_negatives, min(sizes.values()), max(sizes.values()),
                     cfg.rank_weight, cfg.rank_score)
            if cfg.rank_negatives_from == "mined":
                self.negatives = self.mined_pool(mined, self.negatives)
        self.global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
        steps_per_epoch = math.ceil(len(self.train_rows) / self.global_batch)
        self.planned_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.curve_fields = cfg.curve_fields(self.global_batch)
        self.state = read_trainer_state(self.resume_dir, self.curve_fields) if self.resume_dir else None
        if self.state is not None and cfg.stop_after is not None and cfg.stop_after <= self.state["step"]:
            raise InputError("stop_after", f"the checkpoint is already at step {self.state['step']}",
                             f"pass a --stop-after above {self.state['step']}, or drop it to finish the run")

    def read_mined(self) -> dict[str, list]:
        """--rank-negatives-from mined: train.parquet's columns by name: templates, target item ids and retrieved
        negatives (MINED_COLUMN), with --rank-distill also the retriever's scores, read before
        --prior-rows or --spell-rows append rows (which have none and draw from the template pool)."""
        table = self.train_table
        missing = [c for c in (MINED_COLUMN, "target_item_id") if c not in table.column_names]
        if missing:
            raise InputError("rank_negatives_from", f"{self.cfg.instructions / 'train.parquet'} has no column(s) "
                             f"{', '.join(missing)}: no mined negatives",
                             "run `instructrec mine-negatives --instructions DIR --data PREPARED --out NEW` and "
                             "train on NEW, or use --rank-negatives-from template")
        columns = ["template", "target_item_id", MINED_COLUMN]
        if self.cfg.rank_distill:
            unscored = [c for c in (MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN) if c not in table.column_names]
            if unscored:
                raise InputError("rank_distill", f"{self.cfg.instructions / 'train.parquet'} has no column(s) "
                                 f"{', '.join(unscored)}: its negatives were mined without the retriever's scores",
                                 "mine the folder again with this version's `instructrec mine-negatives`")
            columns += [MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN]
        return {c: table.column(c).to_pylist() for c in columns}

    def mined_pool(self, mined: dict[str, list], fallback: NegativePool) -> MinedNegativePool:
        cfg = self.cfg
        pool = MinedNegativePool(mined["template"], mined["target_item_id"], mined[MINED_COLUMN], fallback,
                                 scores=mined.get(MINED_SCORES_COLUMN), target_scores=mined.get(TARGET_SCORE_COLUMN))
        full, some = pool.coverage(cfg.rank_negatives)
        log.info("ranking term: mined negatives for %d of %d rows (%d with at least %d); the others, and the rest "
                 "of a short row, drawn as above", some, self.train_table.num_rows, full, cfg.rank_negatives)
        if not some:
            raise InputError("rank_negatives_from", "no row's mined negatives is the target of a row of its template",
                             "mine negatives from the prepared data these instructions were built from")
        if cfg.rank_distill:
            log.info("ranking term: soft targets, %g x the retriever's softmax at temperature %g + %g x the "
                     "one-hot target, for rows whose %d negatives are all mined (%d rows); the others keep the "
                     "one-hot target", cfg.rank_distill_share, cfg.rank_distill, 1 - cfg.rank_distill_share,
                     cfg.rank_negatives, full)
        return pool

    def use_compact_vocabulary(self) -> None:
        """--compact-vocab: the tokenizer of the pieces this run's text uses (training/compact_vocab.py)
        and a model vocabulary of its size. A resumed run reads the one its checkpoint saved: its
        weights' rows are that tokenizer's ids."""
        if self.resume_dir is not None:
            from instructrec.engine.loading import load_tokenizer as engine_load_tokenizer

            compact = engine_load_tokenizer(self.resume_dir)
            log.info("resuming with the compact vocabulary the checkpoint saved (%d tokens)%s", len(compact),
                     "; --vocab-catalog is not read again" if self.cfg.vocab_catalog is not None else "")
        else:
            texts = [self.train_table.column("instruction").to_pylist(), self.train_table.column("target").to_pylist(),
                     self.valid_table.column("instruction").to_pylist(), self.valid_table.column("target").to_pylist()]
            if "candidates" in self.valid_table.column_names:
                texts.append(title for titles in self.valid_table.column("candidates").to_pylist()
                             for title in titles or ())
            texts.append(self.catalogue_titles)
            compact = compact_tokenizer(self.tokenizer, itertools.chain.from_iterable(texts))
        # The pieces alone: --spell-rows spells titles with them.
        self.piece_tokenizer = compact
        if self.cfg.item_tokens and self.resume_dir is None:
            import pyarrow.compute as pc

            own = pc.not_equal(self.train_table.column("template"), TITLE_PRIOR_TEMPLATE)
            compact = with_item_tokens(compact, self.train_table.column("target").filter(own).to_pylist())
        elif self.cfg.item_tokens:
            self.piece_tokenizer = without_added_titles(compact)
        self.tokenizer = compact
        self.model_config.vocab_size = vocab_rows(compact)
        log.info("compact vocabulary: the model's embedding and LM head hold %d rows (%d tokens)",
                 self.model_config.vocab_size, len(compact))

    # ---------------------------------------------------------------- model, optimiser, state
    def build(self) -> None:
        import torch
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)
        from accelerate.utils import DistributedType

        model = build_model(cfg, self.source, self.model_config)
        if cfg.init_embeddings != "random" and self.state is None:  # a resumed run loads its weights
            used = np.unique(np.concatenate([self.train_rows.source_flat, self.train_rows.target_flat]))
            warm_start_embeddings(model, self.tokenizer, used, minilm_encoder(),
                                  head=cfg.init_embeddings == "minilm")
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        # The head on real target tokens only (training/loss.py): 1.4x examples/s for t5-mini here.
        self.head = None if sharded else install_hidden_states_head(model)
        # Fewer, larger operators for the same functions: torch's fused tanh-GELU kernel for Hugging
        # Face's eight-operator expression, and T5's RMS norm with a hand-written backward (at
        # d_model 128 operator count, not FLOPs, sets the step: about 1.05-1.10x on Zen 4, docs/benchmarks.md).
        fused = install_fused_activations(model)
        if fused:
            log.info("fused GELU: %d feed-forward activations run torch's single kernel", fused)
        norms = install_fused_norms(model)
        if norms:
            log.info("fused RMS norm: %d norms run with a hand-written backward", norms)
        self.model = acc.prepare(model)
        # The optimiser is built on the prepared model's parameters (FSDP replaces them).
        optimizer = build_optimizer(cfg, self.model, fused=not sharded)
        self.schedule = StepSchedule(cfg.warmup_steps, self.planned_steps, cfg.schedule)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        self.optimizer, self.scheduler = acc.prepare(optimizer, self.lr_scheduler)
        portable_weights(acc)
        self.start_step, self.examples_seen, epoch, position = 0, 0, 0, 0
        if self.state is not None:
            acc.load_state(str(self.resume_dir))  # weights, optimiser, schedule (its total too), RNG
            # accelerate's micro-step counter decides which micro-batch syncs; a checkpoint is
            # always at a step boundary, whatever the accumulation of the run that wrote it.
            acc.step = 0
            self.start_step, self.examples_seen = self.state["step"], self.state["examples_seen"]
            epoch, position = self.state["epoch"], self.state["position"]
            log.info("resuming from %s (step %d of %d)", self.resume_dir, self.start_step, self.schedule.total)
        self.stream = BatchStream(self.train_rows.source_lengths, self.global_batch, cfg.seed,
                                  cfg.length_grouped, epoch=epoch, position=position)
        self.budget = TimeBudget(self.started + cfg.max_minutes * 60.0) if cfg.max_minutes is not None else None
        self.budget_fitted = False
        self.refit_announcer = RefitAnnouncer()  # which refits are said at INFO
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model %s: %.1fM trainable parameters; %s on %s x %d process(es) (%s); %d steps of %d rows "
                 "(%d per process x %d accumulated)%s", self.source.describe(), n_trainable / 1e6, self.precision,
                 acc.device, acc.num_processes, acc.distributed_type.value, self.schedule.total,
                 self.global_batch, cfg.batch_size, cfg.grad_accum,
                 f"; lengths padded to multiples of {self.pad_multiple}" if self.pad_multiple > 1 else "")

    def flop_utilisation(self, flops_per_s: float) -> float | None:
        """flops_per_s over the measured matmul peak of this run's precision, on CPU (the probe of
        engine/capabilities.py at this process's threads, times the processes)."""
        import torch

        from instructrec.engine.capabilities import matmul_gflops

        if self.accelerator.device.type != "cpu" or flops_per_s <= 0:
            return None
        dtype = "bfloat16" if self.precision == "bf16" else "float32"
        peak = matmul_gflops(dtype, torch.get_num_threads()) * 1e9 * self.accelerator.num_processes
        return flops_per_s / peak

    def write_run_config(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.shape = T5Shape.from_config(self.model_config.to_dict())
        self.result = TrainResult(out=cfg.out, steps_done=self.start_step, total_steps=self.schedule.total,
                                  stopped_early=False, planned_steps=self.planned_steps, precision=self.precision,
                                  world_size=acc.num_processes, global_batch_size=self.global_batch,
                                  main_process=acc.is_main_process)
        self.metrics = None
        if acc.is_main_process:
            cfg.out.mkdir(parents=True, exist_ok=True)
            (cfg.out / "training_config.json").write_text(json.dumps(dict(
                cfg.to_json(), model_source=self.source.identity(), weights_started_random=self.source.is_random,
                resolved_precision=self.precision, resolved_device=str(acc.device),
                resolved_pad_multiple=self.pad_multiple, distributed_type=acc.distributed_type.value,
                world_size=acc.num_processes,
                global_batch_size=self.global_batch, planned_steps=self.planned_steps), indent=2) + "\n")
            self.metrics = MetricsLog(cfg.out / "metrics.jsonl", self.start_step if self.state else None)
            if cfg.report_to != "none":
                acc.init_trackers("train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in cfg.to_json().items()})
        acc.wait_for_everyone()

    # ---------------------------------------------------------------- 3. the loop
    def loop(self) -> None:
        from tqdm import tqdm

        cfg, acc, result = self.cfg, self.accelerator, self.result
        bar = tqdm(total=self.schedule.total, initial=self.start_step, file=sys.stderr,
                   disable=not (cfg.progress and acc.is_main_process), desc="train", unit="step", dynamic_ncols=True)
        # examples/s counts the time of training steps only (not validation or checkpoints).
        self.train_s, self.loop_examples, self.loop_flops, step = 0.0, 0, 0.0, self.start_step
        with _StopRequest() as stop:
            while step < self.schedule.total:
                t0 = self.clock()
                if self.budget is not None:
                    self.budget.iteration_started(t0)
                rows = next(self.stream)
                lr_used = self.optimizer.param_groups[0]["lr"]
                loss, stopping, time_up = self.train_step(rows, step + 1, stop)
                dt = self.clock() - t0
                step += 1
                self.record_step(step, rows, loss, lr_used, dt)
                bar.total = self.schedule.total
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{self.loop_examples / self.train_s:.1f}",
                                epoch=f"{self.stream.fractional_epoch:.2f}")
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.schedule.total:
                    self.timed(step, lambda: self.evaluate(step), evaluation=True)
                if self.budget is not None:
                    self.fit_schedule(step)
                unfinished = step < self.schedule.total
                if unfinished and ((cfg.save_every and step % cfg.save_every == 0) or stopping or time_up):
                    self.timed(step, lambda: self.checkpoint(step))
                if (stopping or time_up) and unfinished:
                    result.stopped_early = True
                    result.time_capped = time_up and not stopping
                    break
        bar.close()
        result.steps_done, result.total_steps = step, self.schedule.total

    def train_step(self, rows, step: int, stop: _StopRequest) -> tuple[float, bool, bool]:
        """One optimiser step over the global batch `rows`: its loss over all processes, whether
        any process asks to stop after it (interrupt, --stop-after), and whether any process saw
        the time cap crossed. Decided together, so that every process takes the same branch."""
        import torch

        cfg, acc = self.cfg, self.accelerator
        tokens = int(self.train_rows.target_lengths[rows].sum())
        # DDP / FSDP average gradients over processes and accelerate divides the loss by the
        # accumulation steps: scaled by both, each micro-batch's summed NLL / the step's token
        # count gives the gradient of the global token-mean loss, as one process on one batch.
        scale = acc.num_processes * cfg.grad_accum / tokens
        # The ranking term is a mean over the step's rows, scaled the same way.
        row_scale = acc.num_processes * cfg.grad_accum / len(rows)
        pad, start = self.tokenizer.pad_token_id, self.model_config.decoder_start_token_id
        nll_sum = torch.zeros((), device=acc.device)
        rank_sum = torch.zeros((), device=acc.device)
        self.negative_lengths = {}  # filled below, read by record_step for the model FLOPs
        for micro in process_slots(rows, cfg.grad_accum, acc.num_processes, acc.process_index):
            weight = 1.0 if len(micro) else 0.0  # an empty slot: a zero-weight row keeps collectives in step
            micro = micro if len(micro) else rows[:1]
            soft = None
            if self.negatives is None:
                negatives = None
            elif cfg.rank_distill:
                negatives, teacher = self.negatives.draw_scored(micro, cfg.rank_negatives, cfg.seed, step)
                soft = torch.as_tensor(teacher_targets(teacher, cfg.rank_distill, cfg.rank_distill_share),
                                       device=acc.device)
            else:
                negatives = self.negatives.draw(micro, cfg.rank_negatives, cfg.seed, step)
            if negatives is not None and weight:
                lengths = self.train_rows.target_lengths[negatives]
                if cfg.rank_prefix_tokens:
                    lengths = np.minimum(lengths, cfg.rank_prefix_tokens)
                self.negative_lengths.update(zip(micro.tolist(), lengths.tolist()))
            with acc.accumulate(self.model):
                batch = collate(self.train_rows, micro, pad, start, acc.device, self.pad_multiple)
                with acc.autocast():
                    if negatives is None:
                        nll = sequence_nll_sum(self.model, *batch, head=self.head,
                                               head_rows_multiple=head_rows_multiple(self.pad_multiple))
                        objective = nll * (weight * scale)
                    else:
                        negative_batch = collate_negatives(self.train_rows, negatives, pad, start, acc.device,
                                                           cfg.rank_prefix_tokens)
                        nll, rank = ranked_sequence_losses(self.model, *batch, *negative_batch, head=self.head,
                                                           prefix_tokens=cfg.rank_prefix_tokens,
                                                           score_form=self.rank_score_form, empty_ids=self.empty_ids,
                                                           soft_targets=soft)
                        objective = nll * (weight * scale) + rank * (weight * row_scale * cfg.rank_weight)
                        rank_sum += weight * rank.detach()
                acc.backward(objective)
            nll_sum += weight * nll.detach()
        self.last_rank_loss = float(rank_sum) / len(rows) if self.negatives else None
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        wants_stop = stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after)
        flags = torch.tensor([float(wants_stop), float(self.out_of_time())], device=acc.device)
        totals = torch.cat([nll_sum.float().reshape(1), flags])
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        loss = float(totals[0]) / tokens
        if not math.isfinite(loss):
            raise InstructRecError(f"training diverged: loss {loss} at step {step}; lower --lr or use --precision fp32")
        return loss, bool(totals[1] > 0), bool(totals[2] > 0)

    def record_step(self, step: int, rows, loss: float, lr_used: float, dt: float) -> None:
        self.examples_seen += len(rows)
        self.loop_examples += len(rows)
        negative_lengths = [self.negative_lengths.get(row, ()) for row in rows.tolist()] if self.negatives else None
        self.loop_flops += training_flops(self.shape, self.train_rows.source_lengths[rows],
                                          self.train_rows.target_lengths[rows], negative_lengths)
        self.train_s += dt
        self.result.step_losses[step] = loss
        if self.metrics is not None:
            record = {"kind": "train", "step": step, "epoch": round(self.stream.fractional_epoch, 4), "loss": loss,
                      "lr": lr_used, "examples": len(rows), "target_tokens": int(self.train_rows.target_lengths[rows].sum()),
                      "examples_per_s": round(len(rows) / dt, 2) if dt > 0 else None,
                      "examples_seen": self.examples_seen, "elapsed_s": round(self.clock() - self.started, 3)}
            if self.negatives is not None:  # the mean ranking cross-entropy of the step's rows
                record["rank_loss"] = round(self.last_rank_loss, 5)
            if self.accelerator.device.type == "cuda":  # the main process's peak, for memory-per-GPU claims
                import torch

                record["cuda_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30, 3)
            self.metrics.write(record)
            if self.cfg.report_to != "none":
                self.accelerator.log({"train/loss": loss, "train/lr": lr_used}, step=step)

    def timed(self, step: int, work: Callable[[], object], evaluation: bool = False) -> None:
        """Run an evaluation or a checkpoint inside the loop, its time told to the budget."""
        t0 = self.clock()
        work()
        if self.budget is not None:
            self.budget.record_overhead(self.clock() - t0, evaluation)
            self.fit_schedule(step, event=True)

    def out_of_time(self) -> bool:
        return self.budget is not None and self.clock() >= self.budget.deadline

    def fit_schedule(self, step: int, event: bool = False) -> None:
        """Set the schedule's total to the steps that fit the cap (at most the planned steps): as
        soon as the step time is measured, every REFIT_EVERY_STEPS steps after, and after each
        evaluation or checkpoint (`event`). The main process decides; the others take its number."""
        import torch
        from accelerate.utils import broadcast

        if not self.budget.ready or not (event or not self.budget_fitted or step % REFIT_EVERY_STEPS == 0):
            return
        self.budget_fitted = True
        now = self.clock()
        fits = self.budget.fit(step, self.planned_steps, now)
        if self.accelerator.num_processes > 1:
            fits = int(broadcast(torch.tensor([fits], device=self.accelerator.device), from_process=0)[0])
        if fits == self.schedule.total:
            return
        # Refits every ten steps on a machine whose speed wanders would otherwise fill the log.
        level = logging.INFO if self.refit_announcer.worth_saying(fits, now) else logging.DEBUG
        log.log(level, "--max-minutes: %d steps fit in the cap (planned %d); the schedule now ends there",
                fits, self.planned_steps)
        self.schedule.refit(self.lr_scheduler.last_epoch, fits)
        # The rate of the next step was computed with the old total: recompute it now.
        for group, base in zip(self.lr_scheduler.optimizer.param_groups, self.lr_scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.lr_scheduler.last_epoch)

    # ---------------------------------------------------------------- 4. validation
    def evaluate(self, step: int, engine_weights=None) -> dict:
        """Validation loss on every process, ranking through the engine on the main one. Eval
        runs without dropout and consumes no RNG (fork_rng makes that a guarantee), so a run with
        more evaluations keeps the same training curve."""
        import torch

        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        self.model.eval()
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            record = {"kind": "eval", "step": step, "valid_rows": len(self.valid_rows),
                      "valid_loss": validation_loss(acc, self.model, self.valid_rows, cfg.batch_size,
                                                    self.tokenizer.pad_token_id, self.model_config.decoder_start_token_id,
                                                    self.head, self.pad_multiple)}
            if self.instances:
                weights = engine_weights if engine_weights is not None else self.engine_weights()
                if acc.is_main_process:
                    device = engine_device(acc, weights, 2 if self.precision == "bf16" else 4)
                    record.update(seqrec_validation(weights, self.tokenizer, self.instances, device,
                                                    self.precision, cfg.max_source_length))
                del weights
        acc.wait_for_everyone()
        self.model.train()
        record["eval_s"] = round(time.perf_counter() - t0, 3)
        self.result.evaluations.append(record)
        if acc.is_main_process:
            self.metrics.write(record)
            if cfg.report_to != "none":
                scalars = {f"valid/{k}": v for k, v in record.items() if k not in ("kind", "step", "by_template")}
                for template, summary in record.get("by_template", {}).items():
                    scalars.update({f"valid/{template}/{k}": v for k, v in summary.items()})
                acc.log(scalars, step=step)
            if "hr@1" in record:
                others = "".join(f"; {t}: HR@1 {m['hr@1']:.4f}, NDCG@5 {m['ndcg@5']:.4f}"
                                 for t, m in record["by_template"].items() if t != record["template"])
                log.info("step %d: valid loss %.4f, HR@1 %.4f, NDCG@5 %.4f over %d instances of %s%s",
                         step, record["valid_loss"], record["hr@1"], record["ndcg@5"], int(record["n"]),
                         record["template"], others)
            else:
                log.info("step %d: valid loss %.4f", step, record["valid_loss"])
        return record

    def engine_weights(self):
        scaling = self.cfg.lora_alpha / self.cfg.lora_r if self.cfg.lora_r else None
        return weights_for_engine(self.accelerator, self.model, self.model_config, scaling)

    # ---------------------------------------------------------------- 5. checkpoints
    def checkpoint(self, step: int) -> None:
        from accelerate.utils import DistributedType

        # Plain weights under their own names (not LoRA, not FSDP / DeepSpeed shards): the folder
        # is a save_pretrained checkpoint too.
        full_weights = not self.cfg.lora_r and self.accelerator.distributed_type not in (
            DistributedType.FSDP, DistributedType.DEEPSPEED)
        state = {"version": STATE_VERSION, "step": step, "epoch": self.stream.epoch, "position": self.stream.position,
                 "examples_seen": self.examples_seen, "total_steps": self.schedule.total,
                 "world_size": self.accelerator.num_processes, "config": self.cfg.to_json(),
                 "curve_fields": self.curve_fields, "resolved_precision": self.precision}
        self.result.checkpoint = save_checkpoint(
            self.accelerator, self.cfg.out, step, state, self.model_config if full_weights else None,
            self.tokenizer, self.cfg.keep_checkpoints)

    # ---------------------------------------------------------------- 6. the final model
    def finish(self) -> TrainResult:
        cfg, acc, result = self.cfg, self.accelerator, self.result
        result.examples_per_s = self.loop_examples / self.train_s if self.train_s > 0 else 0.0
        result.model_flops = self.loop_flops
        result.model_flops_per_s = self.loop_flops / self.train_s if self.train_s > 0 else 0.0
        result.flop_utilisation = self.flop_utilisation(result.model_flops_per_s)
        if not result.stopped_early or result.time_capped:
            if result.time_capped:
                log.warning("max_minutes %.1f reached at step %d of %d: the current weights become the final "
                            "model (checkpoint %s resumes the run)", cfg.max_minutes, result.steps_done,
                            result.total_steps, result.checkpoint)
            weights = self.engine_weights()
            self.evaluate(result.steps_done, engine_weights=weights)
            if acc.is_main_process:
                weights.save_pretrained(cfg.out)
                self.tokenizer.save_pretrained(cfg.out)
                write_model_card(cfg.out, self.source, cfg, result)
                log.info("final model saved to %s", cfg.out)
            del weights
            acc.wait_for_everyone()
        else:
            log.info("stopped at step %d of %d; continue with --resume (checkpoint %s)",
                     result.steps_done, result.total_steps, result.checkpoint)
        if acc.is_main_process:
            plot_loss_curve(cfg.out / "metrics.jsonl", cfg.out / "loss_curve.png")
        acc.end_training()
        result.wall_s = self.clock() - self.started
        return result

    def release(self) -> None:
        """Forget accelerate's process-wide state, so that the next `train` in this process may use
        another precision or device (accelerate refuses to change an initialised state). The process
        group of a multi-process launch stays: it belongs to the launch."""
        if self.accelerator is None:
            return
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=self.accelerator.num_processes == 1)
        GradientState._reset_state()


def _refuse_dropped_sharding(accelerator) -> None:
    """accelerate (1.15) turns FSDP and DeepSpeed on for GPU processes only: a CPU launch with an
    FSDP configuration silently runs DDP, whose every process holds the whole model. Say so."""
    from accelerate.utils import DistributedType

    for env, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != kind:
            raise InputError("device", f"the launch asks for {kind.value} ({env}=true) but accelerate runs "
                             f"{accelerator.distributed_type.value} on {accelerator.device.type}: it shards "
                             "models on GPUs only", f"launch on GPUs, or without {kind.value} (DDP) on CPU")


def _require_tracker(name: str) -> None:
    """`--report-to` names a tracker whose package is installed (accelerate would drop it silently)."""
    if name == "none":
        return
    import accelerate.utils as utils

    if not getattr(utils, f"is_{name}_available")():
        raise InputError("report_to", f"{name} is not installed", f"pip install {name}, or drop --report-to")
