"""The nightly batch job: a requests Parquet in, a ranked Parquet out, resumable after kill -9.

Contract (DESIGN.md, "Request and result tables"): one output row per input row, in input order.
Rows that cannot be ranked become error rows; a schema problem stops the job before any work.

How the job stays restartable and deterministic:
- The input (one file or a directory of `*.parquet`, sorted by name) is read by row groups,
  never whole. Global row r belongs to part r // rows_per_part, so parts are fixed by the
  input alone; a part is streamed into a hidden temp file and `os.replace`d into place, so a
  `part-NNNNN.parquet` that exists is complete.
- Inside a part, requests go to the engine in chunks whose boundaries are multiples of
  `chunk_rows` (global row numbers), whatever the row-group layout: a resumed run hands the
  engine exactly the same chunks, hence the same batches and bit-identical scores.
- `OUTPUT/_job.json` records the input fingerprint and every option that affects results;
  `--resume` refuses a manifest that differs, and skips the parts that exist.
- Request ids must be unique. A first pass reads only the `request_id` column (16 bytes of
  memory per row, see `RequestIdSet`) and every occurrence of a repeated id becomes an error row:
  picking "the first" would make a join on request_id silently ambiguous, and the rule needs no
  row order, so the Ray runner applies it identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, InstructRecError
from .job_faults import FaultPlan
from .job_model import EngineSettings, JobModel, model_differences
from .job_output import (
    LOCK_NAME, MANIFEST_FORMAT, MANIFEST_NAME, SUMMARY_NAME, JobOutputError, OutputFolder, PartPlan, PartWriter,
    part_name,
)
from .sources import ModelSource
from .types import Request

__all__ = [
    "INPUT_COLUMNS", "OUTPUT_SCHEMA", "JOB_ERROR_KINDS", "DEFAULT_ROWS_PER_PART", "DEFAULT_CHUNK_ROWS",
    "InputSchemaError", "JobOutputError", "InputFile", "JobInput", "RowError", "RequestIdSet",
    "scan_input", "find_duplicate_request_ids", "rows_to_requests", "results_to_record_batch",
    "rank_record_batch", "run_job", "run_job_with_reranker", "summarize_output",
]

log = logging.getLogger(__name__)

# Column -> expected Arrow type family ("string" or "list<string>"), and whether it is required.
INPUT_COLUMNS: dict[str, tuple[str, bool]] = {
    "request_id": ("string", True),
    "candidates": ("list<string>", True),
    "candidate_ids": ("list<string>", False),
    "instruction": ("string", False),
    "history": ("list<string>", False),
    "preference": ("string", False),
    "intention": ("string", False),
    "intention_kind": ("string", False),
    "context": ("string", False),
    "template": ("string", False),
}

# Contract columns first, in contract order; `error_kind` is additive (a stable machine name for
# grouping; `error` is the human message).
OUTPUT_SCHEMA = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("ranked_ids", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float64())),
    pa.field("error", pa.string()),
    pa.field("n_candidates", pa.int32()),
    pa.field("error_kind", pa.string()),
])

# Error kinds decided by the job itself; every other kind comes from the engine's validation.
MISSING_REQUEST_ID = "missing_request_id"
DUPLICATE_REQUEST_ID = "duplicate_request_id"
JOB_ERROR_KINDS = (MISSING_REQUEST_ID, DUPLICATE_REQUEST_ID)

# 10k rows: small enough that a kill loses minutes of a 3B-model run, large enough that a
# million-row input is ~100 files.
DEFAULT_ROWS_PER_PART = 10_000
# Requests handed to one `Reranker.rank` call: the engine sorts by length and packs inside it.
DEFAULT_CHUNK_ROWS = 1024


class InputSchemaError(InputError):
    """The input's schema breaks the contract; raised before any work. Lists every problem."""

    kind = "schema"

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)  # (column, problem)
        columns = ", ".join(dict.fromkeys(column for column, _ in self.problems))
        problem = "; ".join(f"column {column!r} {text}" for column, text in self.problems)
        super().__init__(
            columns, problem,
            "the input must follow the request table of DESIGN.md / the README (Input columns): "
            "request_id string, candidates list<string>, optional candidate_ids list<string>, "
            "instruction or the structured fields")


# ---------------------------------------------------------------------------------------------
# Input discovery and schema validation


@dataclass(frozen=True)
class InputFile:
    path: Path
    size: int
    mtime_ns: int
    rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[str, ...]  # contract columns present in this file

    def fingerprint(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns,
                "rows": self.rows, "row_groups": len(self.row_group_rows)}


@dataclass(frozen=True)
class JobInput:
    path: Path
    files: tuple[InputFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def uri(self) -> str:
        return str(self.path)

    def fingerprint(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.rows, "files": [f.fingerprint() for f in self.files]}


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_string_list_type(t: pa.DataType) -> bool:
    is_list = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
               or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))
    # list<null>: every list was empty or all-null when written; the rows become error rows.
    return is_list and (_is_string_type(t.value_type) or pa.types.is_null(t.value_type))


def schema_problems(schema: pa.Schema, source: str) -> list[tuple[str, str]]:
    """Every contract violation of `schema` as (column, problem); empty when it conforms."""
    problems = []
    for column, (expected, required) in INPUT_COLUMNS.items():
        index = schema.get_field_index(column)
        if index < 0:
            if required:
                problems.append((column, f"is missing from {source} (expected {expected})"))
            continue
        actual = schema.field(index).type
        # An all-null optional column is written as type null by pandas and friends: fine.
        if not required and pa.types.is_null(actual):
            continue
        ok = _is_string_type(actual) if expected == "string" else _is_string_list_type(actual)
        if not ok:
            problems.append((column, f"must be {expected} but is {actual} in {source}"))
    if schema.get_all_field_indices("request_id") and len(schema.get_all_field_indices("request_id")) > 1:
        problems.append(("request_id", f"appears more than once in {source}"))
    return problems


def _list_input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        # Flat, sorted by name: deterministic. Names starting with '.' or '_' are writer
        # bookkeeping (_SUCCESS, _job.json, temp files), as pyarrow's discovery treats them.
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix == ".parquet" and not p.name.startswith((".", "_")))
        if not files:
            raise InputError("input", f"{path} holds no *.parquet file",
                             "point --input at a Parquet file or a folder of them")
        return files
    raise InputError("input", f"{path} does not exist", "point --input at a Parquet file or a folder of them")


def scan_input(path: str | os.PathLike) -> JobInput:
    """List the input files, read their footers and check every schema; nothing else is read.

    Raises `InputSchemaError` listing every problem of every file, before any work.
    """
    root = Path(path).resolve()
    files, problems = [], []
    for file_path in _list_input_files(root):
        try:
            metadata = pq.read_metadata(file_path)
            schema = pq.read_schema(file_path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError("input", f"{file_path} is not a readable Parquet file ({exc})",
                             "remove it from the input folder or rewrite it") from exc
        problems += schema_problems(schema, file_path.name)
        stat = file_path.stat()
        files.append(InputFile(
            path=file_path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, rows=metadata.num_rows,
            row_group_rows=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
            columns=tuple(c for c in INPUT_COLUMNS if schema.get_field_index(c) >= 0)))
    if problems:
        raise InputSchemaError(problems)
    return JobInput(root, tuple(files))


def iter_record_batches(job_input: JobInput, columns: Sequence[str] | None = None, *,
                        batch_rows: int = 65_536, skip=None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(global start row, batch) over the input in order, row group by row group.

    `skip(start, stop) -> bool` lets the caller leave out whole row groups (finished parts).
    """
    offset = 0
    for input_file in job_input.files:
        wanted = [c for c in (columns or input_file.columns) if c in input_file.columns]
        parquet_file = None
        for group, group_rows in enumerate(input_file.row_group_rows):
            if group_rows == 0 or (skip is not None and skip(offset, offset + group_rows)):
                offset += group_rows
                continue
            if parquet_file is None:
                parquet_file = pq.ParquetFile(input_file.path)
            for batch in parquet_file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted):
                yield offset, batch
                offset += batch.num_rows
        if parquet_file is not None:
            parquet_file.close()


# ---------------------------------------------------------------------------------------------
# Unique request ids in bounded memory


class RequestIdSet:
    """Set of request ids stored as 128-bit BLAKE2b digests: 16 bytes per id once merged.

    A Python set of a million short strings costs ~90 MB; this costs ~16 MB, so memory stays
    nearly flat as inputs grow. At 128 bits a false "seen" needs ~2^64 ids (birthday bound).
    Recent ids live in a small Python set; every `merge_every` ids they are merged into two
    uint64 arrays sorted by (hi, lo) and looked up with a vectorised binary search.
    """

    def __init__(self, merge_every: int = 1 << 16):
        self._hi = np.empty(0, np.uint64)
        self._lo = np.empty(0, np.uint64)
        self._recent: set[int] = set()
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)

    @staticmethod
    def _digest(request_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=16).digest(), "little")

    def _in_sorted(self, digests: list[int]) -> np.ndarray:
        found = np.zeros(len(digests), bool)
        if not len(self._hi) or not digests:
            return found
        hi = np.fromiter((d >> 64 for d in digests), np.uint64, len(digests))
        lo = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), np.uint64, len(digests))
        start = np.searchsorted(self._hi, hi, side="left")
        inside = start < len(self._hi)
        candidate = np.zeros(len(digests), bool)
        candidate[inside] = self._hi[start[inside]] == hi[inside]
        for i in np.flatnonzero(candidate):  # equal high halves: rare, scan the run
            j = start[i]
            while j < len(self._hi) and self._hi[j] == hi[i]:
                if self._lo[j] == lo[i]:
                    found[i] = True
                    break
                j += 1
        return found

    def _merge(self) -> None:
        recent = list(self._recent)
        hi = np.concatenate([self._hi, np.fromiter((d >> 64 for d in recent), np.uint64, len(recent))])
        lo = np.concatenate([self._lo, np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in recent), np.uint64, len(recent))])
        order = np.lexsort((lo, hi))
        self._hi, self._lo = hi[order], lo[order]
        self._recent.clear()

    def add_many(self, request_ids: Sequence[str]) -> list[bool]:
        """Add ids in order; for each, whether it had been seen before (earlier or in this call)."""
        digests = [self._digest(r) for r in request_ids]
        in_sorted = self._in_sorted(digests)
        seen = []
        for digest, old in zip(digests, in_sorted):
            if old or digest in self._recent:
                seen.append(True)
            else:
                self._recent.add(digest)
                seen.append(False)
        if len(self._recent) >= self._merge_every:
            self._merge()
        return seen


def find_duplicate_request_ids(job_input: JobInput) -> dict[str, int]:
    """{request_id: occurrences} for every non-empty id that occurs more than once.

    Reads only the request_id column. Memory: 16 bytes per distinct id plus the duplicates.
    """
    seen_ids = RequestIdSet()
    duplicates: Counter[str] = Counter()
    for _, batch in iter_record_batches(job_input, ["request_id"]):
        ids = [r for r in batch.column(0).to_pylist() if r]  # null/empty ids are their own error
        for request_id, seen in zip(ids, seen_ids.add_many(ids)):
            if seen:
                duplicates[request_id] += 1
    return {request_id: count + 1 for request_id, count in duplicates.items()}


# ---------------------------------------------------------------------------------------------
# Rows -> requests -> results -> Arrow (pure; shared with the Ray runner)


@dataclass(frozen=True)
class RowError:
    """A row the job rejects before the engine sees it; shaped like the engine's RankedResult."""

    request_id: str | None
    n_candidates: int
    error: str
    error_kind: str
    ranked_ids: tuple = ()
    scores: tuple = ()


def _as_tuple(values):
    return None if values is None else tuple(values)


def rows_to_requests(batch: pa.RecordBatch | pa.Table, duplicate_ids: Mapping[str, int]) -> list:
    """One `Request` or `RowError` per row, in order.

    The job checks only request ids; everything else (empty candidates, null or empty titles,
    duplicate candidate ids, length mismatches, templates, budget) is the engine's validation,
    so the batch job and `Reranker.rank` reject exactly the same requests with the same messages.
    """
    present = set(batch.schema.names)
    columns = {name: batch.column(name).to_pylist() for name in INPUT_COLUMNS if name in present}
    none = [None] * batch.num_rows
    out = []
    for i in range(batch.num_rows):
        request_id = columns["request_id"][i]
        candidates = columns["candidates"][i]
        n_candidates = len(candidates) if candidates is not None else 0
        if not request_id:
            out.append(RowError(request_id, n_candidates, f"request_id: is {'null' if request_id is None else 'empty'} "
                                "(give every row a unique, non-empty string id)", MISSING_REQUEST_ID))
            continue
        if request_id in duplicate_ids:
            out.append(RowError(request_id, n_candidates,
                                f"request_id: {request_id!r} occurs {duplicate_ids[request_id]} times in the input "
                                "(ids must be unique: results are joined back by request_id; "
                                "every occurrence is rejected so none is picked arbitrarily)", DUPLICATE_REQUEST_ID))
            continue
        out.append(Request(
            request_id=request_id,
            candidates=_as_tuple(candidates) or (),
            candidate_ids=_as_tuple(columns.get("candidate_ids", none)[i]),
            instruction=columns.get("instruction", none)[i],
            history=_as_tuple(columns.get("history", none)[i]),
            preference=columns.get("preference", none)[i],
            intention=columns.get("intention", none)[i],
            intention_kind=columns.get("intention_kind", none)[i],
            context=columns.get("context", none)[i],
            template=columns.get("template", none)[i],
        ))
    return out


def rank_rows(reranker, rows: list) -> list:
    """Rank the `Request`s among `rows` in one `Reranker.rank` call; `RowError`s pass through."""
    requests = [row for row in rows if not isinstance(row, RowError)]
    results = iter(reranker.rank(requests, errors="return") if requests else ())
    merged = []
    for row in rows:
        if isinstance(row, RowError):
            merged.append(row)
            continue
        result = next(results)
        if result.request_id != row.request_id:
            raise InstructRecError(f"engine returned results out of order: expected {row.request_id!r}, "
                                   f"got {result.request_id!r}")
        merged.append(result)
    return merged


def results_to_record_batch(results: Sequence) -> pa.RecordBatch:
    """Engine results / RowErrors -> one RecordBatch of OUTPUT_SCHEMA (lists empty on error)."""
    errors = [r.error for r in results]
    return pa.RecordBatch.from_arrays([
        pa.array([r.request_id for r in results], pa.string()),
        pa.array([[] if e is not None else list(r.ranked_ids) for r, e in zip(results, errors)],
                 pa.list_(pa.string())),
        pa.array([[] if e is not None else [float(s) for s in r.scores] for r, e in zip(results, errors)],
                 pa.list_(pa.float64())),
        pa.array(errors, pa.string()),
        pa.array([r.n_candidates for r in results], pa.int32()),
        pa.array([r.error_kind if e is not None else None for r, e in zip(results, errors)], pa.string()),
    ], schema=OUTPUT_SCHEMA)


def rank_record_batch(reranker, batch: pa.RecordBatch | pa.Table, duplicate_ids: Mapping[str, int]) -> pa.RecordBatch:
    """Input rows -> output rows: the whole per-batch step, used by both runners."""
    return results_to_record_batch(rank_rows(reranker, rows_to_requests(batch, duplicate_ids)))


# ---------------------------------------------------------------------------------------------
# Summary


@dataclass
class OutputCounts:
    """Row counts of output batches; a part's commit record carries its counts."""

    rows: int = 0
    ok: int = 0
    candidates: int = 0
    ok_candidates: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        n_candidates = batch.column("n_candidates").to_pylist()
        kinds = batch.column("error_kind").to_pylist()
        errors = batch.column("error").to_pylist()
        self.rows += batch.num_rows
        for n, kind, error in zip(n_candidates, kinds, errors):
            self.candidates += n
            if error is None:
                self.ok += 1
                self.ok_candidates += n
            else:
                self.errors_by_kind[kind or "unknown"] += 1

    def counts(self) -> dict[str, Any]:
        return {"ok": self.ok, "candidates": self.candidates, "ok_candidates": self.ok_candidates,
                "errors_by_kind": dict(sorted(self.errors_by_kind.items()))}

    def add_counts(self, record: Mapping[str, Any]) -> None:
        self.rows += record["rows"]
        self.ok += record["ok"]
        self.candidates += record["candidates"]
        self.ok_candidates += record["ok_candidates"]
        self.errors_by_kind.update(record["errors_by_kind"])


def job_summary(folder: OutputFolder, plan: PartPlan, this_run: OutputCounts, *, parts_written: int, wall_s: float,
                load_s: float, working_s: float, input_uri: str, input_files: int, runner: str,
                **extra: Any) -> dict[str, Any]:
    """The summary both runners print and write (`_summary.json`): the whole output's counts, from
    the parts' commit records (no part is read), and this run's share and rates."""
    whole = OutputCounts()
    for record in folder.commit_records().values():
        whole.add_counts(record)
    return {
        "rows": whole.rows, "ok": whole.ok, "errors": whole.rows - whole.ok,
        "errors_by_kind": dict(sorted(whole.errors_by_kind.items())), "candidates": whole.candidates,
        "rows_ranked": this_run.rows, "candidates_ranked": this_run.ok_candidates,
        "wall_s": round(wall_s, 3), "load_s": round(load_s, 3),
        # Rates leave the model load out: they measure the job, not the disk the model came from.
        "requests_per_s": round(this_run.rows / working_s, 3) if working_s > 0 else 0.0,
        "candidates_per_s": round(this_run.ok_candidates / working_s, 3) if working_s > 0 else 0.0,
        "parts": plan.parts, "parts_written": parts_written, "parts_skipped": len(folder.finished_parts),
        "resumed": folder.resumed, "input": input_uri, "input_files": input_files,
        "output": str(folder.location), "runner": runner, **extra,
    }


def summarize_output(output: str | os.PathLike) -> dict[str, Any]:
    """Row counts of a finished output folder (rows, ok, errors, errors_by_kind, candidates)."""
    tally = OutputCounts()
    for path in sorted(Path(output).glob("*.parquet")):
        if path.name.startswith((".", "_")):
            continue
        tally.add_batch(pq.read_table(path, columns=["n_candidates", "error_kind", "error"]))
    return {"rows": tally.rows, "ok": tally.ok, "errors": tally.rows - tally.ok,
            "errors_by_kind": dict(sorted(tally.errors_by_kind.items())), "candidates": tally.candidates}


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a few human lines (the CLI prints this; `_summary.json` holds the same)."""
    kinds = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    return "\n".join([
        f"rows        {summary['rows']}  (ok {summary['ok']}, errors {summary['errors']})",
        f"errors      {kinds}",
        f"candidates  {summary['candidates']}",
        f"this run    {summary['rows_ranked']} rows, {summary['candidates_per_s']:.1f} candidates/s, "
        f"{summary['requests_per_s']:.1f} requests/s, wall {summary['wall_s']:.1f} s",
        f"parts       {summary['parts']} (written {summary['parts_written']}, skipped {summary['parts_skipped']})",
        f"output      {summary['output']}  (summary: {SUMMARY_NAME})",
    ])


# ---------------------------------------------------------------------------------------------
# The job


def run_job(model: str | os.PathLike | ModelSource, input: str | os.PathLike, output: str | os.PathLike, *,
            backend: str = "auto", device: str = "cpu", dtype: str = "auto",
            batch_tokens: int | None = None, group_size: int = 10, resume: bool = False,
            rows_per_part: int = DEFAULT_ROWS_PER_PART, chunk_rows: int = DEFAULT_CHUNK_ROWS,
            progress: bool = True, reranker_options: Mapping[str, Any] | None = None,
            revision: str | None = None, tokenizer: str | os.PathLike | None = None,
            threads: int | None = None) -> dict[str, Any]:
    """Rank every request of `input` (a Parquet file or folder) into the parts of `output`.

    `model`: a model folder (checkpoint or ONNX export), a Hub id (at `revision`), or
    `random:<shape>` (with `tokenizer`). The schema is checked and the model resolved before the
    output folder is touched; the model loads after the output folder is checked, and the
    manifest is written once it has loaded. Returns the summary (also `output/_summary.json`).
    """
    job_input = scan_input(input)  # schema errors before loading anything
    settings = EngineSettings(backend=backend, device=device, dtype=dtype, batch_tokens=batch_tokens,
                              group_size=group_size, threads=threads, extra=dict(reranker_options or {}))
    job_model = JobModel.resolve(model, settings, revision=revision, tokenizer=tokenizer)
    return _run(job_model, job_input, output, resume=resume, rows_per_part=rows_per_part,
                chunk_rows=chunk_rows, progress=progress)


def run_job_with_reranker(reranker, input: str | os.PathLike | JobInput, output: str | os.PathLike, *,
                          resume: bool = False, rows_per_part: int = DEFAULT_ROWS_PER_PART,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = True,
                          options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The job with a reranker the caller built. `options` (JSON-able) must describe everything
    about the reranker that affects scores: it goes into the manifest, and --resume compares it."""
    return _run(_GivenReranker(reranker, dict(options or {})), input, output, resume=resume,
                rows_per_part=rows_per_part, chunk_rows=chunk_rows, progress=progress)


@dataclass(frozen=True)
class _GivenReranker:
    """A caller's Reranker in the place of a JobModel: described by the caller's options."""

    reranker: Any
    options: dict

    def settle_dtype(self, previous_options=None) -> "_GivenReranker":
        return self

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": "in-memory"}

    def manifest_options(self) -> dict[str, Any]:
        return self.options

    def load(self):
        return self.reranker


def job_manifest(job_input: JobInput, plan: PartPlan, model_entry: Mapping[str, Any],
                 options: Mapping[str, Any], runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest both runners write. `--resume` compares everything but `model` (compared by
    `job_model.model_differences`) and `runtime` (how it ran: runner, actors; not what it computed)."""
    return {"format": MANIFEST_FORMAT, "input": job_input.fingerprint(), "rows_per_part": plan.rows_per_part,
            "chunk_rows": plan.chunk_rows, "parts": plan.parts, "model": dict(model_entry), "options": dict(options),
            "output_schema": OUTPUT_SCHEMA.to_string(show_schema_metadata=False), "runtime": dict(runtime or {})}


def _run(job_model, input, output, *, resume: bool, rows_per_part: int, chunk_rows: int,
         progress: bool) -> dict[str, Any]:
    if rows_per_part < 1 or chunk_rows < 1:
        raise InputError("rows_per_part" if rows_per_part < 1 else "chunk_rows", "must be at least 1")
    started = time.perf_counter()
    job_input = input if isinstance(input, JobInput) else scan_input(input)
    plan = PartPlan(job_input.rows, rows_per_part, chunk_rows)
    faults = FaultPlan.from_env()
    with OutputFolder.claim(output, resume=resume) as folder:
        previous = folder.previous_manifest or {}
        job_model = job_model.settle_dtype(previous.get("options"))
        options = (job_model.manifest_options() if isinstance(job_model, _GivenReranker)
                   else job_model.settings.options())
        manifest = job_manifest(job_input, plan, job_model.manifest_entry(), options, {"runner": "in-process"})
        folder.check(manifest, schema=OUTPUT_SCHEMA,
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
            for record in rank_parts(reranker, job_input, plan, todo, duplicate_ids, folder, faults):
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
            pending.append(batch.slice(offset, take))
            offset, position = offset + take, position + take
            if position == chunk_end:
                yield part, pa.Table.from_batches(pending)
                pending = []
    if pending:
        raise InstructRecError("the input ended inside a chunk; it changed while the job was reading it")


def rank_parts(reranker, job_input: JobInput, plan: PartPlan, parts: Sequence[int], duplicate_ids: Mapping[str, int],
               folder: OutputFolder, faults: FaultPlan = FaultPlan()) -> Iterator[dict[str, Any]]:
    """Rank and commit each of `parts` (in order) into `folder`; yields each part's commit record."""
    writer: PartWriter | None = None
    tally = OutputCounts()
    try:
        for part, chunk in iter_part_chunks(job_input, plan, parts):
            if writer is None:
                writer, tally = folder.part_writer(part), OutputCounts()
            batch = rank_record_batch(reranker, chunk, duplicate_ids)
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
