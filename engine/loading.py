"""Loading: a model source (engine/sources.py) becomes a backend (engine/backend.py) and a tokenizer.

- `load_pretrained`: what `Reranker.from_pretrained` takes (a folder, a Hub id, `random:<shape>` or
  a resolved ModelSource), backend "auto" picking torch for a checkpoint and onnxruntime for an
  `instructrec export` folder;
- `load_from_model`: an in-memory transformers T5ForConditionalGeneration, its weights copied;
- `load_tokenizer`: the one tokenizer loader (a folder or a Hub id), for the engine and training.

Checkpoint weights are streamed: each safetensors tensor is read on its own (`safe_open`), copied
into its rows of a model allocated once in the target dtype on the target device, and released,
so peak host memory stays near the loaded model plus one tensor instead of two full copies.
Measured with bench/load_memory.py (flan-t5-large shape: 783M parameters, 2,988 MiB of fp32
safetensors; AMD EPYC Zen 4 VM, 2 cores, shared with other jobs): memory `from_pretrained` added
to the interpreter's (peak RSS - RSS before), against the loaded model's size:

    checkpoint           dtype      model       before (whole state dict)   streamed
    7 shards <= 500 MB   float32    2,987 MiB   3,814 MiB (1.28x files)     3,271 MiB (1.09x)
    7 shards <= 500 MB   bfloat16   1,494 MiB   6,462 MiB (2.16x files)     1,777 MiB (0.59x)
    1 file               float32    2,987 MiB   3,814 MiB (1.28x files)     3,271 MiB (1.09x)
    1 file               bfloat16   1,494 MiB   6,462 MiB (2.16x files)     1,777 MiB (0.59x)

The ~280 MiB over the model are the tokenizer and the largest tensor in flight (the 126 MiB
embedding). pytorch_model.bin checkpoints are read through one torch.load(mmap=True) per file, so
their pages stay mapped until the file is done (shard them to bound that).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .backend import Backend, TorchBackend
from .errors import InputError, ModelLoadError
from .model import T5Config, fill_model, random_model, read_checkpoint_config
from .sources import CHECKPOINT, ONNX, RANDOM, TOKENIZER_FILES, ModelSource, ModelSourceError, hub_cache_dir, \
    hub_offline, resolve_model

__all__ = ["Loaded", "load_pretrained", "load_from_model", "load_tokenizer", "resolve_device", "resolve_dtype",
           "BACKENDS", "RANDOM_WEIGHTS_SEED"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
# random:<shape> weights are drawn from this seed, so two runs (and two machines) measure the same model.
RANDOM_WEIGHTS_SEED = 0
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, torch.float32: torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, torch.bfloat16: torch.bfloat16}
_SAFETENSORS, _TORCH_PICKLE = "safetensors", "pytorch_model.bin"


@dataclass
class Loaded:
    """What a Reranker is built from; `options` are the caller's remaining Reranker options."""

    backend: Backend
    tokenizer: Any
    source: ModelSource | None
    options: dict[str, Any] = field(default_factory=dict)


# ---- devices and precisions ----------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError("device", f"unknown device {device!r}", "use 'cpu' or 'cuda'") from e
    if dev.type not in ("cpu", "cuda"):
        raise InputError("device", f"unsupported device {device!r}", "use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device", f"{device!r} requested but CUDA is not available", "use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            # Caught here, typed: torch would only fail later, inside the first allocation on it.
            raise InputError("device", f"{device!r} requested but this machine has {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})",
                             f"use one of cuda:0 to cuda:{count - 1}, or 'cuda' for the current one")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype of the weights; "auto" is engine/capabilities.py's policy for this device."""
    if dtype in ("float16", "fp16", "half", torch.float16):
        raise InputError("dtype", "float16 is refused: T5 activations overflow in fp16",
                         "use dtype='bfloat16', 'float32' or 'auto'")
    if dtype == "auto":
        from .capabilities import auto_dtype_name

        return _DTYPES[auto_dtype_name(device.type, torch.get_num_threads())]
    if dtype not in _DTYPES:
        raise InputError("dtype", f"unknown dtype {dtype!r}", "use 'float32', 'bfloat16', 'int8' or 'auto'")
    return _DTYPES[dtype]


INT8 = "int8"


def weights_precision(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """(dtype the weights are built in, whether the linear layers are then quantised to int8).
    "int8" is dynamic int8 quantisation of every encoder/decoder linear layer (engine/quantize.py):
    CPU only, from fp32 weights; the LM head, embedding and norms stay fp32. Opt-in, not part of
    "auto": on random weights its top-1 agreement with fp32 was 0.97 (31 of 32 requests) against
    1.00 for bf16, and real Flan-T5 activations carry outliers a per-tensor scale handles worse."""
    if dtype == INT8:
        if device.type != "cpu":
            raise InputError("dtype", f"int8 runs on the CPU (torch's x86 quantised GEMMs), not on {device}",
                             "use dtype='bfloat16' or 'auto' on a GPU")
        return torch.float32, True
    return resolve_dtype(dtype, device), False


def _quantized(t5, quantize: bool):
    if quantize:
        from .quantize import quantize_dynamic_int8

        quantize_dynamic_int8(t5)
    return t5


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError("backend", f"unknown backend {backend!r}", "use backend='auto', 'torch' or 'onnx'")


# ---- tokenizers ------------------------------------------------------------------------------------


def load_tokenizer(spec: str | os.PathLike, *, revision: str | None = None) -> Any:
    """The tokenizer in a folder (a checkpoint, an export, or a saved tokenizer) or of a Hub id
    (only its tokenizer files are fetched, through the Hugging Face cache; HF_HOME and
    HF_HUB_OFFLINE are read at call time). ModelLoadError / ModelSourceError say what is wrong."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if not path.exists():
        if text.count("/") != 1 or text.startswith((".", "/", "~")):
            raise ModelSourceError(f"tokenizer {text!r} is neither an existing folder nor a Hub id (org/name)",
                                   "pass the folder that holds tokenizer.json, or a Hub id such as google/flan-t5-base")
        path = _hub_tokenizer_folder(text, revision)
    elif not path.is_dir():
        raise ModelSourceError(f"tokenizer {text!r} is a file, not a folder",
                               "pass the folder that holds tokenizer.json")
    if not (path / "tokenizer.json").exists() and not (path / "spiece.model").exists():
        raise ModelLoadError(f"{path / 'tokenizer.json'}: missing (no tokenizer.json or spiece.model "
                             "beside the weights; save the tokenizer with save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, and the tokenizers library's own type for bad JSON
        raise ModelLoadError(f"{path / 'tokenizer.json'}: cannot load the tokenizer ({e})") from e


def _hub_tokenizer_folder(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=str(hub_cache_dir()), token=os.environ.get("HF_TOKEN") or None,
            local_files_only=hub_offline(), allow_patterns=list(TOKENIZER_FILES) + ["config.json"])
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError) as e:
        raise ModelSourceError(f"tokenizer {repo_id!r} is not in the Hugging Face cache {hub_cache_dir()} and cannot "
                               "be downloaded (HF_HUB_OFFLINE is set, or the Hub is unreachable)",
                               f"fetch it where the Hub is reachable (`huggingface-cli download {repo_id}`), "
                               "or pass a local tokenizer folder") from e
    except hub_errors.HfHubHTTPError as e:  # not found, gated, or a server error
        raise ModelSourceError(f"tokenizer {repo_id!r}: download failed ({e})", "check the id; set HF_TOKEN "
                               "for a private or gated repository") from e
    return Path(folder)


def _tokenizer_from(given: Any, folder: Path | None) -> Any:
    """`tokenizer=` as given (a folder or Hub id to load, or a tokenizer object), else the model folder's."""
    if given is None:
        return load_tokenizer(folder)  # type: ignore[arg-type]
    if isinstance(given, (str, os.PathLike)):
        return load_tokenizer(given)
    if not callable(given):
        raise InputError("tokenizer", f"must be a folder, a Hub id or a tokenizer, got {type(given).__name__}")
    return given


def _check_vocabulary(tokenizer: Any, cfg: T5Config, what: str) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise InputError("tokenizer", f"has {len(tokenizer)} tokens but {what} embeds only {cfg.vocab_size}",
                         "pass the tokenizer the model was trained with")


# ---- checkpoint weights ----------------------------------------------------------------------------


def _weight_files(path: Path) -> tuple[Path, list[Path], str]:
    """(the file errors name, the files to read in order, their format) of a checkpoint folder."""
    single, pickle = path / "model.safetensors", path / "pytorch_model.bin"
    if single.exists():
        return single, [single], _SAFETENSORS
    for index, fmt in ((path / "model.safetensors.index.json", _SAFETENSORS),
                       (path / "pytorch_model.bin.index.json", _TORCH_PICKLE)):
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ModelLoadError(f"{index}: not a valid shard index ({e})") from e
            for name in shards:
                if not (path / name).exists():
                    raise ModelLoadError(f"{path / name}: shard listed in {index.name} is missing")
            return index, [path / name for name in shards], fmt
    if pickle.exists():
        return pickle, [pickle], _TORCH_PICKLE
    if any(path.glob("*.onnx")):
        from .sources import EXPORT_MANIFEST_NAME

        raise ModelLoadError(f"{path / EXPORT_MANIFEST_NAME}: missing, and no checkpoint weights either: {path} holds "
                             "ONNX graphs without the manifest of a complete `instructrec export` (export again)")
    raise ModelLoadError(f"{single}: missing (no model.safetensors, model.safetensors.index.json, "
                         f"pytorch_model.bin or pytorch_model.bin.index.json in {path})")


def _has_weights(path: Path) -> bool:
    return any((path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json",
                                                   "pytorch_model.bin", "pytorch_model.bin.index.json"))


def _stream_tensors(files: list[Path], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file, one tensor at a time, each file closed before the next opens."""
    for file in files:
        if fmt == _SAFETENSORS:
            from safetensors import safe_open

            def opened():
                try:
                    return safe_open(str(file), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                    raise ModelLoadError(f"{file}: cannot read weights ({e})") from e

            with opened() as handle:
                names = list(handle.keys())
            # The file is opened again for each tensor: pages of a memory map that were read stay
            # resident until it is closed, so one map held over a whole 3 GB file would add the file
            # to peak memory (measured: 1.77x the checkpoint instead of 1.16x, see bench/load_memory.py).
            # Reopening costs a header parse per tensor, well under a millisecond.
            for name in names:
                with opened() as handle:
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as e:
                        raise ModelLoadError(f"{file}: cannot read weights of {name} ({e})") from e
                yield name, tensor
                del tensor
        else:
            try:  # mmap: tensors are paged in as they are copied, not all read first
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle, zipfile and torch errors of a damaged file
                raise ModelLoadError(f"{file}: cannot read weights ({e})") from e
            for name in list(state):
                yield name, state.pop(name)
            del state


def _build_from_tensors(cfg: T5Config, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                        device: torch.device, named: str):
    try:
        return fill_model(cfg, tensors, dtype, device)
    except KeyError as e:
        raise ModelLoadError(f"{named}: weights missing from the checkpoint: {e.args[0]}") from e
    except ValueError as e:  # a tensor's shape differs from what config.json makes
        raise ModelLoadError(f"{named}: weights do not match config.json ({e})") from e


def _checkpoint_config(path: Path) -> T5Config:
    raw = read_checkpoint_config(path)
    try:
        return T5Config.from_hf(raw)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: unsupported configuration ({e})") from e


# ---- entry points -------------------------------------------------------------------------------------


def load_pretrained(model: str | os.PathLike | ModelSource, backend: str = "auto", device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "auto", *, revision: str | None = None, tokenizer: Any = None,
                    options: dict[str, Any] | None = None) -> Loaded:
    """See Reranker.from_pretrained."""
    _check_backend(backend)
    options = dict(options or {})
    dev = resolve_device(device)
    if isinstance(model, ModelSource):
        source = model
        if revision is not None:
            raise InputError("revision", "given with an already resolved ModelSource",
                             "pass the revision to resolve_model, or pass the Hub id here")
        if source.is_random:
            log.warning("model %s: RANDOMLY INITIALISED weights; its scores and rankings mean nothing", source.spec)
    else:
        source = resolve_model(model, revision=revision)
    chosen = _choose_backend(source, backend)
    if chosen == "onnx" and dtype == INT8:
        raise InputError("dtype", "int8 quantises the torch backend's linear layers; an ONNX export runs in "
                         "the dtype it was exported in", "use backend='torch' with the checkpoint, or dtype='auto'")
    if chosen == "onnx":
        from .onnx_backend import OnnxBackend

        # The export is verified first (manifest, hashes, tokenizer files listed), then its tokenizer read.
        onnx = OnnxBackend.load(source.path, dev, dtype, checksums=options.pop("verify_checksums", True),
                                threads=options.pop("threads", None),
                                allow_cpu_nodes=options.pop("allow_cpu_nodes", False))
        tok = _tokenizer_from(tokenizer, source.path)
        _check_vocabulary(tok, onnx.cfg, str(source.path))
        return Loaded(onnx, tok, source, options)
    tdtype, quantize = weights_precision(dtype, dev)
    if source.kind == RANDOM:
        if tokenizer is None:
            raise InputError("tokenizer", f"{source.spec} has random weights and no tokenizer of its own",
                             "pass tokenizer= a tokenizer folder or a Hub id, e.g. tokenizer='google/flan-t5-base'")
        cfg = T5Config.from_hf(source.config())
        tok = _tokenizer_from(tokenizer, None)
        _check_vocabulary(tok, cfg, source.spec)
        log.info("building %s in %s with random weights (seed %d)", source.spec, tdtype, RANDOM_WEIGHTS_SEED)
        t5 = random_model(cfg, tdtype, dev, seed=RANDOM_WEIGHTS_SEED)
    else:
        path = source.path
        cfg = _checkpoint_config(path)
        tok = _tokenizer_from(tokenizer, path)  # before the weights: a missing tokenizer fails fast
        _check_vocabulary(tok, cfg, str(path / "config.json"))
        named, files, fmt = _weight_files(path)
        t5 = _build_from_tensors(cfg, _stream_tensors(files, fmt), tdtype, dev, str(named))
    return Loaded(TorchBackend(_quantized(t5, quantize), dev), tok, source, options)


def _choose_backend(source: ModelSource, backend: str) -> str:
    if source.kind == ONNX:
        if backend == "torch":
            raise InputError("backend", f"{source.path} is an ONNX export (instructrec export), which the torch "
                             "backend cannot load", "use backend='onnx' or 'auto', or pass the Hugging Face "
                             "checkpoint the export was made from")
        return "onnx"
    if backend == "onnx":
        if source.kind == CHECKPOINT and not _has_weights(source.path):
            return "onnx"  # a partial export (config.json, no manifest): OnnxBackend.load names what is missing
        if source.kind == CHECKPOINT:
            from .sources import EXPORT_MANIFEST_NAME

            raise InputError("backend", f"{source.path} is a Hugging Face checkpoint, not an ONNX export "
                             f"(no {EXPORT_MANIFEST_NAME})", "run `instructrec export --model DIR --out ONNX_DIR` "
                             "and load ONNX_DIR, or use backend='torch' or 'auto'")
        raise InputError("backend", f"{source.spec} is a random-weight torch model; the onnx backend loads an "
                         "export folder", "use backend='torch' or 'auto'")
    return "torch"


def load_from_model(hf_model: Any, tokenizer: Any, backend: str = "torch", device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "auto", options: dict[str, Any] | None = None) -> Loaded:
    """See Reranker.from_model."""
    _check_backend(backend)
    if backend == "onnx":
        raise InputError("backend", "from_model builds a torch model; the onnx backend loads an export "
                         "directory", "export with `instructrec export`, then use "
                         "Reranker.from_pretrained(ONNX_DIR, backend='onnx')")
    dev = resolve_device(device)
    cfg = T5Config.from_hf(hf_model.config)
    tdtype, quantize = weights_precision(dtype, dev)
    t5 = _build_from_tensors(cfg, iter(hf_model.state_dict().items()), tdtype, dev, "hf_model.state_dict()")
    return Loaded(TorchBackend(_quantized(t5, quantize), dev), tokenizer, None, dict(options or {}))
