"""What a batch job ranks with: the model source and the engine settings, resolved once before any
work, recorded in the job manifest, and loaded where the ranking runs (in-process, or in each Ray
actor). Shared by `engine.batch` and `engine.ray_job`: the one definition of the engine options.

- `--model` goes through `engine.sources.resolve_model` (a folder, a Hub id at a revision, or
  `random:<shape>`), so a bad model stops the job before it touches the output folder.
- `backend="auto"` is picked from the source: an `instructrec export` folder runs on onnxruntime,
  everything else on torch.
- `dtype="auto"` on the torch backend is resolved here by the project's one precision policy
  (`engine.capabilities.auto_dtype_name`), so the manifest records the precision that was used;
  `--resume` with `auto` continues in the precision of the run it resumes (the policy measures the
  machine, and a loaded machine must not switch a half-finished job to another precision).
- `--ensemble` adds models whose scores are summed with `--model`'s (engine/reranker.py,
  ensembles): each resolved alike (a folder or Hub id; an export with the onnx backend), recorded
  in the manifest beside the model, and compared on `--resume` as the model is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError
from .sources import CHECKPOINT, ONNX, RANDOM, ModelSource, resolve_model
from .types import parse_score_form

__all__ = ["BACKENDS", "DTYPES", "EngineSettings", "JobModel", "model_differences", "LATER_OPTION_DEFAULTS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("auto", "float32", "bfloat16", "int8")
# Options added after the manifest format was fixed, with the value a run before them used: an
# output ranked before `normalize` existed was ranked by the summed score, and resuming it with
# the default must not be refused for a key its manifest could not have.
LATER_OPTION_DEFAULTS = {"normalize": "sum"}


@dataclass(frozen=True)
class EngineSettings:
    """Every engine option that affects scores. `options()` is what goes into the manifest (and
    what `--resume` compares); `reranker_kwargs()` what `Reranker.from_pretrained` receives."""

    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    batch_tokens: int | None = None
    group_size: int = 10
    # torch intra-op threads (torch.set_num_threads) or onnxruntime's intra-op threads; None: the
    # runtime's default (all cores in-process; in a Ray actor, its --cpus-per-actor).
    threads: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # further Reranker options (compile_model, ...)
    # The score each candidate is ranked by (`Reranker.rank(normalize=...)`): "sum", "mean",
    # "calibrated" or "calibrated:W"; `instructrec eval` names the form that won on validation in
    # its metrics.json.
    normalize: str = "sum"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise InputError("backend", f"unknown backend {self.backend!r}", f"use one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise InputError("dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.threads is not None and self.threads < 1:
            raise InputError("threads", f"must be at least 1, got {self.threads}")
        parse_score_form(self.normalize)

    def options(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype, "group_size": self.group_size,
                "batch_tokens": self.batch_tokens, "threads": self.threads, "normalize": self.normalize,
                **dict(self.extra)}

    def reranker_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"group_size": self.group_size, **dict(self.extra)}
        if self.batch_tokens is not None:
            kwargs["batch_tokens"] = self.batch_tokens
        if self.backend == "onnx" and self.threads is not None:
            kwargs["threads"] = self.threads  # torch threads are process-wide: set in JobModel.load
        return kwargs


@dataclass(frozen=True)
class JobModel:
    """A resolved model source with concrete engine settings (backend never "auto"; dtype "auto"
    only where the ONNX export decides it). Picklable: Ray ships it to every actor."""

    source: ModelSource
    settings: EngineSettings
    tokenizer: str | None = None  # a tokenizer folder, for random:<shape> models that carry none
    ensemble: tuple[ModelSource, ...] = ()  # further models, scores summed with source's

    @classmethod
    def resolve(cls, model: str | os.PathLike | ModelSource, settings: EngineSettings, *,
                revision: str | None = None, tokenizer: str | os.PathLike | None = None,
                ensemble: "tuple[str | os.PathLike | ModelSource, ...] | list" = ()) -> "JobModel":
        """Resolve `--model` (ModelSourceError, exit 2, when it names nothing loadable) and pick the
        backend; then each `--ensemble` model (trained weights, the same backend; a Hub id at its
        main branch, `revision` being --model's). Loads nothing: this runs before the job touches
        its output folder."""
        source = model if isinstance(model, ModelSource) else resolve_model(model, revision=revision)
        members = []
        for n, member in enumerate(ensemble):
            try:
                resolved = member if isinstance(member, ModelSource) else resolve_model(member)
            except InputError as exc:  # resolve_model names its argument "model"
                raise InputError(f"ensemble[{n}]", exc.problem, exc.fix) from exc
            if resolved.is_random or source.is_random:
                raise InputError(f"ensemble[{n}]" if resolved.is_random else "model",
                                 f"{(resolved if resolved.is_random else source).describe()} has random weights",
                                 "ensemble trained models only")
            if (resolved.kind == ONNX) != (source.kind == ONNX):
                raise InputError(f"ensemble[{n}]", f"{resolved.describe()} and {source.describe()} need two "
                                 "backends", "ensemble checkpoints with a checkpoint, ONNX exports with an export")
            members.append(resolved)
        backend = settings.backend
        if backend == "auto":
            backend = "onnx" if source.kind == ONNX else "torch"
        elif backend == "onnx" and source.kind != ONNX:
            raise InputError("backend", f"{source.describe()} is not an ONNX export (instructrec export)",
                             "pass the export folder, or --backend torch (or auto) for a checkpoint")
        elif backend == "torch" and source.kind == ONNX:
            raise InputError("backend", f"{source.describe()} is an ONNX export, which the torch backend cannot "
                             "load", "pass --backend onnx (or auto), or the Hugging Face checkpoint it was made from")
        tokenizer_path = None
        if tokenizer is not None:
            tokenizer_path = Path(tokenizer).expanduser().resolve()
            if not tokenizer_path.is_dir():
                raise InputError("tokenizer", f"{tokenizer} is not a folder",
                                 "pass a folder with tokenizer.json or spiece.model (save_pretrained layout)")
        return cls(source, replace(settings, backend=backend), str(tokenizer_path) if tokenizer_path else None,
                   tuple(members))

    def settle_dtype(self, previous_options: Mapping[str, Any] | None = None) -> "JobModel":
        """Resolve dtype="auto" for the torch backend: the resumed run's precision when there is one,
        else the precision policy of this machine. ONNX keeps "auto" (the export's own dtype)."""
        if self.settings.dtype != "auto" or self.settings.backend != "torch":
            return self
        previous = (previous_options or {}).get("dtype")
        if previous in ("float32", "bfloat16"):
            log.info("dtype auto: continuing in %s, the precision of the run being resumed", previous)
            return replace(self, settings=replace(self.settings, dtype=previous))
        from .capabilities import auto_dtype_name

        device_type = self.settings.device.split(":")[0]
        if device_type == "cuda" and not _cuda_here():
            # A Ray driver without a GPU deciding for its GPU actors: bf16, the precision of the
            # design on GPUs (GPUs before Ampere lack it: pass --dtype float32 there).
            dtype = "bfloat16"
        else:
            dtype = auto_dtype_name(device_type, self.settings.threads)
        log.info("dtype auto: %s on %s", dtype, self.settings.device)
        return replace(self, settings=replace(self.settings, dtype=dtype))

    def with_threads(self, threads: int) -> "JobModel":
        return replace(self, settings=replace(self.settings, threads=threads))

    def manifest_entry(self) -> dict[str, Any]:
        """The source's identity (a Hub id's resolved commit, a folder's path) plus, for a local
        folder, its top-level files' sizes and mtimes: a model retrained into the same folder, or a
        Hub id whose ref moved, makes `--resume` refuse instead of mixing two models' scores."""
        entry = _source_entry(self.source)
        if self.tokenizer is not None:
            entry["tokenizer"] = self.tokenizer
        if self.ensemble:
            entry["ensemble"] = [_source_entry(member) for member in self.ensemble]
        return entry

    def manifest_options(self) -> dict[str, Any]:
        return self.settings.options()

    def load(self):
        """The Reranker, loaded on this process's device (a Ray actor calls this on its node)."""
        from .reranker import Reranker

        settings = self.settings
        if settings.backend == "torch" and settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)
        sources = [_on_this_node(s) for s in (self.source, *self.ensemble)]
        return Reranker.from_pretrained(sources, backend=settings.backend, device=settings.device, dtype=settings.dtype,
                                        tokenizer=self.tokenizer, **settings.reranker_kwargs())


def _on_this_node(source: ModelSource) -> ModelSource:
    if source.repo_id is not None and (source.path is None or not source.path.exists()):
        # Another node of a cluster: fetch the same commit into this node's Hugging Face cache.
        return resolve_model(source.repo_id, revision=source.commit or source.revision)
    return source


def _source_entry(source: ModelSource) -> dict[str, Any]:
    entry = dict(source.identity())
    if source.path is not None and source.repo_id is None:
        entry["files"] = _folder_fingerprint(source.path)
    return entry


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _folder_fingerprint(folder: Path) -> list[dict[str, Any]]:
    if not folder.is_dir():
        return []
    return [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in sorted(folder.iterdir()) if p.is_file()]


def model_differences(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """Why the model of a resumed run is not the one that wrote the output, in words; None if it is.

    A Hub model is the same when it resolves to the same commit (however the revision was spelled,
    so `--revision <old commit>` finishes a job whose branch moved); a folder when its path and
    files are unchanged; a random model when its shape is; an ensemble when each of its models is."""
    why = _one_model_differences(previous, current)
    if why is not None:
        return why
    before, now = list((previous or {}).get("ensemble") or []), list(current.get("ensemble") or [])
    if len(before) != len(now):
        return (f"the output was written with {len(before)} --ensemble model(s) beside the model, this run has "
                f"{len(now)}")
    for n, (a, b) in enumerate(zip(before, now)):
        why = _one_model_differences(a, b)
        if why is not None:
            return f"--ensemble model {n + 1}: {why}"
    return None


def _one_model_differences(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    previous = dict(previous or {})
    if previous.get("kind") != current.get("kind"):
        return f"the output was written with {_describe(previous)}, this run has {_describe(current)}"
    if current.get("repo_id") is not None or previous.get("repo_id") is not None:
        if (previous.get("repo_id"), previous.get("commit")) == (current.get("repo_id"), current.get("commit")):
            return None
        old_commit = previous.get("commit") or "?"
        fix = f"; resume with --revision {old_commit} to finish with the same weights" if previous.get("commit") else ""
        return (f"{current.get('repo_id')} now resolves to commit {current.get('commit')}, but the output was "
                f"written with {previous.get('repo_id')} at commit {old_commit} (the model moved under the same "
                f"id){fix}")
    if current.get("kind") == RANDOM:
        return None if previous.get("shape") == current.get("shape") else (
            f"the output was written with random:{previous.get('shape')}, this run has random:{current.get('shape')}")
    if previous.get("path") != current.get("path"):
        return f"the output was written with the model at {previous.get('path')}, this run has {current.get('path')}"
    if previous.get("files") != current.get("files") or previous.get("tokenizer") != current.get("tokenizer"):
        changed = sorted({f["name"] for f in previous.get("files") or []} ^ {f["name"] for f in current.get("files") or []}
                         | {a["name"] for a, b in zip(previous.get("files") or [], current.get("files") or [])
                            if a != b})
        return (f"the model folder {current.get('path')} changed since the output was written "
                f"(files {', '.join(changed[:5]) or 'tokenizer'} differ: retrained or replaced)")
    return None


def _describe(entry: Mapping[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == RANDOM:
        return f"random:{entry.get('shape')}"
    if entry.get("repo_id"):
        return f"{entry['repo_id']}@{entry.get('commit')}"
    words = {CHECKPOINT: "the checkpoint", ONNX: "the ONNX export"}.get(kind, "the model")
    return f"{words} at {entry.get('path')}" if entry else "an unknown model"
