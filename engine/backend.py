"""What the device loop (engine/runner.py) needs from a model: the `Backend` protocol, and the
torch implementation of it. engine/onnx_backend.py's OnnxBackend is the other implementation.

A backend answers four calls on torch tensors of its device, and says what it runs:
- encode(ids [B, S], mask [B, S] bool) -> encoder output [B, S, D];
- encoder_kv(enc) -> every decoder layer's cross-attention keys and values, computed once per
  instruction (an opaque object the backend's own decode reads: a list of (k, v) for torch, one
  stacked [L, 2, B, H, S, dk] tensor for onnxruntime);
- decode(ids [B, R, T], segments [B, R, T], kv, src_mask [B, S]) -> hidden states [B, R, T, D];
- head(hidden [N, D], targets [N], chunk_tokens) -> [N] fp32 log-probabilities of the targets.
A backend whose `has_exact_head` is True also takes head(..., exact=True): logits kept in fp32
where the default rounds them (the engine's `exact_head` option).
Planning, packing, counters and results belong to the reranker and are shared by all backends.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import InputError
from .model import T5, T5Config
from .packing import IGNORE

__all__ = ["Backend", "TorchBackend"]

log = logging.getLogger(__name__)


@runtime_checkable
class Backend(Protocol):
    cfg: T5Config
    dtype: torch.dtype
    device: torch.device

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def encoder_kv(self, enc: torch.Tensor) -> Any: ...

    def decode(self, ids: torch.Tensor, segments: torch.Tensor, kv: Any, src_mask: torch.Tensor) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor: ...


class TorchBackend:
    """The engine's torch T5 (engine/model.py) behind the four calls."""

    has_exact_head = True

    def __init__(self, model: T5, device: torch.device):
        from .quantize import quantized_linear_count

        self.model, self.cfg, self.device = model, model.cfg, device
        self.dtype = model.shared.weight.dtype
        # What the matmuls run in: "int8" when the linear layers are quantised (the weights' dtype,
        # fp32, is then only that of the embedding, head and norms).
        self.precision = "int8" if quantized_linear_count(model) else str(self.dtype).removeprefix("torch.")
        self._encode, self._decode = model.encode, model.decode

    def compile(self) -> None:
        """torch.compile (Inductor, dynamic shapes) of the encoder and the decoder: norms,
        residual adds, casts, masks and the gated activation fuse into a few generated loops
        around the matmuls and attention. On a random flan-t5-base shape in bf16 on this
        project's CPU, one thread, rerank-10 ran 30.0 against 25.7 candidates/s (1.17x, quiet
        machine; 1.6x less CPU time on a loaded one) after a one-off compile of 100-150 s, plus
        shorter recompiles when a batch shape first has a dimension of 1. Worth it for long
        jobs, not for a handful of requests."""
        if self.precision == "int8":
            raise InputError("compile_model", "torch.compile of the int8-quantised model is not supported here "
                             "(its quantised linear ops are untested under Inductor)",
                             "drop compile_model, or use dtype='bfloat16' / 'float32' with it")
        if self.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            raise InputError("compile_model", "torch.compile on CPU needs a C++ compiler (c++, g++ or clang++) "
                             "on PATH and none was found", "install one (e.g. apt-get install g++) or drop compile_model")
        log.info("compiling the encoder and decoder with torch.compile: the first batches take minutes on CPU")
        self._encode = torch.compile(self.model.encode, dynamic=True)
        self._decode = torch.compile(self.model.decode, dynamic=True)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._encode(ids, mask)

    def encoder_kv(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.model.encoder_kv(enc)

    def decode(self, ids: torch.Tensor, segments: torch.Tensor, kv: list, src_mask: torch.Tensor) -> torch.Tensor:
        return self._decode(ids, segments, kv, src_mask)

    def head(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
             exact: bool = False) -> torch.Tensor:
        """exact: fp32 logits whatever the weights' dtype. Only bf16 weights on CPU differ: there
        the default GEMM writes a bf16 logits tile (torch has no bf16 x bf16 -> fp32 GEMM on CPU),
        which moves a token's log-prob by 1.6e-2 nats on average (up to ~6e-2); exact runs the head
        GEMM in fp32 on upcast copies instead: error ~6e-6 nats, for 2.1-2.4x the head GEMM's time
        (kernels/lm_head.py, measured on this project's CPU: D=512, 131 -> 273 ms per 512-row chunk).
        End to end, rerank-10 on random:flan-t5-small in bf16 (16 requests, 1 thread, shared
        machine): 2.58 s of CPU time against 2.23 s (+15%). On CUDA (torch >= 2.8) and with fp32
        weights the default is already fp32: exact changes nothing."""
        from instructrec.kernels import lm_head_log_softmax_gather

        return lm_head_log_softmax_gather(hidden, self.model.lm_weight, targets, chunk_tokens=chunk_tokens,
                                          ignore_index=IGNORE, check_targets=self.device.type != "cuda",
                                          logits_dtype=torch.float32 if exact else None)
