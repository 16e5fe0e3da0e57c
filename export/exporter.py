"""`export_model`: a fixed pipeline (load -> export with Optimum -> validate -> describe), every
validation failure collected and raised once.

The export directory (self-describing; the engine reads it with backend="onnx"):
  encoder.onnx encoder_kv.onnx decoder.onnx lm_head.onnx   the graphs (see graphs.py)
  config.json, generation_config.json                      the checkpoint's own Hugging Face config
  tokenizer.json, spiece.model, tokenizer_config.json, ... the tokenizer
  validation.json                                          onnxruntime vs torch, per graph and shape
  instructrec_onnx.json                                    manifest: format version, graphs with file
                                                           names, byte sizes and sha256, dtype, opset,
                                                           our T5Config, tokenizer files, versions
The manifest is written last, and only when validation passed: a crashed or failed export has
none, so loading it says so instead of running half-written or wrong graphs.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructrec.engine.errors import ModelLoadError
from instructrec.engine.model import T5, T5Config, build_model, read_checkpoint_config
from instructrec.engine.onnx_backend import (
    DTYPES, FORMAT, FORMAT_VERSION, GRAPH_IO, MANIFEST_NAME, OnnxBackend, sha256_file)
from instructrec.engine.packing import IGNORE, Unit, decoder_arrays, pack_unit

from .errors import ExportError, ExportValidationError, Mismatch
from .graphs import GRAPH_NAMES, graph_modules, graph_onnx_configs

__all__ = ["export_model", "validate_export", "VALIDATION_NAME", "DEFAULT_ATOL"]

log = logging.getLogger(__name__)

VALIDATION_NAME = "validation.json"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
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


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _check_model_dir(model_dir: Path) -> dict:
    raw = read_checkpoint_config(model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "spiece.model")):
        raise ModelLoadError(f"{model_dir / 'tokenizer.json'}: missing (the export copies the tokenizer; "
                             "save it beside the weights with tokenizer.save_pretrained)")
    return raw


def _load(model_dir: Path, dtype: torch.dtype) -> tuple[Any, T5]:
    """The Hugging Face model (Optimum's export driver: config, generation config, tokenizer
    path) and our T5 built from its weights (the modules the graphs wrap)."""
    from transformers import T5ForConditionalGeneration

    try:
        hf = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{model_dir}: transformers cannot load the checkpoint ({e})") from e
    cfg = T5Config.from_hf(hf.config)
    t5 = build_model(cfg, hf.state_dict(), dtype, torch.device("cpu"))
    return hf, t5


def export_model(model_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", opset: int | None = None,
                 atol: float | None = None, validation_device: str = "cpu") -> dict:
    """Export a T5 checkpoint directory to an engine ONNX directory and validate it.

    dtype: "float32" or "bfloat16" (bf16 graphs do not run on onnxruntime's CPU provider:
    validate them with validation_device="cuda" on a GPU machine). atol: validation tolerance
    (default DEFAULT_ATOL[dtype]). Returns the report (also in instructrec_onnx.json); raises
    ExportValidationError listing every mismatch, ExportError / ModelLoadError otherwise."""
    from optimum.exporters.onnx import onnx_export_from_model

    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported: use 'float32' or 'bfloat16' "
                          "(float16 is refused: T5 activations overflow in it)")
    if validation_device not in ("cpu", "cuda"):
        raise ExportError(f"validation_device {validation_device!r}: use 'cpu' or 'cuda'")
    if dtype == "bfloat16" and validation_device == "cpu":
        # Measured with onnxruntime 1.31: the CPU execution provider has no bfloat16 kernel for
        # Where(16) (the first node that fails; session creation raises NOT_IMPLEMENTED, already
        # inside Optimum's dynamic-axes pass), so bf16 graphs can be neither validated nor run on
        # CPU. Converting them to fp32 silently would be a different export.
        raise ExportError("dtype 'bfloat16': onnxruntime's CPU execution provider has no bfloat16 "
                          "kernels (Where, MatMul), so bf16 graphs cannot be validated or run on CPU. "
                          "On CPU export --dtype float32; on a GPU machine export bfloat16 with "
                          "validation_device='cuda' (--device cuda)")
    raw_config = _check_model_dir(model_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: output directory is not empty (choose a new or empty directory; "
                          "an export never overwrites files)")
    tdtype = DTYPES[dtype]
    hf, t5 = _load(model_dir, tdtype)

    # Optimum treats a model whose type it knows ("t5") with its stock graph list and ignores
    # fn_get_submodels; export_model_type is the attribute it reads first, and a type it does
    # not know makes it a custom architecture exported exactly as our configs describe.
    hf.config.export_model_type = "instructrec-t5"
    float_dtype = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    with warnings.catch_warnings():
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
    t5.to("cpu")  # Optimum moves each submodel to the export device; validation's reference runs on CPU
    # Optimum wrote config.json from the in-memory config (with export_model_type added): put the
    # checkpoint's own file back, byte for byte.
    shutil.copyfile(model_dir / "config.json", out_dir / "config.json")
    tokenizer_files = _ensure_tokenizer(model_dir, out_dir)
    export_s = time.perf_counter() - t0

    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    validation = _validate(out_dir, t5, hf, dtype, atol, validation_device)
    del hf
    graphs = {}
    for name in GRAPH_NAMES:
        file = out_dir / f"{name}.onnx"
        entry = {"file": file.name, "bytes": file.stat().st_size, "sha256": sha256_file(file),
                 "inputs": list(GRAPH_IO[name][0]), "outputs": list(GRAPH_IO[name][1])}
        data = out_dir / f"{name}.onnx_data"  # Optimum's external-data file for graphs > 2 GB
        if data.exists():
            entry["external_data"] = [{"file": data.name, "bytes": data.stat().st_size, "sha256": sha256_file(data)}]
        graphs[name] = entry
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
        "opset": _opset(out_dir / "encoder.onnx"), "graphs": graphs,
        "t5_config": t5.cfg.to_dict(), "hf_config": "config.json", "model_type": raw_config.get("model_type"),
        "tokenizer_files": tokenizer_files, "validation": VALIDATION_NAME,
        "source": str(model_dir.resolve()), "exported_by": "instructrec export (optimum custom ONNX configs)",
        "versions": _versions(), "export_seconds": round(export_s, 2),
        "validation_seconds": validation["seconds"],
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log.info("exported %s -> %s (%s, %d graphs, %.1f s export + %.1f s validation)", model_dir, out_dir,
             dtype, len(graphs), export_s, validation["seconds"])
    return manifest


def _opset(file: Path) -> int:
    import onnx

    m = onnx.load(str(file), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _ensure_tokenizer(model_dir: Path, out_dir: Path) -> list[str]:
    """Optimum saves the tokenizer found at the model's _name_or_path; copy any file it missed."""
    present = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists() and not (out_dir / name).exists():
            shutil.copyfile(model_dir / name, out_dir / name)
        if (out_dir / name).exists():
            present.append(name)
    return present


# ------------------------------------------------------------------------------------ validation
def validate_export(onnx_dir: str | Path, model_dir: str | Path, *, atol: float | None = None,
                    device: str = "cpu") -> dict:
    """Validate the graphs of an existing export against a checkpoint's torch forward (ours and
    Hugging Face's); rewrites validation.json; raises ExportValidationError listing every
    mismatch. Use it to re-check an export after copying it, or against another checkpoint."""
    onnx_dir = Path(onnx_dir)
    dtype = json.loads((onnx_dir / MANIFEST_NAME).read_text())["dtype"] if (onnx_dir / MANIFEST_NAME).exists() \
        else "float32"
    _check_model_dir(Path(model_dir))
    hf, t5 = _load(Path(model_dir), DTYPES[dtype])
    return _validate(onnx_dir, t5, hf, dtype, DEFAULT_ATOL[dtype] if atol is None else float(atol), device)


def _validate(out_dir: Path, t5: T5, hf: Any, dtype: str, atol: float, device: str) -> dict:
    """onnxruntime vs torch for every graph on VALIDATION_CASES (fresh seeded random inputs), plus
    the whole chain vs transformers' own forward. Writes validation.json, then raises once."""
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
    seconds = round(time.perf_counter() - t0, 2)
    report = {"passed": not mismatches, "dtype": dtype, "atol": atol, "device": device,
              "tolerance_rule": "max |onnx - torch| <= atol * max(1, max |torch|)",
              "cases": list(VALIDATION_CASES), "results": entries, "versions": _versions(), "seconds": seconds}
    path = out_dir / VALIDATION_NAME
    path.write_text(json.dumps(report, indent=2))
    if mismatches:
        raise ExportValidationError(mismatches, str(path))
    return report


def _backend_for(out_dir: Path, dtype: str, device: str, cfg: T5Config) -> OnnxBackend:
    """Sessions over the freshly written graphs (no manifest yet): the engine's own loader."""
    graphs = {n: {"file": f"{n}.onnx"} for n in GRAPH_NAMES}
    return OnnxBackend.from_files(out_dir, graphs, dtype, torch.device(device), cfg)


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
