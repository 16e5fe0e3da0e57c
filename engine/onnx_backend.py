"""onnxruntime backend: the engine's four graphs (see instructrec.export.graphs) run by ORT.

The Reranker plans, packs and counts exactly as with torch; this object only answers its calls
(encode, encoder_kv, decode, head, and synchronize) on torch tensors. Every graph runs through ORT
IO binding on the tensors' own memory: on CPU that avoids a numpy round trip, on CUDA it keeps the
encoder output, the stacked cross K/V [L, 2, B, H, S, dk] and the decoder states on the GPU
between graphs.

CUDA (written from the onnxruntime sources and docs; no GPU was at hand to run it, see
tests/export/test_onnx_cuda.py for the checks that run where one is):
- Streams: the four sessions run on ONE CUDA stream owned by this backend (`user_compute_stream`).
  Each run reads the caller's current torch stream anew, makes the backend's stream wait for it
  and the caller's stream wait for the run: GPU-side events, no host synchronisation, and correct
  whichever stream the caller is on. (Handing ORT torch's current stream instead does not work for
  the default stream: its handle is 0, which ORT reads as "no stream given" and runs on its own.)
- No synchronisation per run: the run option `disable_synchronize_execution_providers` drops the
  cudaStreamSynchronize ORT otherwise issues at the end of every run; the caller synchronises once
  per read window (`synchronize()`, or implicitly by copying results to the host).
- One arena policy for the four sessions: the same provider options everywhere, arena growth
  `kSameAsRequested` (the default, next power of two, can reserve up to twice what a shape needs in
  each of the four arenas). Inputs and outputs live in torch's allocator (IO binding), so the
  arenas hold only each graph's intermediates.
- TF32 follows torch (`torch.backends.cuda.matmul.allow_tf32`, off by default): ORT's CUDA
  provider enables TF32 by default, which would make fp32 graphs disagree with torch fp32 by ~1e-3.
- No silent CPU work: ORT's CUDA partitioner leaves nodes it has no CUDA kernel for to the CPU
  provider and copies tensors across for them. Loading runs each graph once with profiling and
  raises DevicePlacementError naming every node that ran on the CPU with more than shape
  arithmetic, and every host<->device copy node (allow_cpu_nodes=True loads anyway, with a
  WARNING). Not `session.disable_cpu_ep_fallback`: the CUDA provider itself assigns shape
  subgraphs (Shape -> Gather -> Concat -> Reshape, present in every graph with dynamic sizes) to
  the CPU provider, which that option rejects, so every graph here would fail to load with it.

The export directory is checked before any session is built: manifest (format version 2), every
listed file present (graphs and their external-data files), byte size and sha256 equal to the
manifest's (a truncated copy fails here, naming the file), tokenizer files present, and each
graph's input/output names as this backend expects. Hashing reads every byte once: about 0.3 s
for flan-t5-small's 310 MB of graphs.

This module must not import instructrec.export (the engine runs without the exporter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, ModelLoadError
from .model import T5Config
from .sources import EXPORT_MANIFEST_NAME

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "GRAPH_IO", "GRAPH_FILES", "OnnxBackend",
           "DevicePlacementError", "read_manifest", "verify_export_dir", "sha256_file", "DTYPES",
           "cpu_placed_work"]

log = logging.getLogger(__name__)

MANIFEST_NAME = EXPORT_MANIFEST_NAME  # engine/sources.py recognises an export folder by it
FORMAT = "instructrec-onnx"
# 2: graph files renamed (GRAPH_FILES), external-data files hashed, the source's identity recorded.
FORMAT_VERSION = 2
# Graph name -> (input names, output names), in the order the exporter writes them.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("input_ids", "attention_mask"), ("last_hidden_state",)),
    "encoder_kv": (("encoder_hidden_states",), ("cross_key_values",)),
    "decoder": (("decoder_input_ids", "decoder_segment_ids", "encoder_attention_mask", "cross_key_values"),
                ("hidden_states",)),
    "lm_head": (("hidden_states", "labels"), ("log_probs",)),
}
# Graph name -> file name. No file name contains "encoder" or "decoder": Optimum's
# ORTModelForSeq2SeqLM finds its own graphs by regular expressions on those words
# (optimum.onnxruntime.constants), and format 1's encoder.onnx and encoder_kv.onnx both matched
# its encoder pattern. Optimum's stock graphs can then sit in the same folder
# (`instructrec export --with-generation-graphs`).
GRAPH_FILES: dict[str, str] = {
    "encoder": "instructrec-source.onnx",  # instruction tokens -> encoder states
    "encoder_kv": "instructrec-cross-kv.onnx",  # encoder states -> cross-attention K/V of every layer
    "decoder": "instructrec-candidates.onnx",  # packed candidate rows -> decoder states
    "lm_head": "instructrec-logprobs.onnx",  # decoder states + labels -> token log-probs
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# ONNX TensorProto element types (IO binding takes these ints; numpy has no bfloat16).
_ONNX_TYPE = {torch.float32: 1, torch.int64: 7, torch.bfloat16: 16}
_HASH_BLOCK = 1 << 22  # 4 MiB reads


class DevicePlacementError(ModelLoadError):
    """A graph loaded for CUDA would run part of its work on the CPU (nodes without a CUDA kernel,
    or copies between host and device inside the graph); the message lists them."""


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
                             "export again with `instructrec export --model MODEL --out DIR`)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{file}: not an instructrec ONNX manifest (format must be {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{file}: export format version {version!r}, this engine reads version "
                             f"{FORMAT_VERSION} ({_export_again(manifest, version)})")
    for key in ("graphs", "dtype", "t5_config", "tokenizer_files"):
        if key not in manifest:
            raise ModelLoadError(f"{file}: field {key!r} missing")
    return manifest


def _export_again(manifest: dict, version: Any) -> str:
    """The fix for an export of another format version: the command, with the recorded source."""
    source = manifest.get("source")
    if isinstance(source, dict):  # version 2 and later: the source's identity
        model = source.get("repo_id") or source.get("path") or source.get("spec")
        revision = source.get("commit") if source.get("repo_id") else None
    else:  # version 1: the checkpoint folder's path
        model, revision = source, None
    command = (f"instructrec export --model {model or 'CHECKPOINT'}"
               f"{' --revision ' + revision if revision else ''} --out NEW_DIR")
    why = ("its graph files (encoder.onnx, encoder_kv.onnx, ...) are named so that Optimum mistakes "
           "them for its own" if version == 1 else "written by another version of instructrec")
    return f"{why}; export again: `{command}`"


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
    """Raise ModelLoadError naming the first missing or bad file of an export directory (graphs,
    their external-data files, tokenizer files, config.json)."""
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


# ------------------------------------------------------------------------- CUDA placement check
_COPY_OPS = ("MemcpyToHost", "MemcpyFromHost")
_INTEGER_TYPES = ("int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool")


def _is_shape_value(output_type_shape: list) -> bool:
    """True for what shape arithmetic produces: integer (or bool) tensors of rank 0 or 1. ORT's CUDA
    provider keeps such subgraphs on the CPU on purpose (the next Reshape reads them there)."""
    for entry in output_type_shape or []:
        for type_name, shape in entry.items():
            if type_name not in _INTEGER_TYPES or len(shape) > 1:
                return False
    return True


def cpu_placed_work(profile_events: list[dict], device_provider: str = "CUDAExecutionProvider") -> list[str]:
    """From an onnxruntime profile (the JSON list `end_profiling()` writes): every node that ran on
    the CPU provider with more than shape arithmetic, and every host<->device copy node of more
    than a shape value, as "OpType (node name) on Provider -> output types and shapes"."""
    found = []
    for event in profile_events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op, provider = args.get("op_name", "?"), args.get("provider", "?")
        outputs = args.get("output_type_shape", [])
        if _is_shape_value(outputs):
            continue
        if op in _COPY_OPS or provider != device_provider:
            node = event["name"][: -len("_kernel_time")]
            found.append(f"{op} ({node}) on {provider} -> {outputs}")
    return found


def _placement_probe_inputs(name: str, cfg: T5Config, dtype: torch.dtype,
                            device: torch.device) -> dict[str, torch.Tensor]:
    """Small inputs for one profiled run of a graph. Sizes of at least 3 so that no tensor the
    check must see as compute (masks [T, T], position buckets [S, S]) is rank <= 1 by accident."""
    B, S, R, T, N = 1, 3, 1, 3, 3
    ints = dict(dtype=torch.int64, device=device)
    floats = dict(dtype=dtype, device=device)
    if name == "encoder":
        return {"input_ids": torch.full((B, S), 3, **ints), "attention_mask": torch.ones((B, S), **ints)}
    if name == "encoder_kv":
        return {"encoder_hidden_states": torch.zeros((B, S, cfg.d_model), **floats)}
    if name == "decoder":
        return {"decoder_input_ids": torch.full((B, R, T), 3, **ints),
                "decoder_segment_ids": torch.zeros((B, R, T), **ints),
                "encoder_attention_mask": torch.ones((B, S), **ints),
                "cross_key_values": torch.zeros((cfg.num_decoder_layers, 2, B, cfg.num_heads, S, cfg.d_kv), **floats)}
    return {"hidden_states": torch.zeros((N, cfg.d_model), **floats), "labels": torch.zeros((N,), **ints)}


# ------------------------------------------------------------------------------------- backend
class OnnxBackend:
    """Four ORT sessions behind the engine's encode / encoder_kv / decode / head calls."""

    def __init__(self, sessions: dict[str, Any], cfg: T5Config, dtype: torch.dtype, device: torch.device,
                 path: Path, stream: Any = None, run_options: Any = None):
        self.sessions, self.cfg, self.dtype, self.device, self.path = sessions, cfg, dtype, device, path
        self._ort_device = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index if device.type == "cuda" else 0  # from_files gives CUDA an index
        self._stream = stream  # torch.cuda.Stream the sessions run on (CUDA only)
        self._run_options = run_options

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: torch.device, dtype: str | torch.dtype = "auto",
             checksums: bool = True, threads: int | None = None, allow_cpu_nodes: bool = False) -> "OnnxBackend":
        """Sessions over a checked export directory. allow_cpu_nodes (CUDA only): load even when
        onnxruntime would run part of a graph on the CPU (logged as a WARNING instead of raising
        DevicePlacementError)."""
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
        source = manifest.get("source") or {}
        if source.get("kind") == "random":
            log.warning("ONNX export %s holds RANDOMLY INITIALISED weights (%s): its scores and rankings mean "
                        "nothing; fine for speed and memory work only", path, source.get("spec"))
        return cls.from_files(path, manifest["graphs"], exported, device, cfg, threads=threads,
                              allow_cpu_nodes=allow_cpu_nodes)

    @classmethod
    def from_files(cls, path: Path, graphs: dict[str, dict], dtype: str, device: torch.device, cfg: T5Config,
                   threads: int | None = None, allow_cpu_nodes: bool = False) -> "OnnxBackend":
        """Sessions over graph files already checked (the exporter validates graphs with this
        before it writes the manifest)."""
        import onnxruntime as ort

        if dtype == "bfloat16" and device.type == "cpu":
            # Measured with onnxruntime 1.32: CPUExecutionProvider has no bfloat16 kernels for
            # MatMul(13) and Add(14) (session creation fails with NOT_IMPLEMENTED). Casting to fp32
            # here would silently run a different model than the one exported.
            raise InputError("dtype", f"{path} holds bfloat16 graphs, which onnxruntime's CPU execution "
                             "provider cannot run (no bf16 kernels for MatMul, Add)",
                             "on CPU export with --dtype float32, or run these graphs with device='cuda'")
        stream = run_options = None
        if device.type == "cuda":
            if device.index is None:  # "cuda" means torch's current device, not necessarily 0
                device = torch.device("cuda", torch.cuda.current_device())
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("device", "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not "
                                 f"available; installed providers: {ort.get_available_providers()})",
                                 "pip install 'instructrec[gpu]', or use device='cpu'")
            stream = torch.cuda.Stream(device)
            providers: list = [("CUDAExecutionProvider", cuda_provider_options(device, stream.cuda_stream))]
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        profile_dir = tempfile.mkdtemp(prefix="instructrec-ort-profile-") if device.type == "cuda" else None
        try:
            if profile_dir is not None:  # for the placement check; off again after its one run
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(profile_dir) / "placement")
            sessions = _open_sessions(ort, path, graphs, options, providers)
            if profile_dir is not None:
                _check_placement(sessions, path, graphs, cfg, DTYPES[dtype], device, allow_cpu_nodes)
        finally:
            if profile_dir is not None:
                shutil.rmtree(profile_dir, ignore_errors=True)
        return cls(sessions, cfg, DTYPES[dtype], device, path, stream=stream, run_options=run_options)

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
        if self._stream is None:
            sess.run_with_iobinding(binding, self._run_options)
            return out
        # Read per run: the caller may have switched streams since the last one.
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # inputs written on the caller's stream are ready
        sess.run_with_iobinding(binding, self._run_options)  # queued on self._stream; no host sync
        # Later work on the caller's stream (the next graph, reading `out`, freeing or reusing the
        # inputs' memory through torch's allocator) is ordered after this run.
        caller.wait_stream(self._stream)
        return out

    def synchronize(self) -> None:
        """Block the host until every run queued so far has finished. The runner calls it once per
        read window; no-op on CPU, where every run returns finished."""
        if self._stream is not None:
            self._stream.synchronize()

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


def cuda_provider_options(device: torch.device, stream_handle: int) -> dict[str, str]:
    """The CUDA provider options of all four sessions (see the module docstring)."""
    return {
        "device_id": str(device.index),
        "user_compute_stream": str(stream_handle),  # a non-default stream: its handle is never 0
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "1" if torch.backends.cuda.matmul.allow_tf32 else "0",
    }


def _open_sessions(ort: Any, path: Path, graphs: dict[str, dict], options: Any, providers: list) -> dict[str, Any]:
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
    return sessions


def _check_placement(sessions: dict[str, Any], path: Path, graphs: dict[str, dict], cfg: T5Config,
                     dtype: torch.dtype, device: torch.device, allow_cpu_nodes: bool) -> None:
    """One profiled run of every graph on small inputs (the sessions were created with profiling
    on; end_profiling switches it off for every later run), then DevicePlacementError (a WARNING
    with allow_cpu_nodes) listing every node that ran on the CPU with more than shape arithmetic,
    and every copy node."""
    problems = []
    for name, sess in sessions.items():
        feeds = _placement_probe_inputs(name, cfg, dtype, device)
        torch.cuda.synchronize(device)  # the feeds were written on torch's stream, the session runs on its own
        binding = sess.io_binding()
        for key, t in feeds.items():
            binding.bind_input(key, "cuda", device.index, _ONNX_TYPE[t.dtype], tuple(t.shape), t.data_ptr())
        binding.bind_output(GRAPH_IO[name][1][0], "cuda", device.index)
        sess.run_with_iobinding(binding)  # synchronised: the profile is complete when it returns
        profile = Path(sess.end_profiling())
        try:
            events = json.loads(profile.read_text())
        finally:
            profile.unlink(missing_ok=True)
        problems += [f"{graphs[name]['file']}: {item}" for item in cpu_placed_work(events)]
    if not problems:
        return
    shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
    message = (f"{path}: onnxruntime would run {len(problems)} node(s) of these graphs on the CPU or copy "
               f"tensors between host and device inside them:\n  {shown}")
    if allow_cpu_nodes:
        log.warning("%s\n(loaded anyway: allow_cpu_nodes=True)", message)
        return
    raise DevicePlacementError(message + "\nEach is a host round trip per run. Report them with your onnxruntime "
                               "version; to run anyway pass allow_cpu_nodes=True")
