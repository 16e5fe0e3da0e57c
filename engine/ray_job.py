"""The batch job on Ray Data: read_parquet -> map_batches(actors holding one Reranker each) ->
write_parquet, in input order. Same input contract, same output rows and columns as
`engine.batch.run_job`; the per-batch work is the very same function (`rank_record_batch`).

Differences from the in-process job (documented in the README, 'Past one machine: Ray Data'):
- No --resume: Ray Data writes the whole output in one go; rerun into a fresh folder.
- Part files are named by Ray (`<uuid>_<task>...parquet`); reading the folder in name order gives
  input order, which is checked after the write (one pass over the request_id column) so a
  misordered write fails loudly instead of passing silently.
- Every input file must have the same contract columns (Ray reads them as one dataset).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .batch import (
    DEFAULT_CHUNK_ROWS, MANIFEST_FORMAT, MANIFEST_NAME, OUTPUT_SCHEMA, SUMMARY_NAME, JobOutputError,
    _acquire_lock, _write_json_atomically, find_duplicate_request_ids, iter_record_batches,
    part_name, rank_record_batch, scan_input, summarize_output, LOCK_NAME,
)
from .errors import InputError, InstructRecError
from .job_model import EngineSettings, JobModel
from .sources import ModelSource

__all__ = ["RayNotInstalledError", "RerankActor", "run_ray_job"]

log = logging.getLogger(__name__)


class RayNotInstalledError(InstructRecError):
    """--ray was asked for but Ray Data is not installed."""


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayNotInstalledError(
            f"--ray needs Ray Data, which is not installed ({exc}); install the extra: "
            "pip install 'instructrec[ray]' (or pip install 'ray[data]>=2.9')") from exc
    return ray


class RerankActor:
    """A Ray Data actor: loads one Reranker at start, then ranks pyarrow batches."""

    def __init__(self, job_model: JobModel, duplicate_ids: Mapping[str, int]):
        self.reranker = job_model.load()
        self.duplicate_ids = duplicate_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_batches([rank_record_batch(self.reranker, batch, self.duplicate_ids)], OUTPUT_SCHEMA)


def run_ray_job(model: str | os.PathLike | ModelSource, input: str | os.PathLike, output: str | os.PathLike, *,
                backend: str = "auto", device: str = "cpu", dtype: str = "auto",
                batch_tokens: int | None = None, group_size: int = 10, address: str | None = None,
                actors: int = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, reranker_options: Mapping[str, Any] | None = None,
                revision: str | None = None, tokenizer: str | os.PathLike | None = None,
                threads: int | None = None) -> dict[str, Any]:
    """Run the job on Ray Data. Uses the Ray instance this process is connected to, or connects
    to `address`, or starts a local one (shut down at the end). Returns the summary."""
    ray = _import_ray()
    started = time.perf_counter()
    if actors < 1:
        raise InputError("actors", f"must be at least 1, got {actors}")
    job_input = scan_input(input)  # schema errors before any work
    column_sets = {f.columns for f in job_input.files}
    if len(column_sets) > 1:
        raise InputError("input", "the input files have different columns ("
                         + "; ".join(f"{f.path.name}: {', '.join(f.columns)}" for f in job_input.files[:5])
                         + ")", "give every file the same columns (nulls for unused ones), or run without --ray")
    settings = EngineSettings(backend=backend, device=device, dtype=dtype, batch_tokens=batch_tokens,
                              group_size=group_size, threads=threads, extra=dict(reranker_options or {}))
    job_model = JobModel.resolve(model, settings, revision=revision, tokenizer=tokenizer)  # before any work
    output = Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise JobOutputError(f"--output {output} is a file; the job writes a folder of parts there")
    output.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(output)
    try:
        existing = [p.name for p in output.iterdir() if p.name != LOCK_NAME]
        if existing:
            raise JobOutputError(f"--output {output} is not empty ({sorted(existing)[:3]}); the job never "
                                 "overwrites. Delete the folder or choose a new --output (--ray has no --resume)")
        job_model = job_model.settle_dtype()
        _write_json_atomically(output / MANIFEST_NAME, {
            "format": MANIFEST_FORMAT, "runner": "ray", "input": job_input.fingerprint(), "chunk_rows": chunk_rows,
            "model": job_model.manifest_entry(), "options": job_model.settings.options(),
            "ray": {"address": address, "actors": actors, "gpus_per_actor": gpus_per_actor,
                    "cpus_per_actor": cpus_per_actor}})
        duplicate_ids = find_duplicate_request_ids(job_input)
        if job_input.rows == 0:
            pq.ParquetWriter(output / part_name(0), OUTPUT_SCHEMA).close()  # Ray writes no file for 0 rows
        else:
            _run_on_ray(ray, job_input, output, job_model, duplicate_ids, address=address,
                        actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                        chunk_rows=chunk_rows)
            _check_output_order(job_input, output)
        wall = time.perf_counter() - started
        counts = summarize_output(output)
        ok_candidates = _ok_candidates(output)
        summary = {
            **counts, "rows_ranked": counts["rows"], "candidates_ranked": ok_candidates, "wall_s": round(wall, 3),
            "requests_per_s": round(counts["rows"] / wall, 3), "candidates_per_s": round(ok_candidates / wall, 3),
            "parts": len(_output_files(output)), "parts_written": len(_output_files(output)), "parts_skipped": 0,
            "resumed": False, "input": str(job_input.path), "input_files": len(job_input.files),
            "output": str(output), "runner": "ray", "actors": actors,
        }
        _write_json_atomically(output / SUMMARY_NAME, summary)
        return summary
    finally:
        lock.close()


def _run_on_ray(ray, job_input, output: Path, job_model: JobModel, duplicate_ids: Mapping[str, int], *, address, actors, gpus_per_actor, cpus_per_actor,
                chunk_rows) -> None:
    started_here = False
    if not ray.is_initialized():
        if address is None:
            # Logical CPUs, not cores: the actors plus one for Ray Data's read and write tasks,
            # or the pipeline waits forever for a free CPU (2 actors on a 2-core machine did).
            num_cpus = max(os.cpu_count() or 1, int(actors * cpus_per_actor + 1.999))
            ray.init(include_dashboard=False, num_cpus=num_cpus, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started_here = True
    try:
        context = ray.data.DataContext.get_current()
        # Output rows must come out in input order (the contract); Ray Data reorders otherwise.
        context.execution_options.preserve_order = True
        columns = list(job_input.files[0].columns)
        dataset = ray.data.read_parquet([str(f.path) for f in job_input.files]).select_columns(columns)
        ranked = dataset.map_batches(
            RerankActor, fn_constructor_kwargs={"job_model": job_model, "duplicate_ids": dict(duplicate_ids)},
            batch_size=chunk_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor)
        ranked.write_parquet(str(output))
    finally:
        if started_here:
            ray.shutdown()


def _output_files(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("*.parquet") if not p.name.startswith((".", "_")))


def _ok_candidates(output: Path) -> int:
    total = 0
    for path in _output_files(output):
        table = pq.read_table(path, columns=["n_candidates", "error"])
        total += sum(n for n, e in zip(table.column("n_candidates").to_pylist(), table.column("error").to_pylist())
                     if e is None)
    return total


def _check_output_order(job_input, output: Path) -> None:
    """The output's request_id sequence (files in name order) must be the input's."""
    def output_ids():
        for path in _output_files(output):
            for batch in pq.ParquetFile(path).iter_batches(columns=["request_id"], batch_size=65_536):
                yield from batch.column(0).to_pylist()

    written = output_ids()
    position = 0
    for _, batch in iter_record_batches(job_input, ["request_id"]):
        for expected in batch.column(0).to_pylist():
            got = next(written, StopIteration)
            if got is StopIteration or got != expected:
                raise InstructRecError(f"Ray wrote {output} out of input order at row {position} "
                                       f"(expected request_id {expected!r}, found {got!r})")
            position += 1
    if next(written, StopIteration) is not StopIteration:
        raise InstructRecError(f"Ray wrote more rows to {output} than the input has ({position})")
