"""The batch job on Ray Data, for inputs past one machine: the same parts, the same output folder,
the same `--resume` as the in-process job (`engine.batch`), with the parts ranked by a pool of
Ray actors that each hold one Reranker.

    parts to do -> ray.data.from_items -> map_batches(PartRanker actors, one part per call) -> commit records

- Parts are keyed by input position (input row r is in part r // rows_per_part), so a rerun with
  `--resume` skips the finished ones and ranks only the missing ones. An actor reads its part's
  rows straight from the input (only the row groups that overlap it), ranks them in the same
  chunks as the in-process job and commits the part through `engine.job_output`: the output is
  the in-process job's, file for file, and either runner can resume the other's output.
- Worker faults are Ray's to retry: each actor is restarted up to `max_restarts` times after its
  process dies, and a call it was running is retried up to as many times (a part is rewritten
  from its start; a half-written temp file is never published). Past that the job fails, its
  finished parts stay, and `--resume` continues. A model that fails to load fails the job at once
  (Ray Data does not restart an actor whose constructor raised).
- The driver resolves the model, checks the schema and the output folder, finds the duplicate
  ids and writes the manifest before any actor starts; a start that fails before any part is
  committed removes the manifest again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

from .batch import rank_parts
from .errors import InputError, InstructRecError
from .job_faults import FaultPlan
from .job_ids import find_duplicate_request_ids
from .job_input import JobInput, require_form_columns, scan_input
from .job_model import LATER_OPTION_DEFAULTS, EngineSettings, JobModel, model_differences
from .job_output import DEFAULT_CHUNK_ROWS, DEFAULT_ROWS_PER_PART, OutputFolder, PartPlan
from .job_rows import OUTPUT_SCHEMA, OutputCounts
from .job_storage import Location
from .job_summary import job_manifest, job_summary
from .sources import ModelSource

__all__ = ["RayNotInstalledError", "PartRanker", "run_ray_job", "DEFAULT_ACTOR_RESTARTS"]

log = logging.getLogger(__name__)

# Restarts of one actor after its process died, and retries of the call it was running. 3: a
# node lost now and then is survived; a part that kills its actor every time (a poison input,
# OOM) stops the job after 4 attempts instead of looping forever.
DEFAULT_ACTOR_RESTARTS = 3


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


class PartRanker:
    """A Ray Data actor: loads one Reranker at start, then ranks and commits whole parts."""

    def __init__(self, job_model: JobModel, job_input: JobInput, plan: PartPlan, duplicate_ids: Mapping[str, int],
                 output: Location, faults: FaultPlan):
        self.reranker = job_model.load()
        self.normalize = job_model.settings.normalize
        self.job_input, self.plan, self.duplicate_ids, self.faults = job_input, plan, duplicate_ids, faults
        self.folder = OutputFolder.for_workers(output, schema=OUTPUT_SCHEMA)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        records = []
        for part in batch["part"]:
            records += rank_parts(self.reranker, self.job_input, self.plan, [int(part)], self.duplicate_ids,
                                  self.folder, self.faults, normalize=self.normalize)
        return {"part": [r["part"] for r in records], "record": [json.dumps(r) for r in records]}


def run_ray_job(model: str | os.PathLike | ModelSource, input: str | os.PathLike, output: str | os.PathLike, *,
                backend: str = "auto", device: str = "cpu", dtype: str = "auto",
                batch_tokens: int | None = None, group_size: int = 10, resume: bool = False,
                rows_per_part: int = DEFAULT_ROWS_PER_PART, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                address: str | None = None, actors: int = 1, gpus_per_actor: float | None = None,
                cpus_per_actor: float = 1.0, max_restarts: int = DEFAULT_ACTOR_RESTARTS,
                reranker_options: Mapping[str, Any] | None = None, revision: str | None = None,
                tokenizer: str | os.PathLike | None = None, threads: int | None = None,
                progress: bool = True, normalize: str = "sum",
                ensemble: Sequence[str | os.PathLike | ModelSource] = ()) -> dict[str, Any]:
    """Run the job on Ray Data. Uses the Ray instance this process is connected to, or connects
    to `address`, or starts a local one (shut down at the end). Returns the summary.

    `threads` defaults to `cpus_per_actor` (rounded down, at least 1) in each actor."""
    if actors < 1:
        raise InputError("actors", f"must be at least 1, got {actors}")
    if max_restarts < 0:
        raise InputError("max_restarts", f"must be 0 or more, got {max_restarts}")
    gpus_per_actor = _gpus_per_actor(device, gpus_per_actor)
    ray = _import_ray()
    started = time.perf_counter()
    job_input = scan_input(input)  # schema errors before any work
    require_form_columns(job_input, normalize)
    settings = EngineSettings(backend=backend, device=device, dtype=dtype, batch_tokens=batch_tokens,
                              group_size=group_size, threads=threads, extra=dict(reranker_options or {}),
                              normalize=normalize)
    job_model = JobModel.resolve(model, settings, revision=revision, tokenizer=tokenizer,
                                 ensemble=tuple(ensemble))  # before any work
    plan = PartPlan(job_input.rows, rows_per_part, chunk_rows)
    faults = FaultPlan.from_env()
    with OutputFolder.claim(output, resume=resume) as folder:
        previous = folder.previous_manifest or {}
        job_model = job_model.settle_dtype(previous.get("options"))
        runtime = {"runner": "ray", "actors": actors, "cpus_per_actor": cpus_per_actor,
                   "gpus_per_actor": gpus_per_actor, "max_restarts": max_restarts}
        manifest = job_manifest(job_input, plan, job_model.manifest_entry(), job_model.manifest_options(), runtime)
        folder.check(manifest, schema=OUTPUT_SCHEMA, option_defaults=LATER_OPTION_DEFAULTS,
                     model_change=model_differences(previous.get("model"), manifest["model"]) if previous else None)
        duplicate_ids = find_duplicate_request_ids(job_input)
        folder.start()  # before the actors load the model; removed again if no part gets committed
        todo = [p for p in range(plan.parts) if p not in folder.finished_parts]
        this_run = OutputCounts()
        begun = time.perf_counter()
        if todo:
            if job_model.settings.threads is None:  # one engine thread per reserved CPU, not all cores
                job_model = job_model.with_threads(max(1, int(cpus_per_actor)))
            for done, record in enumerate(_rank_on_ray(
                    ray, todo, job_model, job_input, plan, duplicate_ids, folder.location, faults, address=address,
                    actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                    max_restarts=max_restarts, progress=progress), start=1):
                this_run.add_counts(record)
                faults.at("driver-after-parts", done)
            folder.remove_debris()  # every part is committed: no write is in flight any more
        finished = time.perf_counter()
        summary = job_summary(folder, plan, this_run, parts_written=len(todo), wall_s=finished - started,
                              load_s=0.0, working_s=finished - begun, input_uri=job_input.uri,
                              input_files=len(job_input.files), runner="ray", actors=actors)
        folder.write_summary(summary)
        return summary


def _gpus_per_actor(device: str, gpus_per_actor: float | None) -> float:
    """--device cuda needs GPUs reserved for each actor: Ray hides the GPUs from an actor that
    reserved none (CUDA_VISIBLE_DEVICES is empty), and the model load would fail inside it."""
    on_cuda = device.split(":")[0] == "cuda"
    if gpus_per_actor is None:
        if on_cuda:
            raise InputError("gpus_per_actor", "--ray --device cuda needs GPUs reserved for each actor: without "
                             "them Ray starts the actors with no GPU visible and the model load fails inside them",
                             "pass --gpus-per-actor 1 (or a fraction, e.g. 0.5 to put two actors on one GPU)")
        return 0.0
    if gpus_per_actor < 0:
        raise InputError("gpus_per_actor", f"must be 0 or more, got {gpus_per_actor}")
    if on_cuda and gpus_per_actor == 0:
        raise InputError("gpus_per_actor", "is 0 with --device cuda: the actors would see no GPU",
                         "pass --gpus-per-actor 1 (or a fraction), or --device cpu")
    return float(gpus_per_actor)


def _rank_on_ray(ray, todo: Sequence[int], job_model: JobModel, job_input: JobInput, plan: PartPlan,
                 duplicate_ids: Mapping[str, int], output: Location, faults: FaultPlan, *, address, actors: int,
                 gpus_per_actor: float, cpus_per_actor: float, max_restarts: int,
                 progress: bool) -> Iterator[dict[str, Any]]:
    """The commit records of the parts in `todo`, as the actors finish them."""
    started_here = False
    if not ray.is_initialized():
        if address is None:
            # Logical CPUs, not cores: the actors plus one for Ray Data's own tasks, or the pipeline
            # waits forever for a free CPU (2 actors on a 2-core machine did).
            num_cpus = max(os.cpu_count() or 1, int(actors * cpus_per_actor + 1.999))
            ray.init(include_dashboard=False, num_cpus=num_cpus, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started_here = True
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        # One block per part, one part per call: a retried call redoes exactly one part.
        parts = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
        with warnings.catch_warnings():
            # Ray Data takes actor restarts only through its generic remote args, which Ray 2.60
            # marks deprecated without a named replacement yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ranked = parts.map_batches(
                PartRanker, batch_size=1, batch_format="numpy",
                fn_constructor_kwargs={"job_model": job_model, "job_input": job_input, "plan": plan,
                                       "duplicate_ids": dict(duplicate_ids), "output": output, "faults": faults},
                # One part in flight per actor: a part is minutes of work, so queueing a second one
                # behind it would only leave another actor idle at the end.
                compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo)), max_tasks_in_flight_per_actor=1),
                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                max_restarts=max_restarts, max_task_retries=max_restarts)
        try:
            for row in ranked.iter_rows():
                yield json.loads(row["record"])
        except Exception as exc:  # Ray wraps what failed in an actor; an InstructRecError stays one line
            cause = _instructrec_cause(exc)
            if cause is not None:
                raise cause from None
            raise
    finally:
        if started_here:
            ray.shutdown()


def _instructrec_cause(exc: BaseException) -> InstructRecError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InstructRecError):
            return exc
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None
