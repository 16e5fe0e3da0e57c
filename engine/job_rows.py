"""Rows -> requests -> results -> Arrow: the per-batch step of the batch job, pure and shared by
both runners, and the output table of the contract (DESIGN.md, "Request and result tables").

The job itself checks only request ids; everything else about a row is the engine's validation,
so the batch job and `Reranker.rank(..., errors="return")` reject exactly the same requests with
the same messages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

from .errors import InstructRecError
from .job_input import INPUT_COLUMNS
from .types import Request

__all__ = ["OUTPUT_SCHEMA", "MISSING_REQUEST_ID", "DUPLICATE_REQUEST_ID", "JOB_ERROR_KINDS", "RowError",
           "rows_to_requests", "rank_rows", "results_to_record_batch", "rank_record_batch", "OutputCounts"]

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


def _as_numbers(values):
    """A candidate_priors cell as floats (a decimal column reads back as Decimal); None stays None,
    and so does a null entry, which the engine reports by position."""
    return None if values is None else tuple(v if v is None else float(v) for v in values)


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
            candidate_priors=_as_numbers(columns.get("candidate_priors", none)[i]),
        ))
    return out


def rank_rows(reranker, rows: list, normalize: str = "sum") -> list:
    """Rank the `Request`s among `rows` in one `Reranker.rank` call (by the `normalize` score);
    `RowError`s pass through."""
    requests = [row for row in rows if not isinstance(row, RowError)]
    results = iter(reranker.rank(requests, errors="return", normalize=normalize) if requests else ())
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


def rank_record_batch(reranker, batch: pa.RecordBatch | pa.Table, duplicate_ids: Mapping[str, int],
                      normalize: str = "sum") -> pa.RecordBatch:
    """Input rows -> output rows: the whole per-batch step, used by both runners."""
    return results_to_record_batch(rank_rows(reranker, rows_to_requests(batch, duplicate_ids), normalize))


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
