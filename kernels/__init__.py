"""Kernels layer: Triton kernels, each with its launcher and a plain-torch reference of the same
function, and the small device helpers the engine's hot loop calls. Knows nothing of T5 or
Parquet and imports no other layer of the project."""

from .errors import KernelInputError, KernelUnavailableError
from .lm_head import (
    CPU_CHUNK_TOKENS,
    CUDA_CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    default_chunk_tokens,
    lm_head_log_softmax_gather,
)
from .log_softmax_gather import (
    AUTOTUNE_CONFIGS,
    log_softmax_gather,
    log_softmax_gather_reference,
    triton_available,
)
from .segments import segment_sum

__all__ = [
    "AUTOTUNE_CONFIGS",
    "CPU_CHUNK_TOKENS",
    "CUDA_CHUNK_TOKENS",
    "DEFAULT_CHUNK_TOKENS",
    "KernelInputError",
    "KernelUnavailableError",
    "default_chunk_tokens",
    "lm_head_log_softmax_gather",
    "log_softmax_gather",
    "log_softmax_gather_reference",
    "segment_sum",
    "triton_available",
]
