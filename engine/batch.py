"""The nightly batch job, in-process: a requests Parquet in, a folder of ranked parts out,
resumable after kill -9. (`engine.ray_job` runs the same parts on a Ray actor pool.)

Contract (DESIGN.md, "Request and result tables"): one output row per input row, in input order.
Rows that cannot be ranked become error rows; a schema problem stops the job before any work.

The job is a short loop over layers that each hold one concern:
- `job_input`: input discovery on any store, schema checks, reading by row groups;
- `job_ids`: the request-id pass (every occurrence of a repeated id becomes an error row);
- `job_model`: the model source and engine settings (resolved before any work);
- `job_rows`: rows -> requests -> engine -> results -> Arrow, the per-batch step;
- `job_output`: the output folder (lock, manifest, parts, commit protocol, resume checks);
- `job_summary`: the manifest and the summary both runners write.

How it stays restartable and deterministic: global row r belongs to part r // rows_per_part, so
parts are fixed by the input alone; inside a part, requests go to the engine in chunks whose
boundaries are multiples of `chunk_rows` (global row numbers), whatever the row-group layout, so
a resumed run (or a Ray actor) hands the engine exactly the same chunks, hence bit-identical
scores. `--resume` refuses a manifest that differs and skips the committed parts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Mapping, Sequence

import pyarrow as pa

from .errors import InstructRecError
from .job_faults import FaultPlan
from .job_ids import RequestIdSet, find_duplicate_request_ids
from .job_input import (
    INPUT_COLUMNS, InputFile, InputSchemaError, JobInput, canonical_batch, iter_record_batches, require_form_columns,
    scan_input,
)
from .job_model import LATER_OPTION_DEFAULTS, EngineSettings, JobModel, model_differences
from .job_output import (
    DEFAULT_CHUNK_ROWS, DEFAULT_ROWS_PER_PART, LOCK_NAME, MANIFEST_NAME, SUMMARY_NAME, JobOutputError,
    OutputFolder, OutputWriteError, PartPlan, PartWriter, part_name,
)
from .job_rows import (
    DUPLICATE_REQUEST_ID, JOB_ERROR_KINDS, MISSING_REQUEST_ID, OUTPUT_SCHEMA, OutputCounts, RowError,
    rank_record_batch, rank_rows, results_to_record_batch, rows_to_requests,
)
from .job_summary import format_summary, job_manifest, job_summary, summarize_output
from .sources import ModelSource
from .types import parse_score_form

__all__ = [
    # the job
    "run_job", "run_job_with_reranker", "iter_part_chunks", "rank_parts", "DEFAULT_ROWS_PER_PART",
    "DEFAULT_CHUNK_ROWS",
    # re-exported from the layers, where they are defined
    "INPUT_COLUMNS", "InputSchemaError", "InputFile", "JobInput", "scan_input", "iter_record_batches",
    "RequestIdSet", "find_duplicate_request_ids", "OUTPUT_SCHEMA", "JOB_ERROR_KINDS", "MISSING_REQUEST_ID",
    "DUPLICATE_REQUEST_ID", "RowError", "rows_to_requests", "rank_rows", "results_to_record_batch",
    "rank_record_batch", "OutputCounts", "JobOutputError", "OutputWriteError", "PartPlan", "OutputFolder",
    "MANIFEST_NAME", "SUMMARY_NAME", "LOCK_NAME", "part_name", "job_manifest", "job_summary", "format_summary",
    "summarize_output",
]

log = logging.getLogger(__name__)


def run_job(model: str | os.PathLike | ModelSource, input: str | os.PathLike, output: str | os.PathLike, *,
            backend: str = "auto", device: str = "cpu", dtype: str = "auto",
            batch_tokens: int | None = None, group_size: int = 10, resume: bool = False,
            rows_per_part: int = DEFAULT_ROWS_PER_PART, chunk_rows: int = DEFAULT_CHUNK_ROWS,
            progress: bool = True, reranker_options: Mapping[str, Any] | None = None,
            revision: str | None = None, tokenizer: str | os.PathLike | None = None,
            threads: int | None = None, normalize: str = "sum",
            ensemble: Sequence[str | os.PathLike | ModelSource] = ()) -> dict[str, Any]:
    """Rank every request of `input` (a Parquet file or folder) into the parts of `output`.

    `model`: a model folder (checkpoint or ONNX export), a Hub id (at `revision`), or
    `random:<shape>` (with `tokenizer`). `normalize`: the score candidates are ranked by, as in
    `Reranker.rank` (sum, mean, calibrated or calibrated:W). `ensemble`: further models whose
    scores are summed with `model`'s (engine/reranker.py, ensembles). The schema is checked and the model
    resolved before the output folder is touched; the model loads after the output folder is
    checked, and the manifest is written once it has loaded. Returns the summary (also
    `output/_summary.json`).
    """
    job_input = scan_input(input)  # schema errors before loading anything
    require_form_columns(job_input, normalize)
    settings = EngineSettings(backend=backend, device=device, dtype=dtype, batch_tokens=batch_tokens,
                              group_size=group_size, threads=threads, extra=dict(reranker_options or {}),
                              normalize=normalize)
    job_model = JobModel.resolve(model, settings, revision=revision, tokenizer=tokenizer, ensemble=tuple(ensemble))
    return _run(job_model, job_input, output, resume=resume, rows_per_part=rows_per_part,
                chunk_rows=chunk_rows, progress=progress)


def run_job_with_reranker(reranker, input: str | os.PathLike | JobInput, output: str | os.PathLike, *,
                          resume: bool = False, rows_per_part: int = DEFAULT_ROWS_PER_PART,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = True,
                          options: Mapping[str, Any] | None = None, normalize: str = "sum") -> dict[str, Any]:
    """The job with a reranker the caller built. `options` (JSON-able) must describe everything
    about the reranker that affects scores: it goes into the manifest (with `normalize`), and
    --resume compares it."""
    parse_score_form(normalize)  # an unknown form: the typed error of run_job, before any work
    input = input if isinstance(input, JobInput) else scan_input(input)
    require_form_columns(input, normalize)
    return _run(_GivenReranker(reranker, dict(options or {}), normalize), input, output, resume=resume,
                rows_per_part=rows_per_part, chunk_rows=chunk_rows, progress=progress)


@dataclass(frozen=True)
class _GivenReranker:
    """A caller's Reranker in the place of a JobModel: described by the caller's options."""

    reranker: Any
    options: dict
    normalize: str = "sum"

    def settle_dtype(self, previous_options=None) -> "_GivenReranker":
        return self

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": "in-memory"}

    def manifest_options(self) -> dict[str, Any]:
        return {**self.options, "normalize": self.normalize}

    def load(self):
        return self.reranker


def _run(job_model, input, output, *, resume: bool, rows_per_part: int, chunk_rows: int,
         progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    job_input = input if isinstance(input, JobInput) else scan_input(input)
    plan = PartPlan(job_input.rows, rows_per_part, chunk_rows)
    faults = FaultPlan.from_env()
    with OutputFolder.claim(output, resume=resume) as folder:
        previous = folder.previous_manifest or {}
        job_model = job_model.settle_dtype(previous.get("options"))
        manifest = job_manifest(job_input, plan, job_model.manifest_entry(), job_model.manifest_options(),
                                {"runner": "in-process"})
        folder.check(manifest, schema=OUTPUT_SCHEMA, option_defaults=LATER_OPTION_DEFAULTS,
                     model_change=model_differences(previous.get("model"), manifest["model"]) if previous else None)
        reranker = job_model.load()  # after the output checks: a refused --resume costs nothing
        folder.start()  # the manifest, now that the model loaded (a failed load leaves none)
        loaded = time.perf_counter()
        stats_before = _jsonable_stats(reranker.stats) if hasattr(reranker, "stats") else None
        duplicate_ids = find_duplicate_request_ids(job_input)
        if duplicate_ids:
            examples = ", ".join(repr(r) for r in list(duplicate_ids)[:3])
            log.warning("%d request ids occur more than once (e.g. %s); all their rows become error rows",
                        len(duplicate_ids), examples)
        todo = [p for p in range(plan.parts) if p not in folder.finished_parts]
        this_run = OutputCounts()
        from tqdm import tqdm

        skipped_rows = sum(plan.rows_in(p) for p in folder.finished_parts)
        with tqdm(total=plan.total_rows, initial=skipped_rows, unit="req", desc="rerank", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
            for record in rank_parts(reranker, job_input, plan, todo, duplicate_ids, folder, faults,
                                     normalize=manifest["options"]["normalize"]):
                this_run.add_counts(record)
                bar.update(record["rows"])
        finished = time.perf_counter()
        summary = job_summary(folder, plan, this_run, parts_written=len(todo), wall_s=finished - started,
                              load_s=loaded - started, working_s=finished - loaded, input_uri=job_input.uri,
                              input_files=len(job_input.files), runner="in-process")
        if stats_before is not None:  # this run's share of counters a reused reranker accumulates
            after = _jsonable_stats(reranker.stats)
            summary["engine_stats"] = {k: v - stats_before.get(k, 0) if isinstance(v, (int, float)) else v
                                       for k, v in after.items()}
        folder.write_summary(summary)
        return summary


def _jsonable_stats(stats) -> dict[str, Any]:
    if isinstance(stats, Mapping):
        items = stats.items()
    elif hasattr(stats, "as_dict"):
        items = stats.as_dict().items()
    elif hasattr(stats, "__dataclass_fields__"):
        items = ((name, getattr(stats, name)) for name in stats.__dataclass_fields__)
    else:
        items = vars(stats).items()
    return {k: v for k, v in items if isinstance(v, (int, float, str, bool)) or v is None}


def iter_part_chunks(job_input: JobInput, plan: PartPlan, parts: Collection[int]) -> Iterator[tuple[int, pa.Table]]:
    """(part, chunk) over the rows of `parts`, in input order. Chunk boundaries are multiples of
    `plan.chunk_rows` in global row numbers, cut at part ends, whatever the row-group layout: a
    rerun (or a Ray actor ranking one part) hands the engine exactly the same chunks."""
    wanted = set(parts)
    per_part, per_chunk, total = plan.rows_per_part, plan.chunk_rows, plan.total_rows

    def outside(start: int, stop: int) -> bool:
        return all(p not in wanted for p in range(start // per_part, (stop - 1) // per_part + 1))

    # Every contract column any file holds: a chunk's batches share one schema even where files differ.
    columns = [c for c in INPUT_COLUMNS if any(c in f.columns for f in job_input.files)]
    pending: list[pa.RecordBatch] = []
    for start, batch in iter_record_batches(job_input, batch_rows=per_chunk, skip=outside):
        position, offset = start, 0
        while offset < batch.num_rows:
            part = position // per_part
            part_end = min((part + 1) * per_part, total)
            if part not in wanted:  # rows of another part inside a shared row group
                step = min(part_end - position, batch.num_rows - offset)
                offset, position = offset + step, position + step
                continue
            chunk_end = min((position // per_chunk + 1) * per_chunk, part_end)
            take = min(chunk_end - position, batch.num_rows - offset)
            pending.append(canonical_batch(batch.slice(offset, take), columns))
            offset, position = offset + take, position + take
            if position == chunk_end:
                yield part, pa.Table.from_batches(pending)
                pending = []
    if pending:
        raise InstructRecError("the input ended inside a chunk; it changed while the job was reading it")


def rank_parts(reranker, job_input: JobInput, plan: PartPlan, parts: Sequence[int], duplicate_ids: Mapping[str, int],
               folder: OutputFolder, faults: FaultPlan = FaultPlan(), *,
               normalize: str = "sum") -> Iterator[dict[str, Any]]:
    """Rank and commit each of `parts` (in order) into `folder`, by the `normalize` score; yields
    each part's commit record."""
    writer: PartWriter | None = None
    tally = OutputCounts()
    calibrated = parse_score_form(normalize).kind == "calibrated"
    try:
        for part, chunk in iter_part_chunks(job_input, plan, parts):
            if writer is None:
                writer, tally = folder.part_writer(part), OutputCounts()
                if calibrated:
                    reranker.clear_title_priors()  # the part's scores must not depend on earlier parts
            batch = rank_record_batch(reranker, chunk, duplicate_ids, normalize)
            writer.write(batch)
            tally.add_batch(batch)
            faults.at("in-part", part)
            if writer.rows == plan.rows_in(part):
                record = writer.commit(tally.counts())
                writer = None
                faults.at("after-part", part)
                yield record
        for part in parts:  # only an empty input has a part without rows
            if plan.rows_in(part) == 0:
                record = folder.part_writer(part).commit(OutputCounts().counts())
                faults.at("after-part", part)
                yield record
        if writer is not None:
            raise InstructRecError(f"the input ended inside part {writer.index}; it changed while the job was "
                                   "reading it")
    finally:
        if writer is not None:
            writer.discard()
