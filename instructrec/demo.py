"""`instructrec demo` (the README's `make demo`): the whole product on a fresh machine, offline.

Steps, each leaving its artefact in one folder (default ./demo-output):
    raw/            generated Amazon-2018-format reviews + meta      (training.data.synth)
    prepared/       items / interactions / splits / candidate lists   (training.data.prepare)
    instructions/   train / valid / test instruction Parquet          (training.build, offline annotator)
    train/          a small T5 trained from scratch for a few minutes (training.tune)
    onnx/           the ONNX export and its validation.json          (export)
    requests.parquet  one request per test instance: history titles + the stored candidate list
    ranked/         the batch job's output folder (parts, _summary.json) (engine.batch)
    ranked.parquet  the same rows in one file
    metrics.json    HR@1 / NDCG@5 of the model and of a popularity baseline on the same instances

Rerunning into the same folder reuses every step whose inputs and settings are unchanged
(`.demo/<step>.json` records them, written only after the step finished) and replaces the
others and everything downstream of them; `--fresh` replaces everything. A folder that was not
written by the demo is refused rather than written into.

The only outside asset is the Flan-T5 tokenizer: --tokenizer, else
$INSTRUCTREC_SHARED/assets/flan-t5-tokenizer, else ../shared/assets/flan-t5-tokenizer beside the
repository. Heavy libraries are imported inside the command only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from instructrec.engine.errors import InstructRecError

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_INPUT = 2

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_SUBPATH = Path("assets") / "flan-t5-tokenizer"
MARKER_NAME = "demo.json"  # marks a folder as the demo's own: only then are its sub-folders replaced
STAMPS_DIR = ".demo"
# The sequential-recommendation evaluation template: history titles in, the next item's title out
# (T2, the engine's default for a history-only request), each candidate scored by its title's
# likelihood. Chosen on the validation lists: the same trained models rank them at HR@1 0.41-0.44
# with it and 0.19-0.21 (popularity's level) with the listed-candidates form seq-rec-02, whose ten
# titles in the source a few minutes of training cannot tell apart from the history
# (docs/results.md, "The ranking template").
EVAL_TEMPLATE = "seq-rec-01"
# Training templates. A model trained from random weights for a few minutes cannot learn 54 task
# forms at once: these are the ones whose source carries the purchase history and whose target is
# a title, in the form the demo ranks with (T2, no candidate list: sequential recommendation and
# personalized search with each intention), so every step teaches "read the history, produce the
# next item". Chosen on validation: adding the listed forms (seq-rec-02, seq-rec-18,
# pers-search-07, pers-search-08) spends steps on ten-title sources and ranked lower (HR@1 0.41-0.44
# against 0.47-0.50 without them; docs/results.md, "The ranking template").
TRAIN_TEMPLATES = ("seq-rec-01", "pers-search-01", "pers-search-02")
SHOWN_REQUESTS = 3
ARTEFACTS = ("raw", "prepared", "instructions", "train", "onnx", "requests.parquet", "ranked",
             "ranked.parquet", "metrics.json")


class DemoError(InstructRecError):
    """A step of the demo could not run; the message says which and what to do."""


@dataclass(frozen=True)
class DemoSettings:
    users: int
    items: int
    per_user: int  # training instructions per user
    search_per_item: int
    preset: str  # random:<shape> (engine.presets), initialised at random
    batch_size: int
    max_steps: int  # the step cap; the time cap (train_minutes) usually ends training first
    train_minutes: float  # `train --max-minutes`: the schedule is fitted into it
    optimizer: str
    lr: float
    warmup_steps: int
    dropout: float
    max_source_tokens: int


# Full: t5-micro (10M parameters) for at most 4 minutes, so that data + training + export +
# ranking stay under 10 minutes on 2 cores. Chosen on the validation split of the demo's own data
# (docs/results.md, "What moved quality", the demo's data): in the same minutes t5-micro ran twice the
# steps of t5-mini and ranked better; AdamW at 3e-3 with 30 warm-up steps and a linear decay
# fitted to the time cap beat 5e-3 and 2e-3; dropout 0 beat 0.1 (a few epochs of a 10M model do
# not overfit). 1,500 users with 4 instructions each (6,000 rows, 6,000 distinct next-item
# targets) instead of 300 users with 20 (the same rows, repeating ~1,800 targets): on all 1,492
# validation lists two scratch-loop runs ranked above popularity (0.229, 0.225 vs 0.203) and the
# product trainer's run at it (0.201), where 300 users stayed below; 1,500 test lists also make
# the demo's comparison 2.2x tighter than 300 did. 7 minutes ranked no better than 4 (0.215).
FULL = DemoSettings(users=1500, items=200, per_user=4, search_per_item=0, preset="random:t5-micro",
                    batch_size=16, max_steps=20_000, train_minutes=4.0, optimizer="adamw", lr=3e-3,
                    warmup_steps=30, dropout=0.0, max_source_tokens=512)
# Quick (the test): tiny data, t5-tiny, a handful of steps; checks the plumbing, not quality.
QUICK = DemoSettings(users=60, items=40, per_user=1, search_per_item=0, preset="random:t5-tiny",
                     batch_size=4, max_steps=3, train_minutes=1.0, optimizer="adamw", lr=3e-3,
                     warmup_steps=0, dropout=0.0, max_source_tokens=512)


# ---------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="end to end on generated data: data, instructions, training, export, reranking, metrics",
        description="Generate a dataset, prepare it, build instructions, train a small model for a few "
                    "minutes, export it to ONNX, rank the test requests with the batch job and compare "
                    "HR@1 / NDCG@5 with a popularity baseline. Offline; leaves everything in --out.")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="artefact folder (default ./demo-output)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="Flan-T5 tokenizer folder (default: $INSTRUCTREC_SHARED/assets/flan-t5-tokenizer, "
                             "else ../shared/assets/flan-t5-tokenizer beside the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-minutes", type=float, default=None,
                        help=f"training time cap in minutes (default {FULL.train_minutes:g}; --quick: {QUICK.train_minutes:g})")
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"training step cap (default {FULL.max_steps}; --quick: {QUICK.max_steps})")
    parser.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                        help="onnx (default): export, then rank with onnxruntime; torch: skip the export "
                             "and rank with the PyTorch checkpoint")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores, or 1 when the load average already "
                             "fills the cores: spin-waiting OpenMP threads on busy cores are several times slower)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, tiny model, a few steps (about a minute; for tests)")
    parser.add_argument("--fresh", action="store_true", help="replace every artefact instead of reusing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    if args.train_minutes is not None:
        if not args.train_minutes > 0:
            log.error("--train-minutes must be positive, got %s", args.train_minutes)
            return EXIT_INPUT
        settings = dataclasses.replace(settings, train_minutes=float(args.train_minutes))
    if args.train_steps is not None:
        if args.train_steps < 1:
            log.error("--train-steps must be at least 1, got %s", args.train_steps)
            return EXIT_INPUT
        settings = dataclasses.replace(settings, max_steps=args.train_steps)
    try:
        run_demo(args.out, settings=settings, tokenizer=args.tokenizer, seed=args.seed,
                 backend=args.backend, threads=args.threads, fresh=args.fresh,
                 mode="quick" if args.quick else "full")
    except InstructRecError as exc:
        # Typed failures (a missing tokenizer, a failed export, a refused folder): the message
        # names the step and the fix.
        log.error("demo stopped: %s", exc)
        print(f"instructrec demo: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers


def find_tokenizer(explicit: Path | None) -> Path:
    """The tokenizer folder to use, or DemoError saying where it was looked for."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = []
        shared_env = os.environ.get("INSTRUCTREC_SHARED", "").strip()
        if shared_env:
            candidates.append(Path(shared_env) / TOKENIZER_SUBPATH)
        candidates.append(REPO_ROOT.parent / "shared" / TOKENIZER_SUBPATH)
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file() or (candidate / "spiece.model").is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise DemoError(
        f"the Flan-T5 tokenizer was not found (looked in: {looked}); it is the demo's only outside "
        "asset and is expected at ../shared/assets/flan-t5-tokenizer beside the repository. Pass a "
        "folder holding tokenizer.json or spiece.model with --tokenizer DIR")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class _Workspace:
    """The demo folder: step stamps decide reuse, and replacing a step removes only its artefacts."""

    def __init__(self, out: Path, fresh: bool):
        self.out = out
        self.stamps = out / STAMPS_DIR
        marker = out / MARKER_NAME
        if out.exists() and not out.is_dir():
            raise DemoError(f"--out {out} is a file; choose a folder")
        if out.is_dir() and any(out.iterdir()) and not marker.is_file():
            raise DemoError(f"--out {out} is not empty and was not written by `instructrec demo` (no "
                            f"{MARKER_NAME}); the demo only replaces its own artefacts. Choose a new or "
                            "empty folder")
        self.stamps.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(json.dumps({"written_by": "instructrec demo", "artefacts": list(ARTEFACTS)},
                                         indent=2) + "\n")
        if fresh:
            for stamp in self.stamps.glob("*.json"):
                stamp.unlink()
        self.keys: dict[str, str] = {}

    def run_step(self, number: int, total: int, name: str, title: str, artefacts: tuple[str, ...],
                 inputs: dict, body: Callable[[], dict]) -> dict:
        """Run `body` unless a stamp with the same key (inputs + upstream keys) says it is done.
        Returns the step's record (what `body` returned, as stored in its stamp)."""
        key = _digest({"inputs": inputs, "upstream": dict(self.keys)})
        stamp_path = self.stamps / f"{name}.json"
        where = ", ".join(artefacts)
        if stamp_path.is_file():
            stamp = json.loads(stamp_path.read_text())
            present = all((self.out / a).exists() for a in artefacts)
            if stamp.get("key") == key and present:
                log.info("[%d/%d] %s: reusing %s (same settings as the run that wrote it)",
                         number, total, title, where)
                self.keys[name] = key
                return stamp["record"]
            reason = "settings or inputs changed" if stamp.get("key") != key else "an artefact is missing"
            log.info("[%d/%d] %s: replacing %s (%s)", number, total, title, where, reason)
        elif any((self.out / a).exists() for a in artefacts):
            log.info("[%d/%d] %s: replacing %s (left unfinished by an earlier run)", number, total, title, where)
        else:
            log.info("[%d/%d] %s -> %s", number, total, title, where)
        stamp_path.unlink(missing_ok=True)
        for artefact in artefacts:
            _remove(self.out / artefact)
        started = time.perf_counter()
        record = body()
        record["seconds"] = round(time.perf_counter() - started, 1)
        temp = stamp_path.with_suffix(".tmp")
        temp.write_text(json.dumps({"key": key, "inputs": inputs, "record": record}, indent=2, default=str) + "\n")
        os.replace(temp, stamp_path)
        log.info("[%d/%d] %s: done in %.1f s", number, total, title, record["seconds"])
        self.keys[name] = key
        return record


def _resolve_threads(requested: int | None) -> int:
    cores = os.cpu_count() or 1
    if requested is not None:
        if requested < 1:
            raise DemoError(f"--threads must be at least 1, got {requested}")
        return requested
    load = os.getloadavg()[0]
    if cores > 1 and load >= cores:
        log.info("load average %.1f on %d cores: using 1 torch thread (pass --threads to override)", load, cores)
        return 1
    return cores


# ---------------------------------------------------------------------------------------------
# Steps


def _train_time_capped(instructions: Path, out: Path, tokenizer: Path, settings: DemoSettings,
                       seed: int, threads: int) -> dict:
    """One `train` call capped by the clock: `max_minutes` fits the step budget (and with it the
    warm-up + linear decay schedule) to the measured step time, so a time-capped run still ends
    its schedule at a learning rate near zero. The final model is always `out`."""
    from instructrec.training.tune import TrainConfig, train

    config = TrainConfig(
        instructions=instructions, model=settings.preset, out=out, tokenizer=tokenizer,
        batch_size=settings.batch_size, max_steps=settings.max_steps, max_minutes=settings.train_minutes,
        optimizer=settings.optimizer, lr=settings.lr, warmup_steps=settings.warmup_steps, schedule="linear",
        dropout=settings.dropout,
        max_source_length=settings.max_source_tokens, rank_eval=False, eval_max_rows=64, keep_checkpoints=1,
        seed=seed, threads=threads, progress=False)
    started = time.perf_counter()
    result = train(config)
    losses = result.step_losses
    return {"model_dir": str(out), "steps": result.steps_done, "max_steps": settings.max_steps,
            "scheduled_steps": result.total_steps,
            "time_capped": result.time_capped or result.total_steps < settings.max_steps,
            "first_loss": losses[min(losses)] if losses else None,
            "final_loss": losses[max(losses)] if losses else None,
            "valid_loss": result.evaluations[-1]["valid_loss"] if result.evaluations else None,
            "examples_per_s": round(result.examples_per_s, 1),
            "train_s": round(time.perf_counter() - started, 1), "threads": threads}


def _export(model_dir: Path, onnx_dir: Path) -> dict:
    try:
        from instructrec.export import export_model
        from instructrec.export.errors import ExportError
    except ImportError as exc:
        raise DemoError(f"the ONNX export is not available in this installation ({exc}); rerun with "
                        "--backend torch to rank with the PyTorch checkpoint instead") from exc
    try:
        manifest = export_model(model_dir, onnx_dir, dtype="float32")
    except ExportError as exc:
        raise DemoError(f"the ONNX export of {model_dir} failed: {exc}. Rerun with --backend torch to "
                        "rank with the PyTorch checkpoint instead") from exc
    validation = onnx_dir / "validation.json"
    if not validation.is_file():
        raise DemoError(f"the export wrote no {validation}; the ONNX graphs are unvalidated, so the demo "
                        "does not use them (rerun with --backend torch)")
    return {"onnx_dir": str(onnx_dir), "validation_report": str(validation),
            "export_s": manifest.get("export_seconds"), "validation_s": manifest.get("validation_seconds")}


@dataclass
class _Instance:
    request_id: str
    user_id: str
    history_ids: list[str]
    candidate_ids: list[str]
    target_item_id: str


def _test_instances(prepared: Path) -> tuple[list[_Instance], dict[str, str]]:
    """Sequential-recommendation test instances: each user's last item among the data layer's
    stored candidate list (in its stored order); the history is every earlier item (train +
    valid), as the baselines and the built test rows read it."""
    from instructrec.training.data import load_prepared

    data = load_prepared(prepared)
    titles = dict(zip(data.items.column("item_id").to_pylist(), data.items.column("title").to_pylist()))
    inter = data.interactions.select(["user_id", "item_id", "position", "split"]).to_pydict()
    sequences: dict[str, list[tuple[int, str, str]]] = {}
    for user, item, position, split in zip(inter["user_id"], inter["item_id"], inter["position"], inter["split"]):
        sequences.setdefault(user, []).append((position, item, split))
    cands = data.candidates.to_pydict()
    instances = []
    for user, split, target, candidate_ids in zip(cands["user_id"], cands["split"], cands["target_item_id"],
                                                  cands["candidate_ids"]):
        if split != "test":
            continue
        history = [item for _, item, s in sorted(sequences[user]) if s != "test"]
        instances.append(_Instance(f"{user}/test", user, history, list(candidate_ids), target))
    return instances, titles


def _write_requests(instances: list[_Instance], titles: dict[str, str], path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from instructrec.engine.templates import MAX_HISTORY_ITEMS

    table = pa.table({
        "request_id": [i.request_id for i in instances],
        "candidates": [[titles[c] for c in i.candidate_ids] for i in instances],
        "candidate_ids": [i.candidate_ids for i in instances],
        # The engine keeps the newest 20 and fits the rest to the token budget; storing only
        # those keeps the file small.
        "history": [[titles[h] for h in i.history_ids[-MAX_HISTORY_ITEMS:]] for i in instances],
        "template": [EVAL_TEMPLATE] * len(instances),
        # Not a contract column (the job reads only those): the gold item, for the metrics.
        "target_item_id": [i.target_item_id for i in instances],
    })
    pq.write_table(table, path)
    return {"requests": table.num_rows, "path": str(path)}


def _rerank(model: Path, backend: str, requests: Path, job_dir: Path, merged: Path, threads: int,
            max_candidates: int, max_source_tokens: int) -> dict:
    import pyarrow.parquet as pq

    from instructrec.engine.batch import run_job

    options: dict[str, Any] = {"max_source_tokens": max_source_tokens}
    if backend == "onnx":
        # onnxruntime sizes its own thread pool (torch.set_num_threads does not reach it); on a
        # loaded 2-core machine its spinning threads ranked at 27 candidates/s.
        options["threads"] = threads
    try:
        # group_size = the longest list: every request is scored under one encoding, so its
        # scores are comparable with each other (a tournament's are not across rounds).
        summary = run_job(model, requests, job_dir, backend=backend, device="cpu", dtype="float32",
                          group_size=max(max_candidates, 2), progress=False,
                          reranker_options=options)
    except InstructRecError as exc:
        hint = " (rerun with --backend torch to rank with the PyTorch checkpoint)" if backend == "onnx" else ""
        raise DemoError(f"the batch job could not rank {requests} with the {backend} backend: {exc}{hint}") from exc
    table = pq.read_table(job_dir)  # the parts, in order (names are zero-padded part numbers)
    pq.write_table(table, merged)
    return {"rows": summary["rows"], "ok": summary["ok"], "errors": summary["errors"],
            "errors_by_kind": summary["errors_by_kind"], "candidates_per_s": summary["candidates_per_s"],
            "wall_s": summary["wall_s"], "backend": backend, "model": str(model)}


def _evaluate(prepared: Path, ranked_path: Path, requests_path: Path) -> dict:
    """HR/NDCG of the ranked rows and of popularity (train interaction counts) on the same
    instances, with the shared pessimistic-tie metrics; an error row counts as a miss."""
    import pyarrow.parquet as pq

    from instructrec.training.baselines import LabeledRequest, Popularity, RankingRequest
    from instructrec.training.baselines import load_prepared as load_baseline_data
    from instructrec.training.metrics import rank_in_result, summarize_ranks

    requests = pq.read_table(requests_path, columns=["request_id", "candidate_ids", "target_item_id"]).to_pydict()
    ranked = pq.read_table(ranked_path, columns=["request_id", "ranked_ids", "scores", "error"]).to_pydict()
    if ranked["request_id"] != requests["request_id"]:
        raise DemoError(f"{ranked_path} does not hold one row per request of {requests_path} in order")
    model_ranks = []
    for ids, scores, error, candidates, target in zip(ranked["ranked_ids"], ranked["scores"], ranked["error"],
                                                      requests["candidate_ids"], requests["target_item_id"]):
        model_ranks.append(len(candidates) + 1 if error is not None else rank_in_result(ids, scores, target))

    baseline_data = load_baseline_data(prepared)
    popularity = Popularity()
    popularity.fit(baseline_data.train)
    # The baseline scores the same requests (same candidate ids, same order) as the model.
    labeled = [LabeledRequest(RankingRequest(rid.rsplit("/", 1)[0], (), tuple(c)), t)
               for rid, c, t in zip(requests["request_id"], requests["candidate_ids"], requests["target_item_id"])]
    pop_scores = popularity.score([l.request for l in labeled])
    pop_ranks = [rank_in_result(l.request.candidate_ids, row[:len(l.request.candidate_ids)], l.target_item_id)
                 for l, row in zip(labeled, pop_scores)]
    n_candidates = sorted({len(c) for c in requests["candidate_ids"]})
    return {
        "task": f"sequential recommendation ({EVAL_TEMPLATE}): the user's last item among its stored "
                "candidate list (1 positive + sampled negatives), test split",
        "instances": len(model_ranks),
        "candidates_per_instance": n_candidates,
        "ties": "pessimistic (the positive ranks after every candidate with an equal score)",
        "error_rows": sum(e is not None for e in ranked["error"]),
        "methods": {"instructrec": summarize_ranks(model_ranks), "popularity": summarize_ranks(pop_ranks)},
        "random_expectation": {"hr@1": 1.0 / n_candidates[0]} if len(n_candidates) == 1 else None,
    }


def _show(requests_path: Path, ranked_path: Path, tokenizer_dir: Path, max_source_tokens: int,
          count: int = SHOWN_REQUESTS) -> None:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from instructrec.engine.formatting import build_instruction

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    requests = pq.read_table(requests_path).slice(0, count).to_pylist()
    ranked = pq.read_table(ranked_path).slice(0, count).to_pylist()
    for request, result in zip(requests, ranked):
        print(f"\nrequest {request['request_id']}")
        text = build_instruction(history=request["history"], template=request["template"],
                                 candidates=request["candidates"], tokenizer=tokenizer,
                                 max_source_tokens=max_source_tokens)
        head = " ".join(text.split())
        print(f"  instruction: {head[:220]}{' ...' if len(head) > 220 else ''}")
        if result["error"] is not None:
            print(f"  error: {result['error']}")
            continue
        title_of = dict(zip(request["candidate_ids"], request["candidates"]))
        target = request["target_item_id"]
        for position, (item, score) in enumerate(zip(result["ranked_ids"][:3], result["scores"][:3]), 1):
            mark = "  <- the true next item" if item == target else ""
            print(f"  {position}. {score:9.3f}  {title_of[item]}{mark}")
        if target not in result["ranked_ids"][:3]:
            rank = result["ranked_ids"].index(target) + 1
            print(f"     (the true next item, {title_of[target]!r}, is ranked {rank} of {len(result['ranked_ids'])})")


# ---------------------------------------------------------------------------------------------
# The demo


def run_demo(out: Path, *, settings: DemoSettings = FULL, tokenizer: Path | None = None, seed: int = 0,
             backend: str = "onnx", threads: int | None = None, fresh: bool = False, mode: str = "full") -> dict:
    """Run (or finish, reusing what is done) the demo into `out`; returns metrics.json's content."""
    if backend not in ("onnx", "torch"):
        raise DemoError(f"backend {backend!r}: use 'onnx' or 'torch'")
    started = time.perf_counter()
    out = Path(out).resolve()
    tokenizer_dir = find_tokenizer(tokenizer)
    log.info("instructrec demo (%s): artefacts in %s", mode, out)
    log.info("tokenizer: %s", tokenizer_dir)
    workspace = _Workspace(out, fresh)
    threads = _resolve_threads(threads)
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    total = 8
    try:
        def generate() -> dict:
            from instructrec.training.data import synth

            reviews, meta = synth(out / "raw", users=settings.users, items=settings.items, seed=seed)
            return {"reviews": str(reviews), "meta": str(meta)}

        raw = workspace.run_step(1, total, "synth", "generate a dataset (Amazon 2018 format)", ("raw",),
                                 {"users": settings.users, "items": settings.items, "seed": seed}, generate)

        def prepare_data() -> dict:
            from instructrec.training.data import prepare

            stats = prepare(raw["reviews"], raw["meta"], out / "prepared", seed=seed)
            log.info("prepared: %d users, %d items, %d interactions; %d candidate lists",
                     stats["users"], stats["items"], stats["interactions"], stats["candidates"]["rows"])
            return {key: stats[key] for key in ("users", "items", "interactions", "splits", "candidates")}

        workspace.run_step(2, total, "prepare", "prepare it (k-core, leave-one-out splits, candidate lists)",
                           ("prepared",), {"seed": seed}, prepare_data)

        def build() -> dict:
            from instructrec.training.annotation import make_annotator
            from instructrec.training.build import build_instructions

            report = build_instructions(
                out / "prepared", out / "instructions", annotator=make_annotator("offline"),
                templates=list(TRAIN_TEMPLATES), per_user=settings.per_user,
                search_per_item=settings.search_per_item, seed=seed, tokenizer=tokenizer_dir,
                max_source_tokens=settings.max_source_tokens)
            log.info("instructions: %s rows", report["rows"])
            return {"rows": report["rows"]}

        workspace.run_step(3, total, "instructions", "build instructions (offline annotator)", ("instructions",),
                           {"templates": TRAIN_TEMPLATES, "per_user": settings.per_user,
                            "search_per_item": settings.search_per_item, "seed": seed,
                            "max_source_tokens": settings.max_source_tokens, "tokenizer": str(tokenizer_dir)},
                           build)

        trained = workspace.run_step(
            4, total, "train",
            f"train {settings.preset} from random weights (at most {settings.max_steps} steps or "
            f"{settings.train_minutes:g} min, {threads} thread{'s' if threads > 1 else ''})",
            ("train",), {"preset": settings.preset, "batch_size": settings.batch_size, "max_steps": settings.max_steps,
                         "train_minutes": settings.train_minutes, "optimizer": settings.optimizer, "lr": settings.lr,
                         "warmup_steps": settings.warmup_steps, "dropout": settings.dropout, "seed": seed,
                         "max_source_tokens": settings.max_source_tokens},
            lambda: _train_time_capped(out / "instructions", out / "train", tokenizer_dir, settings, seed, threads))
        model_dir = Path(trained["model_dir"])
        log.info("model: %s (%d steps, train loss %.3f -> %.3f)", model_dir, trained["steps"],
                 trained["first_loss"], trained["final_loss"])

        if backend == "onnx":
            exported = workspace.run_step(5, total, "export", "export to ONNX and validate against torch", ("onnx",),
                                          {"model_dir": str(model_dir)}, lambda: _export(model_dir, out / "onnx"))
            ranking_model = Path(exported["onnx_dir"])
        else:
            log.info("[5/%d] export: skipped (--backend torch ranks with the PyTorch checkpoint %s)", total, model_dir)
            ranking_model = model_dir

        instances, titles = _test_instances(out / "prepared")
        if not instances:
            raise DemoError(f"{out / 'prepared'} has no test candidate lists to rank")
        max_candidates = max(len(i.candidate_ids) for i in instances)
        workspace.run_step(6, total, "requests", "write the requests (test split, stored candidate lists)",
                           ("requests.parquet",), {"template": EVAL_TEMPLATE},
                           lambda: _write_requests(instances, titles, out / "requests.parquet"))

        ranked = workspace.run_step(
            7, total, "rerank", f"rank them with the batch job ({backend} backend)", ("ranked", "ranked.parquet"),
            {"backend": backend, "model": str(ranking_model), "max_source_tokens": settings.max_source_tokens},
            lambda: _rerank(ranking_model, backend, out / "requests.parquet", out / "ranked", out / "ranked.parquet",
                            threads, max_candidates, settings.max_source_tokens))
        if ranked["errors"]:
            log.warning("%d of %d requests came back as error rows (%s); they count as misses",
                        ranked["errors"], ranked["rows"], ranked["errors_by_kind"])

        def evaluate() -> dict:
            metrics = _evaluate(out / "prepared", out / "ranked.parquet", out / "requests.parquet")
            metrics["model"] = {"preset": settings.preset, "steps": trained["steps"], "time_capped": trained["time_capped"],
                                "checkpoint": trained["model_dir"], "backend": backend, "ranked_by": str(ranking_model)}
            metrics["mode"] = mode
            metrics["seed"] = seed
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            return {"path": str(out / "metrics.json")}

        workspace.run_step(8, total, "metrics", "score against a popularity baseline", ("metrics.json",), {}, evaluate)
        metrics = json.loads((out / "metrics.json").read_text())
    finally:
        torch.set_num_threads(previous_threads)

    _show(out / "requests.parquet", out / "ranked.parquet", tokenizer_dir, settings.max_source_tokens)
    ours, pop = metrics["methods"]["instructrec"], metrics["methods"]["popularity"]
    sizes = metrics["candidates_per_instance"]
    print(f"\n{metrics['instances']} test instances, {'/'.join(map(str, sizes))} candidates each "
          f"(a random ranking has HR@1 = {1 / sizes[0]:.3f})")
    print(f"  {'method':<28} {'HR@1':>7} {'NDCG@5':>7}")
    print(f"  {'instructrec (' + settings.preset + ', ' + backend + ')':<28} {ours['hr@1']:7.4f} {ours['ndcg@5']:7.4f}")
    print(f"  {'popularity':<28} {pop['hr@1']:7.4f} {pop['ndcg@5']:7.4f}")
    print(f"\nartefacts in {out} (metrics: {out / 'metrics.json'}); {time.perf_counter() - started:.0f} s")
    log.info("demo finished: artefacts in %s", out)
    return metrics
