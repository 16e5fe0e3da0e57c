"""The batch job's input: discovery, schema checks and reading by row groups, on any store.

`--input` is one Parquet file or a folder of them (flat, sorted by name; names starting with `.`
or `_` are writer bookkeeping and skipped, as pyarrow's discovery does), a local path or a URI
(`engine/job_storage.py`). `scan_input` reads only the footers: every file's schema is checked
against the request table of the contract (DESIGN.md) before any work, and every problem of every
file is listed at once. The rows are then read row group by row group, never whole, with global
row numbers, so the job can cut parts and chunks by position whatever the files' layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import InputError
from .job_storage import Location, resolve_location, short_error
from .types import parse_score_form

__all__ = ["INPUT_COLUMNS", "InputSchemaError", "InputFile", "JobInput", "schema_problems", "scan_input",
           "require_form_columns", "canonical_batch",
           "iter_record_batches"]

log = logging.getLogger(__name__)

# Column -> expected Arrow type family ("string", "list<string>" or "list<double>": any list of
# numbers), and whether it is required.
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
    "candidate_priors": ("list<double>", False),
}


class InputSchemaError(InputError):
    """The input's schema breaks the contract; raised before any work. Lists every problem."""

    kind = "schema"

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)  # (column, problem)
        columns = ", ".join(dict.fromkeys(column for column, _ in self.problems))
        problem = "; ".join(f"column {column!r} {text}" for column, text in self.problems)
        super().__init__(
            columns, problem,
            "the input must follow the request table of docs/batch-job.md (Input columns): "
            "request_id string, candidates list<string>, optional candidate_ids list<string>, "
            "instruction or the structured fields, optional candidate_priors list<double>")



@dataclass(frozen=True)
class InputFile:
    location: Location
    size: int
    mtime_ns: int | None  # None where the store keeps no modification time
    rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[str, ...]  # contract columns present in this file

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def uri(self) -> str:
        return self.location.uri

    def fingerprint(self) -> dict[str, Any]:
        return {"path": self.uri, "size": self.size, "mtime_ns": self.mtime_ns,
                "rows": self.rows, "row_groups": len(self.row_group_rows)}


@dataclass(frozen=True)
class JobInput:
    location: Location
    files: tuple[InputFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def uri(self) -> str:
        return self.location.uri

    def fingerprint(self) -> dict[str, Any]:
        return {"path": self.uri, "rows": self.rows, "files": [f.fingerprint() for f in self.files]}


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_type(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))


def _is_string_list_type(t: pa.DataType) -> bool:
    # list<null>: every list was empty or all-null when written; the rows become error rows.
    return _is_list_type(t) and (_is_string_type(t.value_type) or pa.types.is_null(t.value_type))


def _is_number_list_type(t: pa.DataType) -> bool:
    value = t.value_type if _is_list_type(t) else None
    return value is not None and (pa.types.is_floating(value) or pa.types.is_integer(value)
                                  or pa.types.is_decimal(value) or pa.types.is_null(value))


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
        ok = {"string": _is_string_type, "list<string>": _is_string_list_type,
              "list<double>": _is_number_list_type}[expected](actual)
        if not ok:
            problems.append((column, f"must be {expected} but is {actual} in {source}"))
    if schema.get_all_field_indices("request_id") and len(schema.get_all_field_indices("request_id")) > 1:
        problems.append(("request_id", f"appears more than once in {source}"))
    return problems


def _list_input_files(location: Location) -> list[pafs.FileInfo]:
    info = _info(location)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.Directory:
        try:
            entries = location.filesystem.get_file_info(pafs.FileSelector(location.path))
        except OSError as exc:
            raise InputError("input", f"cannot list {location} ({short_error(exc)})",
                             "check the path and the credentials for its store") from exc
        # Flat, sorted by name: deterministic. Names starting with '.' or '_' are writer
        # bookkeeping (_SUCCESS, _job.json, temp files), as pyarrow's discovery treats them.
        files = sorted((e for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")
                        and not e.base_name.startswith((".", "_"))), key=lambda e: e.base_name)
        if not files:
            raise InputError("input", f"{location} holds no *.parquet file",
                             "point --input at a Parquet file or a folder of them")
        return files
    raise InputError("input", f"{location} does not exist", "point --input at a Parquet file or a folder of them")


def _info(location: Location) -> pafs.FileInfo:
    try:
        return location.info()
    except OSError as exc:
        raise InputError("input", f"cannot reach {location} ({short_error(exc)})",
                         "check the path and the credentials for its store") from exc


def scan_input(path: str | os.PathLike | Location) -> JobInput:
    """List the input files, read their footers and check every schema; nothing else is read.

    Raises `InputSchemaError` listing every problem of every file, before any work.
    """
    root = resolve_location(path, "input")
    files, problems = [], []
    for info in _list_input_files(root):
        location = root if info.path.rstrip("/") == root.path.rstrip("/") else root.child(info.base_name)
        try:
            with location.filesystem.open_input_file(location.path) as handle:
                metadata = pq.read_metadata(handle)
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError("input", f"{location} is not a readable Parquet file ({short_error(exc)})",
                             "remove it from the input folder or rewrite it") from exc
        problems += schema_problems(schema, location.name)
        files.append(InputFile(
            location=location, size=info.size, mtime_ns=info.mtime_ns, rows=metadata.num_rows,
            row_group_rows=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
            columns=tuple(c for c in INPUT_COLUMNS if schema.get_field_index(c) >= 0)))
    if problems:
        raise InputSchemaError(problems)
    return JobInput(root, tuple(files))


# The one Arrow type each contract column is handed to the engine in, whatever a file stored.
CANONICAL_TYPES = {"string": pa.string(), "list<string>": pa.list_(pa.string()), "list<double>": pa.list_(pa.float64())}


def canonical_batch(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.RecordBatch:
    """`batch` with exactly the contract `columns` (in that order), each cast to its canonical type
    and a column the batch lacks filled with nulls. Files of one input may differ (large_string,
    dictionary-encoded strings, list views, integer priors, an optional column only some files
    hold); a chunk that spans two of them must still become one table."""
    arrays = []
    for name in columns:
        target = CANONICAL_TYPES[INPUT_COLUMNS[name][0]]
        index = batch.schema.get_field_index(name)
        arrays.append(pa.nulls(batch.num_rows, target) if index < 0 else _canonical_array(batch.column(index), target))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([(name, array.type) for name, array in
                                                                zip(columns, arrays)]))


def _canonical_array(array: pa.Array, target: pa.DataType) -> pa.Array:
    t = array.type
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        # pyarrow 26 casts a list view to a list wrongly (every list after the first came back
        # empty): rebuild it as a plain list of the same values, which casts correctly.
        array = pa.array(array.to_pylist(), type=pa.list_(t.value_type))
    return array if array.type == target else array.cast(target)


def require_form_columns(job_input: JobInput, normalize: str) -> None:
    """A score form ending in +priors:V reads the candidate_priors column: an input file without it
    would make every one of its rows an error row, so the job refuses before any work, naming
    each such file (InputSchemaError, exit 2)."""
    if parse_score_form(normalize).candidate_prior_weight > 0:
        lacking = [f.name for f in job_input.files if "candidate_priors" not in f.columns]
        if lacking:
            raise InputSchemaError([("candidate_priors", f"is missing from {name}, and --normalize {normalize} "
                                     "fuses it (add one number per candidate, or drop +priors:V)")
                                    for name in lacking])


def iter_record_batches(job_input: JobInput, columns: Sequence[str] | None = None, *,
                        batch_rows: int = 65_536, skip=None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(global start row, batch) over the input in order, row group by row group.

    `skip(start, stop) -> bool` lets the caller leave out whole row groups (other parts).
    """
    offset = 0
    for input_file in job_input.files:
        wanted = [c for c in (columns or input_file.columns) if c in input_file.columns]
        handle = parquet_file = None
        try:
            for group, group_rows in enumerate(input_file.row_group_rows):
                if group_rows == 0 or (skip is not None and skip(offset, offset + group_rows)):
                    offset += group_rows
                    continue
                if parquet_file is None:
                    handle = input_file.location.filesystem.open_input_file(input_file.location.path)
                    parquet_file = pq.ParquetFile(handle)
                for batch in parquet_file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted):
                    yield offset, batch
                    offset += batch.num_rows
        finally:
            if parquet_file is not None:
                parquet_file.close()
            if handle is not None:
                handle.close()
