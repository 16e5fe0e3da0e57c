"""Dynamic int8 quantisation of the engine's T5 on CPU: every linear layer of the encoder and the
decoder runs as an int8 x int8 GEMM (weights quantised once, per output channel; activations
quantised per call, per tensor) through torch's x86 quantised backend (fbgemm / oneDNN, VNNI
dot products where the CPU has them), with fp32 outputs.

What stays in floating point, and why:
- the LM head and the embedding: the head's log-softmax over 32,128 words is where rankings are
  decided, and it is ~10% of flan-t5-base's rerank-10 FLOPs; it stays fp32 (the head is a plain
  parameter read by `instructrec.kernels.lm_head_log_softmax_gather`, untouched here);
- norms, attention (scores and mixing run in fp32 SDPA) and the residual stream (fp32, because
  the embedding stays fp32: `T5.residual_dtype`).

Measured on this project's Zen 4 CPU (AVX512-VNNI, one thread, machine shared): the quantised
linear reaches 120-300 GFLOP/s on flan-t5-base's GEMM shapes against 25-90 for fp32 and 75-210
for bf16, with a relative output error of ~2% per layer (per-tensor activation scales).

The path is `torch.ao.quantization.quantize_dynamic`, which torch marks as deprecated in favour of
torchao (not a dependency of this project); it works, and is tested, in the pinned torch 2.13. Its
deprecation warnings are silenced for the one call only, so they do not reach every user of
`dtype="int8"`.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from .errors import InputError

__all__ = ["quantize_dynamic_int8", "quantized_linear_count", "SUPPORTED_ENGINES", "FullRangeDynamicLinear"]

log = logging.getLogger(__name__)

# torch's quantised engines with per-output-channel dynamic int8 linear layers on x86.
SUPPORTED_ENGINES = ("x86", "fbgemm")


class FullRangeDynamicLinear(DynamicLinear):
    """torch's dynamic int8 linear with activations quantised over the full 8 bits.

    torch's own module passes reduce_range=True (7-bit activations) to guard against the int16
    saturation of u8 x s8 pair products on CPUs without VNNI; with VNNI (vpdpbusd) the products
    accumulate straight into int32, so the eighth bit is free: it halves the output error
    (flan-t5-base GEMM shapes with T5-like outlier channels: 16-20% -> 8-10% relative error, same
    speed; flan-t5-small random weights: max rerank score error 31 -> 18 on scores near -800).
    Used where `cpu_info().native_int8` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=False).to(x.dtype)


def quantize_dynamic_int8(model: nn.Module, full_range: bool | None = None) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by torch's dynamically quantised int8
    linear, and return `model`. For the engine's `T5` that is every projection and FFN matrix of
    the encoder and decoder; the LM head, embedding and norms keep their fp32 weights.

    `full_range`: 8-bit activations (FullRangeDynamicLinear) instead of torch's 7; default: where
    the CPU has VNNI int8 dot products (`instructrec.engine.capabilities.cpu_info().native_int8`).

    `model` must hold fp32 weights on the CPU (int8 starts from the fp32 model; the quantised
    kernels are CPU kernels). InputError otherwise, or when torch's quantised engine is not one of
    SUPPORTED_ENGINES."""
    params = list(model.parameters())
    devices = {p.device.type for p in params}
    dtypes = {p.dtype for p in params}
    if devices - {"cpu"}:
        raise InputError("dtype", f"int8 quantisation runs on the CPU, the model is on {sorted(devices)}",
                         "load the model with device='cpu', or use dtype='bfloat16' on a GPU")
    if dtypes - {torch.float32}:
        raise InputError("dtype", f"int8 quantisation starts from fp32 weights, the model has "
                         f"{sorted(str(d) for d in dtypes)}", "load the model in float32, then quantise it")
    engine = torch.backends.quantized.engine
    if engine not in SUPPORTED_ENGINES:
        raise InputError("dtype", f"torch's quantised engine is {engine!r}, which has no per-channel dynamic "
                         f"int8 linear here", f"use an x86 CPU (engines {', '.join(SUPPORTED_ENGINES)}) or "
                         "dtype='float32'")
    if full_range is None:
        from .capabilities import cpu_info

        full_range = cpu_info().native_int8
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # "torch.ao.quantization is deprecated" and "quantize_per_tensor ... deprecated": see the
        # module docstring; any other warning still shows.
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions .* are deprecated")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True,
                         mapping={nn.Linear: FullRangeDynamicLinear if full_range else DynamicLinear})
    done = quantized_linear_count(model)
    if done != linears:  # every Linear must have been converted: a partial model would be slow and wrong to report
        raise RuntimeError(f"int8 quantisation converted {done} of {linears} linear layers")
    log.info("int8: %d linear layers quantised dynamically (engine %s, per-channel weights, %d-bit activations)",
             done, engine, 8 if full_range else 7)
    return model


def quantized_linear_count(model: nn.Module) -> int:
    """How many dynamically quantised int8 linear layers `model` holds."""
    return sum(isinstance(m, DynamicLinear) for m in model.modules())
