"""Model sources: the one place that turns what a user passed as `--model` into something to load.

Every command and API that takes a model (`train`, `export`, `rerank`, `eval`, `bench`, the Ray
job, `Reranker.from_pretrained`) calls `resolve_model` and accepts the same three spellings:

- a local folder, used as it is: a `save_pretrained` checkpoint (config.json + model.safetensors,
  a sharded model.safetensors.index.json, or pytorch_model.bin) or an `instructrec export` folder
  (recognised by its manifest);
- a Hugging Face Hub id `org/name` (optionally a revision: branch, tag or commit), fetched with
  `huggingface_hub.snapshot_download` into the Hugging Face cache, only the files the engine and
  tokenizer read. `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read at call time.
  The resolved commit hash is part of the source's identity (job manifests, training configs);
- `random:<shape>` (engine/presets.py): a randomly initialised architecture, for speed and memory
  work only, announced with a WARNING. A bare shape name (`flan-t5-xl`) is refused: it is
  ambiguous between the pretrained `google/flan-t5-xl` and `random:flan-t5-xl`.

This module imports neither torch nor transformers, so a CLI can resolve (and refuse) a model
before paying for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ModelLoadError
from .presets import HUB_IDS, RANDOM_PREFIX, SHAPES, shape_config

__all__ = ["ModelSource", "ModelSourceError", "resolve_model", "EXPORT_MANIFEST_NAME", "CHECKPOINT", "ONNX",
           "RANDOM", "hub_cache_dir", "hub_offline"]

log = logging.getLogger(__name__)

CHECKPOINT, ONNX, RANDOM = "checkpoint", "onnx", "random"
# The manifest that marks an `instructrec export` folder (written by export/, read by
# engine/onnx_backend.py); here so that resolving a folder needs no onnxruntime.
EXPORT_MANIFEST_NAME = "instructrec_onnx.json"

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json",
                   "added_tokens.json")
# Weight formats in the order the engine prefers them; only the first one a repository has is
# fetched (google/flan-t5-xl ships 11 GB of safetensors AND 11 GB of pytorch_model-*.bin).
_WEIGHT_PATTERNS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
)
_EXPORT_PATTERNS = (EXPORT_MANIFEST_NAME, "*.onnx", "*.onnx_data", "*.onnx.data", "validation.json")
# org/name as the Hub spells repository ids: no leading dot or dash, no "..", at most 96 chars.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "true", "yes", "on"}


class ModelSourceError(InputError):
    """`--model` names nothing loadable: the message says what was tried and how to fix it."""

    kind = "model_source"

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__("model", problem, fix)


@dataclass(frozen=True)
class ModelSource:
    """What `--model` resolved to. `path` is a local folder for CHECKPOINT and ONNX (a Hub id's
    cached snapshot), None for RANDOM (`shape` names the architecture)."""

    spec: str  # what the user gave
    kind: str  # CHECKPOINT | ONNX | RANDOM
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    shape: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    def config(self) -> dict:
        """The architecture's config.json dict (RANDOM: the shape's; ONNX: from its manifest)."""
        if self.kind == RANDOM:
            return shape_config(self.shape)  # type: ignore[arg-type]
        if self.kind == ONNX:
            manifest = _read_json(self.path / EXPORT_MANIFEST_NAME)  # type: ignore[operator]
            return dict(manifest.get("hf_config") or manifest.get("t5_config") or {})
        return _read_json(self.path / "config.json")  # type: ignore[operator]

    def identity(self) -> dict[str, Any]:
        """JSON-able description for manifests and training configs: what was asked and exactly
        which weights it meant (a Hub id's commit; a folder's absolute path)."""
        out: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.path is not None:
            out["path"] = str(self.path)
        for key in ("repo_id", "revision", "commit", "shape"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def describe(self) -> str:
        if self.kind == RANDOM:
            return f"{self.spec} (RANDOM weights)"
        if self.repo_id is not None:
            return f"{self.repo_id}@{(self.commit or '?')[:12]} ({self.path})"
        return str(self.path)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (huggingface_hub reads it once
    at import, which would miss a HF_HOME set later in the same process)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(spec: str | os.PathLike, *, revision: str | None = None,
                  allowed: tuple[str, ...] = (CHECKPOINT, ONNX, RANDOM)) -> ModelSource:
    """Turn `--model` into a ModelSource (see the module docstring); ModelSourceError if it names
    nothing loadable or a kind the caller cannot use (`allowed`)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ModelSourceError("no model given", "pass a folder, a Hub id such as google/flan-t5-base, "
                               "or random:<shape>")
    text = os.fspath(spec)
    if text.startswith(RANDOM_PREFIX):
        source = _random_source(text)
    else:
        path = Path(text).expanduser()
        if path.exists():
            if revision is not None:
                raise ModelSourceError(f"--revision {revision!r} given with a local folder {text!r}",
                                       "drop --revision (it selects a Hub revision)")
            source = _folder_source(text, path)
        elif _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
            source = _hub_source(text, revision)
        else:
            raise _not_found(text)
    if source.kind not in allowed:
        raise ModelSourceError(f"{text!r} is {_KIND_WORDS[source.kind]}, which this command does not take",
                               _KIND_FIX.get(source.kind))
    return source


_KIND_WORDS = {CHECKPOINT: "a Hugging Face checkpoint", ONNX: "an ONNX export (instructrec export)",
               RANDOM: "a random-weight model"}
_KIND_FIX = {
    ONNX: "pass the Hugging Face checkpoint the export was made from",
    RANDOM: "pass a trained checkpoint folder or a Hub id",
    CHECKPOINT: "export it first with `instructrec export --model DIR --out ONNX_DIR`",
}


def _not_found(text: str) -> ModelSourceError:
    bare = text.strip().rstrip("/")
    choices = []
    if bare in HUB_IDS:
        choices.append(f"--model {HUB_IDS[bare]} (the pretrained weights from the Hugging Face Hub)")
    if bare in SHAPES:
        choices.append(f"--model {RANDOM_PREFIX}{bare} (the architecture with RANDOM weights, for speed "
                       "and memory work only)")
    if choices:
        return ModelSourceError(f"{text!r} is a bare model name, not a folder: it could mean pretrained or "
                                "random weights", "use " + ", or ".join(choices))
    return ModelSourceError(
        f"{text!r} is not an existing folder, a Hub id (org/name) or random:<shape>",
        f"pass a save_pretrained folder, an instructrec export folder, a Hub id such as google/flan-t5-base, "
        f"or one of: {', '.join(RANDOM_PREFIX + s for s in SHAPES)}")


def _random_source(text: str) -> ModelSource:
    shape = text[len(RANDOM_PREFIX):]
    if shape not in SHAPES:
        raise ModelSourceError(f"unknown random shape {shape!r}",
                               f"use one of: {', '.join(RANDOM_PREFIX + s for s in SHAPES)}")
    log.warning("model %s: RANDOMLY INITIALISED weights (architecture %s). Fine for speed and memory "
                "work; its scores and rankings mean nothing.", text, shape)
    return ModelSource(spec=text, kind=RANDOM, shape=shape)


def _folder_source(text: str, path: Path) -> ModelSource:
    path = path.resolve()
    if not path.is_dir():
        raise ModelSourceError(f"{path} is a file, not a model folder",
                               "pass the folder that holds config.json (or an export's manifest)")
    kind = _folder_kind(path)
    if kind is None:
        raise ModelLoadError(f"{path}: not a model folder (no config.json of a save_pretrained checkpoint, "
                             f"no {EXPORT_MANIFEST_NAME} of an instructrec export)")
    commit = None
    # A folder inside the Hugging Face cache (snapshots/<commit>/) keeps its commit.
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        commit = path.name
    return ModelSource(spec=text, kind=kind, path=path, commit=commit)


def _folder_kind(path: Path) -> str | None:
    if (path / EXPORT_MANIFEST_NAME).is_file():
        return ONNX
    if (path / "config.json").is_file():
        return CHECKPOINT
    return None


def _hub_source(repo_id: str, revision: str | None) -> ModelSource:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ModelSourceError(f"{repo_id!r} looks like a Hub id but huggingface_hub is not installed",
                               "pip install huggingface_hub") from e
    cache = hub_cache_dir()
    token = os.environ.get("HF_TOKEN") or None
    offline = hub_offline()
    fetch = (f"fetch it where the Hub is reachable: `huggingface-cli download {repo_id}"
             f"{' --revision ' + revision if revision else ''}` (or `python -c \"from huggingface_hub import "
             f"snapshot_download; snapshot_download('{repo_id}')\"`), then point HF_HOME at that cache")
    patterns: list[str] | None = None
    pinned = revision
    if not offline:
        try:
            info = huggingface_hub.HfApi().model_info(repo_id, revision=revision, token=token)
            files = [s.rfilename for s in (info.siblings or [])]
            patterns = _patterns_for(repo_id, files)
            pinned = info.sha or revision
        except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
            raise ModelSourceError(f"Hub repository {repo_id!r} not found or not accessible ({type(e).__name__})",
                                   "check the id; for a private or gated model set HF_TOKEN") from e
        except hub_errors.RevisionNotFoundError as e:
            raise ModelSourceError(f"revision {revision!r} of {repo_id!r} not found on the Hub",
                                   "pass a branch, tag or commit that exists") from e
        except Exception as e:  # no network, proxy, Hub down: fall back to the cache as huggingface_hub does
            log.warning("the Hugging Face Hub is unreachable (%s: %s); looking for %s in the cache %s",
                        type(e).__name__, e, repo_id, cache)
            offline = True
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=pinned, cache_dir=str(cache), token=token, local_files_only=offline,
            allow_patterns=patterns)
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError) as e:
        where = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub is unreachable"
        raise ModelSourceError(
            f"{repo_id!r}{' revision ' + repr(revision) if revision else ''} is not in the Hugging Face cache "
            f"{cache} and {where}, so it cannot be downloaded (no local folder of that name either)", fetch) from e
    except hub_errors.HfHubHTTPError as e:
        raise ModelSourceError(f"downloading {repo_id!r} failed: {e}", "retry, or check HF_TOKEN") from e
    path = Path(folder)
    commit = path.name if path.parent.name == "snapshots" else pinned
    kind = _folder_kind(path)
    if kind is None:
        raise ModelLoadError(f"{repo_id} ({path}): the snapshot holds no config.json nor {EXPORT_MANIFEST_NAME} "
                             "(an incomplete download? fetch it again)")
    log.info("model %s: revision %s, cached at %s", repo_id, commit, path)
    return ModelSource(spec=repo_id, kind=kind, path=path, repo_id=repo_id, revision=revision, commit=commit)


def _patterns_for(repo_id: str, files: list[str]) -> list[str]:
    """allow_patterns for snapshot_download: config, tokenizer, and ONE weight format."""
    names = set(files)
    if EXPORT_MANIFEST_NAME in names:
        return list(_EXPORT_PATTERNS) + list(TOKENIZER_FILES) + list(CONFIG_FILES)
    import fnmatch

    for group in _WEIGHT_PATTERNS:
        if any(fnmatch.fnmatch(f, p) for f in files for p in group):
            return list(CONFIG_FILES) + list(TOKENIZER_FILES) + list(group)
    raise ModelSourceError(f"Hub repository {repo_id!r} has no model weights the engine reads "
                           f"(model.safetensors, sharded safetensors or pytorch_model.bin; it has {sorted(names)[:8]})",
                           "pass a T5 / Flan-T5 repository")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"{file}: missing") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from e
