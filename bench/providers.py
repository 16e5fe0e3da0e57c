"""The providers `instructrec bench` compares, all on the same weights, inputs and thread count.

- engine-torch-fp32 / engine-torch-bf16 / engine-onnx-fp32: this engine (`Reranker`), the onnx
  one on our own export (`instructrec.export.export_model`).
- engine-torch-auto: `dtype="auto"`, the engine's precision policy for this CPU
  (`instructrec.engine.capabilities`); the report names what it resolved to.
- engine-torch-int8: the fp32 engine with its linear layers dynamically quantised to int8
  (`instructrec.engine.quantize`); the LM head stays fp32.
- hf-per-pair: Hugging Face transformers, one forward per (instruction, candidate).
- hf-batched: Hugging Face, pairs in padded batches with the encoder run again for every pair,
  full [pairs, n, vocab] logits, log_softmax + gather. The fp32 reference of the agreement figures.
- optimum-ort: Optimum's ORTModelForSeq2SeqLM on Optimum's own export, batched like hf-batched,
  with IO binding (the same logits as without it on CPU, bit for bit; the GPU path on CUDA).
- ct2-fp32 / ct2-int8: CTranslate2 `Translator.score_batch` on models converted by its
  TransformersConverter (float32; int8 weights). CTranslate2's CPU build offers no bfloat16
  compute type on the CPUs measured (get_supported_compute_types("cpu") has none).

Devices (`--device`, `instructrec bench --device cuda`): every provider runs on the device asked
for, or is skipped with the reason in the report; none ever runs on the CPU in place of the GPU.
- On CUDA only: engine-onnx-bf16 (a bf16 export on onnxruntime's CUDA provider; its CPU provider
  has no bf16 MatMul/Add kernels), ct2-bf16, ct2-int8-bf16 and ct2-int8-fp16 (CTranslate2's
  GPU compute types: bfloat16 needs compute capability >= 8.0; int8_float16 is CTranslate2's
  usual fastest GPU type, reported with its agreement since T5 activations can overflow fp16).
- On CPU only: engine-torch-int8 (torch's dynamic int8 linear has CPU kernels only).
- hf-batched-bf16: Hugging Face batched in bf16 (on CPU only where the CPU runs bf16 natively).
- On CUDA the engine's onnx backend and optimum-ort run on onnxruntime's CUDAExecutionProvider
  with IO binding (optimum: `use_io_binding=True`, inputs on the device); CTranslate2 runs with
  device="cuda" and the compute type of its provider, when get_supported_compute_types("cuda")
  lists it for that GPU.

A provider's `prepare` (export, conversion) runs once in the parent and is cached; `open` loads it
in the worker process; `run` scores one workload and returns rankings, timings and FLOP counts.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from instructrec.engine.errors import InputError

from .flops import FlopCount, T5Shape, model_flops, padded_batch_flops, padding_scaled, per_pair_flops
from .workloads import (
    POINTWISE_TARGET, Encoding, Stopwatch, WorkloadInputs, instruction_text, model_work, run_tournament_scoring,
    tokenize_source, tokenize_targets,
)

log = logging.getLogger(__name__)

REFERENCE = "hf-batched"  # fp32: every provider's rankings are compared with this one's
# Scores like REFERENCE to ~1e-5 (tests/bench) on all --requests, where the peers score fewer:
# agreement with it is the larger sample for the engine's other precisions.
ENGINE_FP32 = "engine-torch-fp32"


@dataclass
class WorkloadRun:
    """What one provider did on one workload."""

    rankings: list[list[int]]  # per request: candidate numbers, best first
    scores: list[list[float]] | None  # per request, candidate order (None after a tournament)
    wall_s: float  # timed part, tokenization included
    tokenize_s: float  # of which tokenization (and instruction formatting)
    executed: FlopCount
    latencies_s: list[float] = field(default_factory=list)  # latency workload: per request, end to end
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    family: str  # engine | hf | optimum | ct2
    dtype: str  # the compute dtype reported in the CSV ("auto": the one it resolved to is reported)
    # the kernels whose peak its utilisation is measured against on CPU (bench/peaks.py KERNELS;
    # on a GPU every provider is read against CUDA_PEAK_KERNEL); None: known only once loaded
    # (engine-torch-auto)
    peak_kernel: str | None
    repeats_encoder: bool  # runs the encoder per pair: capped by --peer-requests
    package: str | None = None  # the import a peer needs beyond our own dependencies
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it can run on (DEVICE_ONLY_REASONS says why not)

    def missing_package(self) -> str | None:
        if self.package and importlib.util.find_spec(self.package) is None:
            return self.package
        return None


# The peak every provider's model-FLOP utilisation is read against on a GPU (bench/peaks.py).
CUDA_PEAK_KERNEL = "cuda:bfloat16"

PROVIDERS: dict[str, ProviderSpec] = {s.name: s for s in (
    ProviderSpec("engine-torch-auto", "engine", "auto", None, False),
    ProviderSpec("engine-torch-fp32", "engine", "float32", "torch:float32", False),
    ProviderSpec("engine-torch-bf16", "engine", "bfloat16", "torch:bfloat16", False),
    # compile_model=True: torch.compile of encoder and decoder; its compile time is in the warm-up.
    ProviderSpec("engine-torch-bf16-compiled", "engine", "bfloat16", "torch:bfloat16", False),
    ProviderSpec("engine-torch-int8", "engine", "int8", "torch:int8-dynamic", False, devices=("cpu",)),
    ProviderSpec("engine-onnx-fp32", "engine", "float32", "onnxruntime:float32", False),
    ProviderSpec("engine-onnx-bf16", "engine", "bfloat16", CUDA_PEAK_KERNEL, False, devices=("cuda",)),
    ProviderSpec("hf-per-pair", "hf", "float32", "torch:float32", True),
    ProviderSpec("hf-batched", "hf", "float32", "torch:float32", True),
    ProviderSpec("hf-batched-bf16", "hf", "bfloat16", "torch:bfloat16", True),
    ProviderSpec("optimum-ort", "optimum", "float32", "onnxruntime:float32", True, "optimum.onnxruntime"),
    ProviderSpec("ct2-fp32", "ct2", "float32", "ctranslate2:float32", True, "ctranslate2"),
    ProviderSpec("ct2-int8", "ct2", "int8", "ctranslate2:int8", True, "ctranslate2"),
    # the dtype of a CTranslate2 provider is its compute_type
    ProviderSpec("ct2-bf16", "ct2", "bfloat16", CUDA_PEAK_KERNEL, True, "ctranslate2", devices=("cuda",)),
    ProviderSpec("ct2-int8-bf16", "ct2", "int8_bfloat16", CUDA_PEAK_KERNEL, True, "ctranslate2", devices=("cuda",)),
    ProviderSpec("ct2-int8-fp16", "ct2", "int8_float16", CUDA_PEAK_KERNEL, True, "ctranslate2", devices=("cuda",)),
)}
# Why a provider does not run on a device type it does not list.
DEVICE_ONLY_REASONS = {
    "engine-torch-int8": "CPU only: torch's dynamically quantised int8 linear has no CUDA kernels",
    "engine-onnx-bf16": "CUDA only: onnxruntime's CPU provider has no bfloat16 kernels for MatMul and Add",
    "ct2-bf16": "CUDA only here: CTranslate2 is measured on CPU in float32 and int8 (its CPU builds list no "
                "bfloat16 compute type on the CPUs measured)",
    "ct2-int8-bf16": "CUDA only here: a GPU compute type of CTranslate2 (int8 weights, bfloat16 activations)",
    "ct2-int8-fp16": "CUDA only here: a GPU compute type of CTranslate2 (int8 weights, float16 activations)",
}


def unavailable_reason(spec: ProviderSpec, device: str) -> str | None:
    """Why `spec` cannot run on `device` ("cpu", "cuda:N") on this machine, or None when it can.
    Checked before anything is prepared, so that no provider is ever run elsewhere than asked, and
    without a CUDA context in this (the parent) process: a GPU without bfloat16 is found by the
    provider's own process (Provider.__init__), which then fails with that reason."""
    import torch

    dev = torch.device(device)
    if dev.type not in spec.devices:
        return DEVICE_ONLY_REASONS.get(spec.name, f"does not run on {dev.type}")
    if spec.dtype == "bfloat16" and spec.family == "hf" and dev.type == "cpu":
        from instructrec.engine.capabilities import cpu_info

        if not cpu_info().native_bf16:
            return "this CPU has no native bfloat16 (no AVX512-BF16, no AMX): bf16 matmuls run hundreds of times slower"
    if spec.name.startswith("engine-onnx") or spec.family == "optimum":
        return _onnxruntime_reason(dev)
    if spec.family == "ct2":
        return _ct2_reason(spec, dev)
    return None


def _onnxruntime_reason(dev) -> str | None:
    if dev.type != "cuda":
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (f"onnxruntime has no CUDAExecutionProvider here (installed: {', '.join(available)}; "
                "pip install 'instructrec[gpu]' brings onnxruntime-gpu)")
    return None


def _ct2_reason(spec: ProviderSpec, dev) -> str | None:
    import ctranslate2

    index = dev.index or 0
    if dev.type == "cuda" and ctranslate2.get_cuda_device_count() <= index:
        return (f"CTranslate2 sees {ctranslate2.get_cuda_device_count()} CUDA device(s) "
                "(a CPU-only build, or no CUDA runtime it can load)")
    supported = ctranslate2.get_supported_compute_types(dev.type, index)
    if spec.dtype not in supported:
        return (f"CTranslate2 does not offer compute type {spec.dtype} on this {dev.type} "
                f"(get_supported_compute_types: {', '.join(sorted(supported))})")
    return None


def versions(spec: ProviderSpec, device: str = "cpu") -> str:
    """Package versions that produced a provider's figures, "name=version;..." (on CUDA also the
    CUDA version torch was built with; onnxruntime is the onnxruntime-gpu distribution there)."""
    from importlib.metadata import PackageNotFoundError, version

    ort = "onnxruntime-gpu" if device.startswith("cuda") else "onnxruntime"
    names = ["instructrec", "torch"]
    names += {"engine": [ort] if spec.name.startswith("engine-onnx") else [],
              "hf": ["transformers"], "optimum": ["transformers", "optimum-onnx", ort],
              "ct2": ["ctranslate2"]}[spec.family]
    out = []
    for name in names:
        try:
            out.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name}=absent")
    if device.startswith("cuda"):
        import torch

        out.append(f"cuda={torch.version.cuda}")
    return ";".join(out)


# ---- preparation (parent process, cached) -----------------------------------------------------


def ct2_weights(spec: ProviderSpec) -> str:
    """The conversion a CTranslate2 provider loads: int8 weights for its int8 compute types,
    float32 otherwise (CTranslate2 converts the weights to the compute type when it loads them)."""
    return "int8" if spec.dtype.startswith("int8") else "float32"


def prepare(spec: ProviderSpec, checkpoint: Path, cache: Path, device: str = "cpu") -> Path:
    """The directory `open` loads for this provider, made once under `cache`. `device`: where a
    bf16 export is validated (onnxruntime runs bf16 graphs on CUDA only)."""
    if spec.name.startswith("engine-torch") or spec.family == "hf":
        return checkpoint
    if spec.name.startswith("engine-onnx"):
        from instructrec.engine.onnx_backend import FORMAT_VERSION

        # One folder per export format version and dtype: an export cached by another version is never loaded.
        dtype = spec.dtype
        folder = f"engine-onnx-v{FORMAT_VERSION}" + ("" if dtype == "float32" else f"-{dtype}")
        return _cached(cache / folder, "instructrec_onnx.json",
                       lambda out: _export_ours(checkpoint, out, dtype, device))
    if spec.family == "optimum":
        return _cached(cache / "optimum-onnx", "encoder_model.onnx", lambda out: _export_optimum(checkpoint, out))
    if spec.family == "ct2":
        quantization = ct2_weights(spec)
        return _cached(cache / f"ct2-{quantization}", "model.bin",
                       lambda out: _convert_ct2(checkpoint, out, quantization))
    raise InputError("--providers", f"no preparation for {spec.name!r}")


def _cached(out: Path, marker: str, make: Callable[[Path], None]) -> Path:
    if (out / marker).exists():
        return out
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run of ours: its own scratch folder
    t0 = time.perf_counter()
    make(partial)
    partial.rename(out)  # complete or absent: a crash never leaves a half export under the real name
    log.info("prepared %s in %.1f s", out, time.perf_counter() - t0)
    return out


def _export_ours(checkpoint: Path, out: Path, dtype: str = "float32", device: str = "cpu") -> None:
    import torch

    from instructrec.export import export_model

    if dtype == "float32":
        export_model(checkpoint, out)
        return
    # bf16 graphs are validated on the GPU (the exporter's "cuda" is the current device)
    with torch.cuda.device(torch.device(device)):
        export_model(checkpoint, out, dtype=dtype, validation_device="cuda")
    torch.cuda.empty_cache()  # the parent keeps no GPU memory beyond its context while workers run


def _export_optimum(checkpoint: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), out, task="text2text-generation", do_validation=False)


def _convert_ct2(checkpoint: Path, out: Path, quantization: str) -> None:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(checkpoint)).convert(str(out), quantization=quantization)


# ---- running (worker process) -----------------------------------------------------------------


class Provider:
    """A loaded provider: `run(inputs)` scores a workload on `device`. `peak_kernel` and `dtype`:
    what it runs on once loaded (engine-torch-auto resolves them at load).

    Timing on CUDA: every timed region starts and ends with `sync()`, torch.cuda.synchronize of
    the device, which waits for every stream of this process on it (torch's, onnxruntime's,
    CTranslate2's: one CUDA context per device and process). Wall time between the two is what a
    caller waits for; CUDA events on torch's stream would miss the other libraries' streams."""

    def __init__(self, spec: ProviderSpec, path: Path, checkpoint: Path, threads: int, seed: int,
                 pairs_per_batch: int, device: str = "cpu"):
        import json

        import torch
        from transformers import AutoTokenizer

        self.spec, self.path, self.threads, self.seed = spec, path, threads, seed
        self.pairs_per_batch = pairs_per_batch
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu and "bfloat16" in spec.dtype and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(self.device)} has no bfloat16 (compute capability "
                               f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))} < 8.0)")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.shape = T5Shape.from_config(json.loads((checkpoint / "config.json").read_text()))
        self.peak_kernel = CUDA_PEAK_KERNEL if self.on_gpu else spec.peak_kernel
        self.dtype = spec.dtype

    def sync(self) -> None:
        """Wait for everything queued on the device (no-op on CPU)."""
        if self.on_gpu:
            import torch

            torch.cuda.synchronize(self.device)

    def run(self, inputs: WorkloadInputs) -> WorkloadRun:
        raise NotImplementedError


def open_provider(spec: ProviderSpec, path: Path, checkpoint: Path, threads: int, seed: int,
                  pairs_per_batch: int, device: str = "cpu") -> Provider:
    cls = EngineProvider if spec.family == "engine" else PairProvider
    return cls(spec, path, checkpoint, threads, seed, pairs_per_batch, device)


def _ranking(scores: np.ndarray) -> list[int]:
    return np.argsort(-np.asarray(scores), kind="stable").tolist()


def engine_t5(reranker: Any):
    """The torch T5 module a torch-backend Reranker runs (`reranker.backend.model`, or
    `reranker.model` in older layouts)."""
    from instructrec.engine.model import T5

    for candidate in (getattr(getattr(reranker, "backend", None), "model", None), getattr(reranker, "model", None)):
        if isinstance(candidate, T5):
            return candidate
    raise TypeError(f"{type(reranker).__name__} holds no torch T5 module (onnx backend?)")


def _torch_kernel(reranker: Any) -> tuple[str, str]:
    """(peak kernel, dtype name) of a loaded torch-backend Reranker."""
    import torch

    from instructrec.engine.quantize import quantized_linear_count

    model = engine_t5(reranker)
    if quantized_linear_count(model):
        return "torch:int8-dynamic", "int8"
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.shared.weight.dtype]
    return f"torch:{name}", name


class EngineProvider(Provider):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from instructrec.engine import Reranker

        backend = "onnx" if "onnx" in self.spec.name else "torch"
        options: dict = {"seed": self.seed}
        if backend == "onnx":
            options["threads"] = self.threads  # onnxruntime's intra-op threads (its CPU side on CUDA)
        if self.spec.name.endswith("-compiled"):
            options["compile_model"] = True
        # On CUDA the onnx backend loads strictly: a graph that would run nodes on the CPU raises
        # DevicePlacementError (engine/onnx_backend.py) and the provider is reported as failed.
        self.reranker = Reranker.from_pretrained(self.path, backend=backend, device=str(self.device),
                                                 dtype=self.spec.dtype, **options)
        if self.spec.dtype == "auto":  # what it resolved to
            kernel, self.dtype = _torch_kernel(self.reranker)
            self.peak_kernel = CUDA_PEAK_KERNEL if self.on_gpu else kernel

    def _requests(self, inputs: WorkloadInputs) -> list:
        from instructrec.engine import Request

        if inputs.name != "pointwise":
            return inputs.requests
        return [Request(instruction=source, candidates=[POINTWISE_TARGET], request_id=f"{k}-{c}")
                for k, sources in enumerate(inputs.pointwise_sources) for c, source in enumerate(sources)]

    def run(self, inputs: WorkloadInputs) -> WorkloadRun:
        rr = self.reranker
        requests = self._requests(inputs)
        rr.reset_stats()
        latencies: list[float] = []
        self.sync()
        t0 = time.perf_counter()
        if inputs.name == "latency":
            results = []
            for r in requests:
                start = time.perf_counter()
                results += rr.rank([r])
                self.sync()
                latencies.append(time.perf_counter() - start)
        else:
            results = rr.rank(requests)
        self.sync()
        wall = time.perf_counter() - t0
        if inputs.name == "pointwise":
            flat = np.array([res.scores[0] for res in results])
            sizes = [len(s) for s in inputs.pointwise_sources]
            per_request = np.split(flat, np.cumsum(sizes)[:-1])
            scores = [s.tolist() for s in per_request]
            rankings = [_ranking(s) for s in per_request]
        else:
            rankings = [[int(i) for i in res.ranked_ids] for res in results]
            scores = None
            if inputs.name != "rerank-100":
                scores = []
                for res in results:
                    s = np.empty(len(res.ranked_ids))
                    s[np.array(res.ranked_ids, dtype=np.int64)] = res.scores
                    scores.append(s.tolist())
        st = rr.stats
        needed = model_flops(self.shape, model_work(inputs, self.tokenizer, self.seed))
        executed = padding_scaled(needed, st.encoder_tokens, st.padded_encoder_tokens, st.decoder_tokens,
                                  st.padded_decoder_tokens)
        extra = {"encoder_passes": st.encoder_passes, "decoder_padding": st.decoder_padding_fraction,
                 "encoder_padding": 1 - st.encoder_tokens / st.padded_encoder_tokens if st.padded_encoder_tokens
                 else 0.0, "candidate_scorings": st.candidates}
        return WorkloadRun(rankings, scores, wall, rr.timings["tokenize_s"], executed, latencies, extra)


class PairProvider(Provider):
    """The peers: each scores (instruction, candidate) pairs; the encoder runs for every pair."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.executed = FlopCount()
        self.encoder_passes = 0
        family, name = self.spec.family, self.spec.name
        if family == "hf":
            import torch
            from transformers import T5ForConditionalGeneration

            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.spec.dtype]
            self.model = T5ForConditionalGeneration.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
            self._score_pairs = self._hf_pairs
            self.batch = 1 if name == "hf-per-pair" else self.pairs_per_batch
        elif family == "optimum":
            import onnxruntime as ort
            from optimum.onnxruntime import ORTModelForSeq2SeqLM

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            # IO binding on both devices, one code path: Optimum binds the torch tensors it is given
            # where they live (on CUDA the inputs and the [pairs, n, V] logits stay on the GPU; on
            # CPU it skips a numpy round trip and gives the same logits bit for bit).
            gpu = {}
            if self.on_gpu:
                gpu = {"provider": "CUDAExecutionProvider", "provider_options": {"device_id": self.device.index}}
            self.model = ORTModelForSeq2SeqLM.from_pretrained(self.path, use_cache=False, session_options=so,
                                                              use_io_binding=True, **gpu)
            if self.on_gpu and self.model.device != self.device:
                raise RuntimeError(f"Optimum placed the model on {self.model.device}, {self.device} was asked")
            self._score_pairs = self._hf_pairs
            self.batch = self.pairs_per_batch
        else:
            import ctranslate2

            self.model = ctranslate2.Translator(str(self.path), device=self.device.type,
                                                device_index=self.device.index or 0, compute_type=self.spec.dtype,
                                                inter_threads=1, intra_threads=self.threads)
            self._score_pairs = self._ct2_pairs
            self.batch = self.pairs_per_batch

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, encodings: list[Encoding]) -> list[np.ndarray]:
        """Sum of target-token log-probs of every (encoding, target) pair, per encoding."""
        pairs = [(e.source, t) for e in encodings for t in e.targets]
        flat = np.concatenate([self._score_pairs(pairs[i:i + self.batch])
                               for i in range(0, len(pairs), self.batch)]) if pairs else np.zeros(0)
        self.encoder_passes += len(pairs)
        return np.split(flat, np.cumsum([len(e.targets) for e in encodings])[:-1])

    def _hf_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        import torch

        rows, S, n = len(pairs), max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
        src = torch.zeros(rows, S, dtype=torch.long)  # pad id 0
        labels = torch.full((rows, n), -100, dtype=torch.long)
        for i, (s, t) in enumerate(pairs):
            src[i, :len(s)] = torch.tensor(s)
            labels[i, :len(t)] = torch.tensor(t)
        mask = (torch.arange(S)[None, :] < torch.tensor([len(p[0]) for p in pairs])[:, None]).long()
        # decoder input: the start id (0) then the target shifted right, as T5 does with labels
        dec_in = torch.cat([torch.zeros(rows, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
        src, mask, dec_in, labels = (t.to(self.device) for t in (src, mask, dec_in, labels))
        with torch.inference_mode():
            logits = self.model(input_ids=src, attention_mask=mask, decoder_input_ids=dec_in).logits  # [P, n, V]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # [P, n]
            sums = (lp.double() * (labels != -100)).sum(-1).cpu()  # the host copy waits for the device
        if self.batch == 1:
            self.executed = self.executed + per_pair_flops(self.shape, [(len(s), len(t)) for s, t in pairs])
        else:
            self.executed = self.executed + padded_batch_flops(self.shape, [[(len(s), len(t)) for s, t in pairs]])
        return sums.numpy()

    def _ct2_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        tok = self.tokenizer
        sources = [tok.convert_ids_to_tokens(s) for s, _ in pairs]  # closing </s> included, as the engine encodes
        # CTranslate2 adds the decoder start token and appends </s> itself: the target goes without it.
        targets = [tok.convert_ids_to_tokens(t[:-1]) for _, t in pairs]
        results = self.model.score_batch(sources, targets, max_batch_size=self.batch)
        # CTranslate2 sorts by length and pads inside its batch; counted here unpadded, a lower bound.
        self.executed = self.executed + per_pair_flops(self.shape, [(len(s), len(t)) for s, t in pairs])
        return np.array([float(np.sum(r.log_probs, dtype=np.float64)) for r in results])

    # -- workloads -------------------------------------------------------------------------------
    def run(self, inputs: WorkloadInputs) -> WorkloadRun:
        tok, watch = self.tokenizer, Stopwatch()
        self.executed, self.encoder_passes = FlopCount(), 0
        rankings: list[list[int]] = []
        scores: list[list[float]] | None = []
        latencies: list[float] = []
        self.sync()
        t0 = time.perf_counter()
        if inputs.name == "rerank-100":
            scores = None
            for r in inputs.requests:
                ranking, _ = run_tournament_scoring(r, self.score, tok, self.seed, watch)
                rankings.append(ranking.tolist())
        elif inputs.name == "latency":
            for r in inputs.requests:
                start = time.perf_counter()
                with watch.tokenizing():
                    encoding = Encoding(tokenize_source(tok, instruction_text(r, None, tok)),
                                        tokenize_targets(tok, list(r.candidates)))
                s = self.score([encoding])[0]
                self.sync()
                latencies.append(time.perf_counter() - start)
                scores.append(s.tolist())
                rankings.append(_ranking(s))
        else:
            sizes = [len(r.candidates) for r in inputs.requests]
            with watch.tokenizing():
                if inputs.name == "pointwise":
                    yes = tokenize_targets(tok, [POINTWISE_TARGET])[0]
                    encodings = [Encoding(tokenize_source(tok, s), [yes]) for ss in inputs.pointwise_sources
                                 for s in ss]
                else:
                    encodings = [Encoding(tokenize_source(tok, instruction_text(r, None, tok)),
                                          tokenize_targets(tok, list(r.candidates))) for r in inputs.requests]
            flat = np.concatenate(self.score(encodings))
            for s in np.split(flat, np.cumsum(sizes)[:-1]):
                scores.append(s.tolist())
                rankings.append(_ranking(s))
        self.sync()
        wall = time.perf_counter() - t0
        return WorkloadRun(rankings, scores, wall, watch.tokenize_s, self.executed, latencies,
                           {"encoder_passes": self.encoder_passes})
