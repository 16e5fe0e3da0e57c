"""What both runners record about a run: its manifest (what the output is computed from, which
`--resume` compares) and its summary (what the output holds and what this run did)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import pyarrow.parquet as pq

from .job_input import JobInput
from .job_output import MANIFEST_FORMAT, SUMMARY_NAME, OutputFolder, PartPlan, list_parts
from .job_rows import OUTPUT_SCHEMA, OutputCounts
from .job_storage import resolve_location

__all__ = ["job_manifest", "job_summary", "format_summary", "summarize_output"]


def job_manifest(job_input: JobInput, plan: PartPlan, model_entry: Mapping[str, Any],
                 options: Mapping[str, Any], runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest both runners write. `--resume` compares everything but `model` (compared by
    `job_model.model_differences`) and `runtime` (how it ran: runner, actors; not what it computed)."""
    return {"format": MANIFEST_FORMAT, "input": job_input.fingerprint(), "rows_per_part": plan.rows_per_part,
            "chunk_rows": plan.chunk_rows, "parts": plan.parts, "model": dict(model_entry), "options": dict(options),
            "output_schema": OUTPUT_SCHEMA.to_string(show_schema_metadata=False), "runtime": dict(runtime or {})}


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
    """Row counts of an output folder read from its parts (rows, ok, errors, errors_by_kind,
    candidates): the check a reader can run without trusting the commit records."""
    folder = resolve_location(output, "output")
    tally = OutputCounts()
    for name in list_parts(folder):
        with folder.filesystem.open_input_file(folder.child(name).path) as handle:
            tally.add_batch(pq.read_table(handle, columns=["n_candidates", "error_kind", "error"]))
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
