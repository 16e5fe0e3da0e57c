"""onnxruntime backend: the engine's four graphs (see instructrec.export.graphs) run by ORT.

The Reranker plans, packs and counts exactly as with torch; this object only answers its four
calls (encode, encoder_kv, decode, head) on torch tensors. Every graph runs through ORT IO
binding on the tensors' own memory: on CPU that avoids a numpy round trip, on CUDA it keeps the
encoder output, the stacked cross K/V [L, 2, B, H, S, dk] and the decoder states on the GPU
between graphs (ORT then runs on torch's current CUDA stream, so no extra synchronisation).

The export directory is checked before any session is built: manifest, every listed file
present, byte size and sha256 equal to the manifest's (a truncated copy fails here, naming
the file), tokenizer files present, and each graph's input/output names as this backend expects.
Hashing reads every byte once: about 0.3 s for flan-t5-small's 310 MB of graphs.

This module must not import instructrec.export (the engine runs without the exporter).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, ModelLoadError
from .model import T5Config
from .sources import EXPORT_MANIFEST_NAME

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "GRAPH_IO", "OnnxBackend", "read_manifest",
           "verify_export_dir", "sha256_file", "DTYPES"]

log = logging.getLogger(__name__)

MANIFEST_NAME = EXPORT_MANIFEST_NAME  # engine/sources.py recognises an export folder by it
FORMAT = "instructrec-onnx"
FORMAT_VERSION = 1
# Graph name -> (input names, output names), in the order the exporter writes them.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("input_ids", "attention_mask"), ("last_hidden_state",)),
    "encoder_kv": (("encoder_hidden_states",), ("cross_key_values",)),
    "decoder": (("decoder_input_ids", "decoder_segment_ids", "encoder_attention_mask", "cross_key_values"),
                ("hidden_states",)),
    "lm_head": (("hidden_states", "labels"), ("log_probs",)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# ONNX TensorProto element types (IO binding takes these ints; numpy has no bfloat16).
_ONNX_TYPE = {torch.float32: 1, torch.int64: 7, torch.bfloat16: 16}
_HASH_BLOCK = 1 << 22  # 4 MiB reads


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    path = Path(path)
    file = path / MANIFEST_NAME
    if not path.is_dir():
        raise ModelLoadError(f"{path}: ONNX export directory not found")
    if not file.exists():
        raise ModelLoadError(f"{file}: missing (not an `instructrec export` directory, or a partial copy; "
                             "export again with `instructrec export --model DIR --out DIR`)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{file}: not an instructrec ONNX manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{file}: format_version {manifest.get('format_version')!r} is not supported "
                             f"by this engine (reads {FORMAT_VERSION}); export again with this version")
    for key in ("graphs", "dtype", "t5_config", "tokenizer_files"):
        if key not in manifest:
            raise ModelLoadError(f"{file}: field {key!r} missing")
    return manifest


def _check_file(path: Path, entry: dict, what: str) -> None:
    file = path / entry["file"]
    if not file.exists():
        raise ModelLoadError(f"{file}: missing ({what} listed in {MANIFEST_NAME})")
    size = file.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise ModelLoadError(f"{file}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced; "
                             "copy the export again)")
    if "sha256" in entry and sha256_file(file) != entry["sha256"]:
        raise ModelLoadError(f"{file}: sha256 differs from {MANIFEST_NAME} (corrupted or replaced; "
                             "copy the export again)")


def verify_export_dir(path: str | Path, manifest: dict | None = None, checksums: bool = True) -> dict:
    """Raise ModelLoadError naming the first missing or bad file of an export directory."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    graphs = manifest["graphs"]
    for name in GRAPH_IO:
        if name not in graphs:
            raise ModelLoadError(f"{path / MANIFEST_NAME}: graph {name!r} not listed "
                                 f"(this engine needs {sorted(GRAPH_IO)})")
        entry = graphs[name]
        files = [entry] + list(entry.get("external_data", []))
        for f in files:
            _check_file(path, f if checksums else {"file": f["file"]}, f"graph {name!r}")
    for name in manifest["tokenizer_files"]:
        if not (path / name).exists():
            raise ModelLoadError(f"{path / name}: missing (tokenizer file listed in {MANIFEST_NAME})")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path / 'config.json'}: missing (the checkpoint's config, written by the export)")
    return manifest


class OnnxBackend:
    """Four ORT sessions behind the engine's encode / encoder_kv / decode / head calls."""

    def __init__(self, sessions: dict[str, Any], cfg: T5Config, dtype: torch.dtype, device: torch.device,
                 path: Path):
        self.sessions, self.cfg, self.dtype, self.device, self.path = sessions, cfg, dtype, device, path
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = (device.index or 0) if device.type == "cuda" else 0

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: torch.device, dtype: str | torch.dtype = "auto",
             checksums: bool = True, threads: int | None = None) -> "OnnxBackend":
        path = Path(path)
        manifest = verify_export_dir(path, checksums=checksums)
        exported = manifest["dtype"]
        if exported not in DTYPES:
            raise ModelLoadError(f"{path / MANIFEST_NAME}: dtype {exported!r} unknown (expected {sorted(DTYPES)})")
        want = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, dtype)
        if want not in ("auto", exported):
            raise InputError("dtype", f"the ONNX export {path} holds {exported} graphs, {want!r} was asked",
                             f"pass dtype={exported!r} (or 'auto'), or export again with --dtype {want}")
        try:
            cfg = T5Config(**manifest["t5_config"])
        except TypeError as e:
            raise ModelLoadError(f"{path / MANIFEST_NAME}: t5_config is not a T5Config ({e})") from e
        return cls.from_files(path, manifest["graphs"], exported, device, cfg, threads=threads)

    @classmethod
    def from_files(cls, path: Path, graphs: dict[str, dict], dtype: str, device: torch.device, cfg: T5Config,
                   threads: int | None = None) -> "OnnxBackend":
        """Sessions over graph files already checked (the exporter validates graphs with this
        before it writes the manifest)."""
        import onnxruntime as ort

        if dtype == "bfloat16" and device.type == "cpu":
            # Measured with onnxruntime 1.31: CPUExecutionProvider has no bfloat16 kernel for
            # Where(16) (session creation fails with NOT_IMPLEMENTED). Casting to fp32 here would
            # silently run a different model than the one exported.
            raise InputError("dtype", f"{path} holds bfloat16 graphs, which onnxruntime's CPU execution "
                             "provider cannot run (no bf16 kernels for Where, MatMul)",
                             "on CPU export with --dtype float32, or run these graphs with device='cuda'")
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("device", "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not "
                                 f"available; installed providers: {ort.get_available_providers()})",
                                 "pip install 'instructrec[gpu]', or use device='cpu'")
            # ORT works on torch's stream, so tensors torch wrote are ready when ORT reads them.
            stream = torch.cuda.current_stream(device).cuda_stream
            providers: list = [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                                          "user_compute_stream": str(stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        sessions = {}
        for name, (inputs, outputs) in GRAPH_IO.items():
            file = path / graphs[name]["file"]
            try:
                sess = ort.InferenceSession(str(file), sess_options=options, providers=providers)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NotImplemented types
                raise ModelLoadError(f"{file}: onnxruntime cannot load graph {name!r} ({e})") from e
            got_in = tuple(i.name for i in sess.get_inputs())
            got_out = tuple(o.name for o in sess.get_outputs())
            if got_in != inputs or got_out != outputs:
                raise ModelLoadError(f"{file}: graph {name!r} has inputs {got_in} and outputs {got_out}, "
                                     f"expected {inputs} and {outputs} (export again with this version)")
            sessions[name] = sess
        return cls(sessions, cfg, DTYPES[dtype], device, path)

    # ------------------------------------------------------------------------------ execution
    def _run(self, name: str, inputs: dict[str, torch.Tensor], out_shape: tuple[int, ...],
             out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        sess = self.sessions[name]
        binding = sess.io_binding()
        keep = []  # contiguous copies must outlive the run
        for key, t in inputs.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(key, self._ort_device, self._device_id, _ONNX_TYPE[t.dtype], tuple(t.shape),
                               t.data_ptr())
        if out is None:
            out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        binding.bind_output(GRAPH_IO[name][1][0], self._ort_device, self._device_id, _ONNX_TYPE[out_dtype],
                            tuple(out_shape), out.data_ptr())
        sess.run_with_iobinding(binding)
        return out

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape  # ids [B, S] int64, mask [B, S] bool -> [B, S, D]
        return self._run("encoder", {"input_ids": ids, "attention_mask": mask.long()},
                         (B, S, self.cfg.d_model), self.dtype)

    def encoder_kv(self, enc: torch.Tensor) -> torch.Tensor:
        B, S, _ = enc.shape  # -> [L, 2, B, H, S, dk], once per instruction
        c = self.cfg
        return self._run("encoder_kv", {"encoder_hidden_states": enc},
                         (c.num_decoder_layers, 2, B, c.num_heads, S, c.d_kv), self.dtype)

    def decode(self, ids: torch.Tensor, segments: torch.Tensor, kv: torch.Tensor,
               src_mask: torch.Tensor) -> torch.Tensor:
        B, R, T = ids.shape  # -> [B, R, T, D]
        return self._run("decoder", {"decoder_input_ids": ids, "decoder_segment_ids": segments,
                                     "encoder_attention_mask": src_mask.long(), "cross_key_values": kv},
                         (B, R, T, self.cfg.d_model), self.dtype)

    def head(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        """[N, D], [N] -> [N] fp32 log-probs, chunk_tokens rows per run: the [rows x V] logits
        exist only inside one run (ORT frees or reuses them between runs)."""
        N = hidden.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=self.device)
        for start in range(0, N, chunk_tokens):
            stop = min(start + chunk_tokens, N)
            self._run("lm_head", {"hidden_states": hidden[start:stop], "labels": targets[start:stop]},
                      (stop - start,), torch.float32, out=out[start:stop])  # written in place
        return out
