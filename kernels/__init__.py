"""Kernels layer: Triton kernels, each with its launcher and a plain-torch reference of the same
function. Knows nothing of T5 or Parquet and imports no other layer of the project."""

from .errors import KernelInputError, KernelUnavailableError
from .lm_head import DEFAULT_CHUNK_TOKENS, lm_head_log_softmax_gather
from .log_softmax_gather import log_softmax_gather, log_softmax_gather_reference, triton_available

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "KernelInputError",
    "KernelUnavailableError",
    "lm_head_log_softmax_gather",
    "log_softmax_gather",
    "log_softmax_gather_reference",
    "triton_available",
]
