"""Typed errors of the kernels layer. Kept here (not imported from engine/) because kernels/ sits
below every other layer; the engine can catch these or wrap them in its own errors."""

from __future__ import annotations

__all__ = ["KernelInputError", "KernelUnavailableError"]


class KernelInputError(ValueError):
    """An argument has the wrong shape, dtype, device or value range; the message names it."""


class KernelUnavailableError(RuntimeError):
    """The requested implementation cannot run here (no triton, or a CPU tensor without
    TRITON_INTERPRET=1); the message says what to install or set."""
