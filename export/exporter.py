"""`export_model`: a fixed pipeline (resolve the model -> load -> export with Optimum -> validate ->
describe), every validation failure collected and raised once.

The model is whatever `--model` names elsewhere (instructrec.engine.sources.resolve_model): a
save_pretrained folder, a Hub id (with a revision) or `random:<shape>` (random weights, said so in
a WARNING, the manifest and the validation report; needs a tokenizer). An export folder is refused:
export from the checkpoint it was made from.

The export directory (self-describing; the engine reads it with backend="onnx"):
  instructrec-source.onnx instructrec-cross-kv.onnx        the engine's graphs (see graphs.py), with
  instructrec-candidates.onnx instructrec-logprobs.onnx    <file>.onnx_data beside a graph > 2 GB
  config.json, generation_config.json                      the checkpoint's own Hugging Face config
  tokenizer.json, spiece.model, tokenizer_config.json, ... the tokenizer
  validation.json                                          onnxruntime vs torch, per graph and shape
  instructrec_onnx.json                                    manifest (format version 2): graphs with file
                                                           names, byte sizes and sha256 (external-data
                                                           files included), dtype, opset, our T5Config,
                                                           the config.json dict, tokenizer files, the
                                                           source's identity (Hub commit), versions
  encoder_model.onnx decoder_model.onnx ...                with --with-generation-graphs only: Optimum's
                                                           stock seq2seq graphs, so that
                                                           ORTModelForSeq2SeqLM.from_pretrained(DIR)
                                                           loads the folder and generate() works
The manifest is written last, and only when validation passed: a crashed or failed export has
none, so loading it says so instead of running half-written or wrong graphs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from instructrec.engine.errors import InputError, ModelLoadError
from instructrec.engine.model import T5, T5Config, build_model
from instructrec.engine.onnx_backend import (
    DTYPES, FORMAT, FORMAT_VERSION, GRAPH_FILES, GRAPH_IO, MANIFEST_NAME, OnnxBackend, sha256_file)
from instructrec.engine.packing import IGNORE, Unit, decoder_arrays, pack_unit
from instructrec.engine.sources import CHECKPOINT, ONNX, RANDOM, ModelSource, ModelSourceError, resolve_model

from .errors import ExportError, ExportValidationError, Mismatch
from .graphs import GRAPH_NAMES, graph_modules, graph_onnx_configs

__all__ = ["export_model", "validate_export", "VALIDATION_NAME", "DEFAULT_ATOL", "GENERATION_TASK"]

log = logging.getLogger(__name__)

VALIDATION_NAME = "validation.json"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Optimum's task for the stock graphs of --with-generation-graphs: encoder_model.onnx,
# decoder_model.onnx and decoder_with_past_model.onnx (the past key/values make generate() one
# decoder step per token instead of re-running the whole prefix).
GENERATION_TASK = "text2text-generation-with-past"
_GENERATION_STAGING = ".generation-graphs.partial"
# Models whose weights exceed the 2 GB protobuf limit of one ONNX file (flan-t5-large fp32: 3.1 GB,
# and up) keep every graph's weights in external data, so that all graphs of a big model share one
# layout whether or not a single graph crosses the limit (flan-t5-large's largest graph, the
# decoder, is ~1.6 GB; flan-t5-xl's is ~5.4 GB and must).
EXTERNAL_DATA_ABOVE_BYTES = 2 * 1024 ** 3
# Tolerance per dtype, on max |onnx - torch| scaled by max(1, max |torch|). fp32: measured diffs
# on flan-t5-small shape are ~1e-6 (hidden states) to ~1e-5 (sums of 20 token log-probs), so 1e-4
# leaves 10x margin and still catches any real difference (a changed weight moves them by >1e-2).
# bf16 keeps 8 mantissa bits (relative step 4e-3): 3e-2 allows a few roundings per layer.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 3e-2}
# Validation shapes (B instructions, S source tokens, R rows, T row tokens, N head rows): odd and
# unequal sizes, one minimal case, one where several candidates share a row.
VALIDATION_CASES = (
    dict(B=1, S=5, R=1, T=4, N=1),
    dict(B=3, S=17, R=2, T=11, N=37),
    dict(B=2, S=41, R=3, T=29, N=257),
)
# Greedy generation compared token for token (--with-generation-graphs): 12 new tokens from two
# instructions of unequal length (one padded row).
GENERATION_CHECK = dict(B=2, S=(9, 14), new_tokens=12)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --------------------------------------------------------------------------------- model source
def _resolve_source(model: str | os.PathLike, revision: str | None) -> ModelSource:
    """resolve_model for an export: a checkpoint or random:<shape>; an export folder is refused
    naming the checkpoint its manifest says it was made from."""
    source = resolve_model(model, revision=revision)
    if source.kind == ONNX:
        made_from = _recorded_source(source.path / MANIFEST_NAME)  # type: ignore[operator]
        raise ModelSourceError(
            f"{source.path} is already an ONNX export (it holds {MANIFEST_NAME}); export reads a Hugging Face "
            "checkpoint", f"pass the checkpoint it was made from{made_from}: "
            "`instructrec export --model CHECKPOINT --out NEW_DIR`")
    return source


def _recorded_source(manifest_file: Path) -> str:
    try:
        recorded = json.loads(manifest_file.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(recorded, dict):
        where = recorded.get("repo_id") or recorded.get("path") or recorded.get("spec")
        commit = recorded.get("commit") if recorded.get("repo_id") else None
        return f" ({where}{' --revision ' + commit if commit else ''})" if where else ""
    return f" ({recorded})" if recorded else ""


def _tokenizer_dir(source: ModelSource, tokenizer: str | os.PathLike | None) -> Path:
    """The folder the export copies tokenizer files from: --tokenizer (a folder, or a model a
    resolve_model spec names) or the checkpoint's own folder."""
    if tokenizer is None:
        if source.kind == RANDOM:
            raise InputError("tokenizer", f"{source.spec} has random weights and no tokenizer of its own",
                             "pass --tokenizer with a tokenizer folder or Hub id (e.g. google/flan-t5-small)")
        folder = source.path
    else:
        given = Path(tokenizer).expanduser()
        folder = given.resolve() if given.is_dir() else resolve_model(tokenizer, allowed=(CHECKPOINT, ONNX)).path
    if not any((folder / f).exists() for f in ("tokenizer.json", "spiece.model")):  # type: ignore[operator]
        fix = ("save it beside the weights with tokenizer.save_pretrained, or pass --tokenizer"
               if tokenizer is None else "pass a folder with tokenizer.json or spiece.model")
        raise InputError("tokenizer", f"{folder}: no tokenizer.json nor spiece.model (the export copies the "
                         "tokenizer the engine reads)", fix)
    return folder  # type: ignore[return-value]


def _check_options(dtype: str, validation_device: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported: use 'float32' or 'bfloat16' "
                          "(float16 is refused: T5 activations overflow in it)")
    if validation_device not in ("cpu", "cuda"):
        raise ExportError(f"validation_device {validation_device!r}: use 'cpu' or 'cuda'")
    if dtype == "bfloat16" and validation_device == "cpu":
        # Measured with onnxruntime 1.32: the CPU execution provider has no bfloat16 kernels for
        # MatMul(13) and Add(14) (session creation raises NOT_IMPLEMENTED, already inside Optimum's
        # dynamic-axes pass; Where(16), which had none either, is rewritten, see
        # graphs.where_in_float32), so bf16 graphs can be neither validated nor run on CPU.
        # Converting them to fp32 silently would be a different export.
        raise ExportError("dtype 'bfloat16': onnxruntime's CPU execution provider has no bfloat16 "
                          "kernels (MatMul, Add), so bf16 graphs cannot be validated or run on CPU. "
                          "On CPU export --dtype float32; on a GPU machine export bfloat16 with "
                          "validation_device='cuda' (--device cuda)")


def _load(source: ModelSource, dtype: torch.dtype, seed: int) -> tuple[Any, T5]:
    """The Hugging Face model (Optimum's export driver: config, generation config; the stock
    generation graphs) and our T5 built from its weights (the modules the graphs wrap)."""
    from transformers import T5Config as HFT5Config
    from transformers import T5ForConditionalGeneration

    if source.kind == RANDOM:
        torch.manual_seed(seed)  # the same seed gives the same weights: validate_export can rebuild them
        hf = T5ForConditionalGeneration(HFT5Config(**source.config())).to(dtype).eval()
    else:
        try:
            hf = T5ForConditionalGeneration.from_pretrained(source.path, dtype=dtype).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{source.describe()}: transformers cannot load the checkpoint ({e})") from e
    cfg = T5Config.from_hf(hf.config)
    t5 = build_model(cfg, hf.state_dict(), dtype, torch.device("cpu"))
    return hf, t5


def _checkpoint_config(source: ModelSource) -> dict:
    raw = source.config()
    if raw.get("model_type", "t5") != "t5":
        raise ModelLoadError(f"{source.describe()}: config.json has model_type {raw.get('model_type')!r}, "
                             "expected 't5'")
    return raw


@contextlib.contextmanager
def _external_data(always: bool) -> Iterator[None]:
    """Optimum moves a graph's weights to `<file>.onnx_data` when torch had to (over 2 GB, the
    protobuf limit); FORCE_ONNX_EXTERNAL_DATA, which it reads per export, makes it do so for every
    graph. Restored afterwards."""
    if not always:
        yield
        return
    before = os.environ.get("FORCE_ONNX_EXTERNAL_DATA")
    os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FORCE_ONNX_EXTERNAL_DATA", None)
        else:
            os.environ["FORCE_ONNX_EXTERNAL_DATA"] = before


# --------------------------------------------------------------------------------------- export
def export_model(model: str | os.PathLike, out_dir: str | Path, *, revision: str | None = None,
                 tokenizer: str | os.PathLike | None = None, dtype: str = "float32", opset: int | None = None,
                 atol: float | None = None, validation_device: str = "cpu", with_generation_graphs: bool = False,
                 external_data: bool | None = None, seed: int = 0) -> dict:
    """Export a T5 model to an engine ONNX directory and validate it.

    model: a save_pretrained folder, a Hub id (revision: branch, tag or commit) or random:<shape>
    (seed picks the weights; needs tokenizer). tokenizer: a folder or Hub id to take the tokenizer
    from (default: the checkpoint's own). dtype: "float32" or "bfloat16" (bf16 graphs do not run
    on onnxruntime's CPU provider: validate them with validation_device="cuda" on a GPU machine).
    atol: validation tolerance (default DEFAULT_ATOL[dtype]). with_generation_graphs: also write
    Optimum's stock seq2seq graphs (ORTModelForSeq2SeqLM, generate()), validated by greedy
    generation against transformers. external_data: keep every graph's weights in
    `<file>.onnx_data` (None: when the model's weights exceed EXTERNAL_DATA_ABOVE_BYTES; a graph
    over 2 GB always does). Returns the manifest (also in
    instructrec_onnx.json); raises ExportValidationError listing every mismatch, ExportError /
    ModelLoadError / InputError otherwise."""
    from optimum.exporters.onnx import onnx_export_from_model

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _check_options(dtype, validation_device)
    source = _resolve_source(model, revision)
    raw_config = _checkpoint_config(source)
    tokenizer_dir = _tokenizer_dir(source, tokenizer)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: output directory is not empty (choose a new or empty directory; "
                          "an export never overwrites files)")
    tdtype = DTYPES[dtype]
    hf, t5 = _load(source, tdtype, seed)
    if external_data is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        external_data = weight_bytes > EXTERNAL_DATA_ABOVE_BYTES

    # Optimum treats a model whose type it knows ("t5") with its stock graph list and ignores
    # fn_get_submodels; export_model_type is the attribute it reads first, and a type it does
    # not know makes it a custom architecture exported exactly as our configs describe.
    hf.config.export_model_type = "instructrec-t5"
    float_dtype = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    with warnings.catch_warnings(), _external_data(external_data):
        # The tracer warns on `q, k, v = ...permute(...)`: that unpacks a fixed axis of size 3
        # (or 2 for K/V), which does not depend on any dynamic input size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        onnx_export_from_model(
            hf, out_dir, opset=opset, task="text2text-generation", device=validation_device,
            custom_onnx_configs=graph_onnx_configs(hf.config, float_dtype),
            fn_get_submodels=lambda _model: graph_modules(t5, hf.config),
            # Optimum's validation only logs a warning when outputs differ; ours raises (below).
            do_validation=False,
        )
    del hf.config.export_model_type
    t5.to("cpu")  # Optimum moves each submodel to the export device; validation's reference runs on CPU
    # Optimum wrote config.json from the in-memory config (with export_model_type added): put the
    # checkpoint's own file back, byte for byte (a random model: its shape's config).
    if source.kind == RANDOM:
        (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    else:
        shutil.copyfile(source.path / "config.json", out_dir / "config.json")  # type: ignore[operator]
    tokenizer_files = _copy_tokenizer(tokenizer_dir, out_dir)
    generation_graphs = (_export_generation_graphs(hf, out_dir, opset, validation_device, external_data)
                         if with_generation_graphs else [])
    export_s = time.perf_counter() - t0

    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    validation = _validate(out_dir, t5, hf, dtype, atol, validation_device, source,
                           generation=bool(generation_graphs))
    del hf
    graphs = {name: _graph_entry(out_dir, name) for name in GRAPH_NAMES}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
        "opset": _opset(out_dir / GRAPH_FILES["encoder"]), "graphs": graphs,
        "t5_config": t5.cfg.to_dict(), "hf_config": raw_config, "hf_config_file": "config.json",
        "model_type": raw_config.get("model_type", "t5"), "tokenizer_files": tokenizer_files,
        "validation": VALIDATION_NAME, "source": source.identity(), "random_weights": source.kind == RANDOM,
        # Optimum's stock graphs, for ORTModelForSeq2SeqLM; the engine neither reads nor checks them.
        "generation_graphs": generation_graphs,
        "exported_by": "instructrec export (optimum custom ONNX configs)",
        "versions": _versions(), "export_seconds": round(export_s, 2),
        "validation_seconds": validation["seconds"],
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log.info("exported %s -> %s (%s, %d graphs%s, %.1f s export + %.1f s validation)", source.describe(), out_dir,
             dtype, len(graphs), f" + {len(generation_graphs)} generation graphs" if generation_graphs else "",
             export_s, validation["seconds"])
    return manifest


def _graph_entry(out_dir: Path, name: str) -> dict:
    file = out_dir / GRAPH_FILES[name]
    entry = {"file": file.name, "bytes": file.stat().st_size, "sha256": sha256_file(file),
             "inputs": list(GRAPH_IO[name][0]), "outputs": list(GRAPH_IO[name][1])}
    data_files = _external_data_files(file)
    if data_files:
        entry["external_data"] = [{"file": f, "bytes": (out_dir / f).stat().st_size,
                                   "sha256": sha256_file(out_dir / f)} for f in data_files]
    return entry


def _external_data_files(file: Path) -> list[str]:
    """The files a graph keeps tensors in (ONNX external data), as its tensors name them."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(file), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
    return sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})


@contextlib.contextmanager
def _configs_restored(hf: Any) -> Iterator[None]:
    """Optimum's stock export writes flags (use_cache, return_dict) on the configs of the model and
    of its encoder and decoder stacks; the validation that follows runs the model as loaded."""
    configs = {id(c): c for c in (hf.config, hf.get_encoder().config, hf.get_decoder().config)}
    saved = {key: dict(vars(c)) for key, c in configs.items()}
    try:
        yield
    finally:
        for key, c in configs.items():
            vars(c).clear()
            vars(c).update(saved[key])


def _export_generation_graphs(hf: Any, out_dir: Path, opset: int | None, device: str, external_data: bool
                              ) -> list[str]:
    """Optimum's stock seq2seq export of the same weights (GENERATION_TASK), written to a staging
    folder and its graph files moved beside ours: the staging keeps Optimum from rewriting
    config.json or the tokenizer files, and a crash from leaving half a set under final names."""
    from optimum.exporters.onnx import onnx_export_from_model

    staging = out_dir / _GENERATION_STAGING
    with warnings.catch_warnings(), _external_data(external_data), _configs_restored(hf):
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        onnx_export_from_model(hf, staging, opset=opset, task=GENERATION_TASK, device=device, do_validation=False)
    hf.to("cpu")
    moved = []
    for file in sorted(staging.iterdir()):
        if file.name.endswith((".onnx", ".onnx_data")):
            if (out_dir / file.name).exists():  # never: our names avoid Optimum's; kept as a guard
                raise ExportError(f"{out_dir / file.name}: Optimum's generation graph would overwrite a file")
            file.rename(out_dir / file.name)
            moved.append(file.name)
    shutil.rmtree(staging)
    return moved


def _opset(file: Path) -> int:
    import onnx

    m = onnx.load(str(file), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    """The tokenizer files of tokenizer_dir, copied over whatever Optimum saved (it saves the
    tokenizer found at the model's own path, which --tokenizer may replace)."""
    present = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
        if (out_dir / name).exists():
            present.append(name)
    return present


# ------------------------------------------------------------------------------------ validation
def validate_export(onnx_dir: str | Path, model: str | os.PathLike, *, revision: str | None = None,
                    atol: float | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """Validate the graphs of an existing export against a model's torch forward (ours and Hugging
    Face's); model is resolved as export_model's (random:<shape> with the export's seed rebuilds
    the same weights). Rewrites validation.json; raises ExportValidationError listing every
    mismatch. Use it to re-check an export after copying it, or against another checkpoint."""
    onnx_dir = Path(onnx_dir)
    manifest_file = onnx_dir / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    dtype = manifest.get("dtype", "float32")
    source = _resolve_source(model, revision)
    _checkpoint_config(source)
    hf, t5 = _load(source, DTYPES[dtype], seed)
    return _validate(onnx_dir, t5, hf, dtype, DEFAULT_ATOL[dtype] if atol is None else float(atol), device, source,
                     generation=bool(manifest.get("generation_graphs")))


def _validate(out_dir: Path, t5: T5, hf: Any, dtype: str, atol: float, device: str, source: ModelSource,
              generation: bool = False) -> dict:
    """onnxruntime vs torch for every graph on VALIDATION_CASES (fresh seeded random inputs), plus
    the whole chain vs transformers' own forward, plus (generation) greedy generate() through
    Optimum's stock graphs vs transformers'. Writes validation.json, then raises once."""
    t0 = time.perf_counter()
    cfg = t5.cfg
    backend = _backend_for(out_dir, dtype, device, cfg)
    rng = np.random.default_rng(20240611)
    entries: list[dict] = []
    mismatches: list[Mismatch] = []

    def compare(graph: str, case: str, output: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.float().cpu(), ref.float().cpu()
        if got.shape != ref.shape:
            diff = float("inf")
        else:
            diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
        tol = atol * scale
        ok = diff <= tol  # NaN compares False: a NaN output fails
        entries.append({"graph": graph, "case": case, "output": output, "shape": list(got.shape),
                        "max_abs_diff": diff, "max_abs_reference": scale, "tolerance": tol, "passed": ok})
        if not ok:
            mismatches.append(Mismatch(graph, case, output, diff, tol))

    dev = backend.device
    with torch.inference_mode():
        for c in VALIDATION_CASES:
            B, S, R, T, N = c["B"], c["S"], c["R"], c["T"], c["N"]
            ids = torch.from_numpy(rng.integers(3, cfg.vocab_size, (B, S)))
            lengths = rng.integers(1, S + 1, B)
            lengths[0] = S  # one full row: S is the padded length
            mask = torch.arange(S)[None, :] < torch.from_numpy(lengths)[:, None]  # [B, S]
            case = f"B={B} S={S}"
            enc = t5.encode(ids, mask)
            compare("encoder", case, "last_hidden_state", backend.encode(ids.to(dev), mask.to(dev)), enc)
            kv = t5.encoder_kv(enc)
            kv_ref = torch.stack([torch.stack(p) for p in kv])  # [L, 2, B, H, S, dk]
            kv_ort = backend.encoder_kv(enc.to(dev))
            compare("encoder_kv", case, "cross_key_values", kv_ort, kv_ref)
            dec_ids = torch.from_numpy(rng.integers(3, cfg.vocab_size, (B, R, T)))
            seg = torch.from_numpy(_random_segments(rng, B, R, T))
            case = f"B={B} S={S} R={R} T={T}"
            h = t5.decode(dec_ids, seg, kv, mask)
            compare("decoder", case, "hidden_states",
                    backend.decode(dec_ids.to(dev), seg.to(dev), kv_ref.to(dev), mask.to(dev)), h)
            flat = h.reshape(-1, cfg.d_model)
            hidden = flat[torch.from_numpy(rng.integers(0, flat.shape[0], N))]  # [N, D] real states
            labels = torch.from_numpy(rng.integers(0, cfg.vocab_size, N))
            labels[3::7] = IGNORE  # some ignored slots, never the only row of the N=1 case
            ref = _head_reference(hidden, t5.lm_weight, labels)
            # chunk 64: a multi-chunk run for the larger cases, as the engine does it
            compare("lm_head", f"N={N}", "log_probs", backend.head(hidden.to(dev), labels.to(dev), 64), ref)
        _validate_chain(backend, hf, cfg, rng, compare)
    del backend
    if generation:
        _validate_generation(out_dir, hf, cfg, rng, device, entries, mismatches)
    seconds = round(time.perf_counter() - t0, 2)
    report = {"passed": not mismatches, "dtype": dtype, "atol": atol, "device": device,
              "source": source.identity(), "random_weights": source.kind == RANDOM,
              "tolerance_rule": "max |onnx - torch| <= atol * max(1, max |torch|)",
              "cases": list(VALIDATION_CASES), "results": entries, "versions": _versions(), "seconds": seconds}
    path = out_dir / VALIDATION_NAME
    path.write_text(json.dumps(report, indent=2))
    if mismatches:
        raise ExportValidationError(mismatches, str(path))
    return report


def _backend_for(out_dir: Path, dtype: str, device: str, cfg: T5Config) -> OnnxBackend:
    """Sessions over the freshly written graphs (no manifest yet): the engine's own loader. On
    CUDA the placement check runs too; a graph with CPU nodes still gets validated (the WARNING
    lists them), and the engine refuses it at load unless told otherwise."""
    graphs = {n: {"file": GRAPH_FILES[n]} for n in GRAPH_NAMES}
    return OnnxBackend.from_files(out_dir, graphs, dtype, torch.device(device), cfg, allow_cpu_nodes=True)


def _random_segments(rng: np.random.Generator, B: int, R: int, T: int) -> np.ndarray:
    """Candidates of 1..8 tokens packed back to back per row, the rest padding (-1)."""
    seg = np.full((B, R, T), -1, dtype=np.int64)
    for b in range(B):
        for r in range(R):
            pos, k = 0, 0
            limit = T if (b, r) == (0, 0) else int(rng.integers(1, T + 1))  # (0, 0): a full row
            while pos < limit:
                n = min(int(rng.integers(1, 9)), limit - pos)
                seg[b, r, pos:pos + n] = k
                pos, k = pos + n, k + 1
    return seg


def _head_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from instructrec.kernels import lm_head_log_softmax_gather

    return lm_head_log_softmax_gather(hidden, weight, labels, ignore_index=IGNORE, use_triton=False)


def _validate_chain(backend: OnnxBackend, hf: Any, cfg: T5Config, rng: np.random.Generator, compare) -> None:
    """The four graphs chained as the engine chains them (several candidates packed per row)
    against transformers' T5ForConditionalGeneration scoring each candidate alone: sum of
    log_softmax(logits)[label] per candidate. An independent reference for the whole export."""
    dev = backend.device
    units = []
    for n_cands, src_len in ((1, 9), (6, 23)):
        source = np.append(rng.integers(3, cfg.vocab_size, src_len - 1), cfg.eos_token_id).astype(np.int64)
        targets = [np.append(rng.integers(3, cfg.vocab_size, int(rng.integers(1, 12))), cfg.eos_token_id)
                   .astype(np.int64) for _ in range(n_cands)]
        units.append(pack_unit(Unit(source=source, targets=targets), row_tokens=48))
    S = max(len(u.source) for u in units)
    src = torch.full((len(units), S), cfg.pad_token_id, dtype=torch.long)
    for b, u in enumerate(units):
        src[b, :len(u.source)] = torch.from_numpy(u.source)
    mask = src != cfg.pad_token_id  # sources hold no pad ids (drawn from 3..V)
    base = np.cumsum([0] + [len(u.targets) for u in units])
    a = decoder_arrays(units, list(base[:-1]), cfg.decoder_start_token_id, cfg.pad_token_id)
    kv = backend.encoder_kv(backend.encode(src.to(dev), mask.to(dev)))
    h = backend.decode(torch.from_numpy(a.ids).to(dev), torch.from_numpy(a.segments).to(dev), kv, mask.to(dev))
    real = np.flatnonzero(a.targets.reshape(-1) != IGNORE)
    hidden = h.reshape(-1, cfg.d_model)[torch.from_numpy(real).to(dev)]
    lp = backend.head(hidden, torch.from_numpy(a.targets.reshape(-1)[real]).to(dev), 64).double().cpu()
    got = torch.zeros(int(base[-1]), dtype=torch.float64).index_add_(
        0, torch.from_numpy(a.slots.reshape(-1)[real]), lp)
    # transformers: every candidate alone with its instruction, in one padded batch
    pairs = [(b, y) for b, u in enumerate(units) for y in u.targets]
    L = max(len(y) for _, y in pairs)
    labels = torch.full((len(pairs), L), IGNORE, dtype=torch.long)
    for i, (_, y) in enumerate(pairs):
        labels[i, :len(y)] = torch.from_numpy(y)
    rows = torch.tensor([b for b, _ in pairs])
    logits = hf(input_ids=src[rows], attention_mask=mask[rows].long(), labels=labels).logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]  # [K, L]
    ref = (logp * (labels != IGNORE)).double().sum(1)
    compare("chain_vs_transformers", f"units={len(units)} candidates={int(base[-1])}", "candidate_log_prob",
            got, ref)


def _validate_generation(out_dir: Path, hf: Any, cfg: T5Config, rng: np.random.Generator, device: str,
                         entries: list[dict], mismatches: list[Mismatch]) -> None:
    """Optimum's stock graphs through ORTModelForSeq2SeqLM.generate() against transformers'
    generate(), greedy: the token ids must be equal (tolerance 0)."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    B, (short, long), new = GENERATION_CHECK["B"], GENERATION_CHECK["S"], GENERATION_CHECK["new_tokens"]
    ids = torch.full((B, long), cfg.pad_token_id, dtype=torch.long)
    for b, n in enumerate((long, short)):
        ids[b, :n] = torch.from_numpy(np.append(rng.integers(3, cfg.vocab_size, n - 1), cfg.eos_token_id))
    mask = (ids != cfg.pad_token_id).long()
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    ort_model = ORTModelForSeq2SeqLM.from_pretrained(out_dir, provider=provider)
    dev = torch.device(device)
    with torch.inference_mode():
        got = ort_model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **options).cpu()
        want = hf.to("cpu").generate(input_ids=ids, attention_mask=mask, **options)
    del ort_model
    differing = int((got != want).sum()) if got.shape == want.shape else got.numel() + want.numel()
    case = f"B={B} S={long},{short} new_tokens={new}"
    entries.append({"graph": "generation_graphs", "case": case, "output": "greedy_token_ids",
                    "shape": list(got.shape), "max_abs_diff": float(differing), "max_abs_reference": 0.0,
                    "tolerance": 0.0, "passed": differing == 0})
    if differing:
        mismatches.append(Mismatch("generation_graphs", case, "greedy_token_ids (tokens differing)",
                                   float(differing), 0.0))
