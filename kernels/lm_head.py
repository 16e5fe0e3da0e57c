"""lm_head_log_softmax_gather: log_softmax(hidden @ weight.T)[i, targets[i]] without the [N x V] tensor.

Candidate scoring needs one log-probability per decoder token. With V = 32128 the full fp32
log-prob tensor of 2,000 candidates x 25 tokens is 6.4 GB; here the head matmul runs over
`chunk_tokens` rows at a time, so only a [chunk_tokens x V] logits tile exists (it is reused
from chunk to chunk), and each tile is reduced to one number per row before the next.

- CUDA tensors (or use_triton=True): matmul per chunk, then the Triton log_softmax_gather kernel
  reads the tile once (online logsumexp + the target's logit).
- CPU tensors: matmul per chunk, then a gather of the target logits and an fp32 logsumexp
  computed in place on the tile; the log-softmax itself is never written out.

Precision of the logits tile (`logits_dtype`). Every GEMM here accumulates in fp32; what differs
is whether the [rows, V] result is rounded to bf16 before the log-softmax. Rounding a logit z to
bf16 moves it by up to 2^-9 |z|: with logits up to ~20 that is ~0.06 nats on a token's
log-prob (1.6e-2 nats on average for likely targets, measured below).
- CUDA, bf16/fp16 inputs: one bf16 GEMM with an fp32 output (torch.mm(..., out_dtype=float32),
  torch >= 2.8), so the tile is fp32 at no extra GEMM cost (the tile is twice the bytes).
- CPU, bf16 inputs: torch has no bf16 x bf16 -> fp32 GEMM on CPU (mm's out_dtype overload and
  oneDNN's fused linear both refuse it), so the default keeps the bf16 tile; logits_dtype=float32
  runs the GEMM in fp32 on upcast copies instead (exact, since bf16 values are exact in fp32).
  Measured on this project's CPU (AMD EPYC Zen 4, avx512_bf16, 1 thread, shared machine), one
  512-row chunk, V=32128, logits of std ~4 (max ~22), against fp64:
    D    bf16 tile ms  fp32 GEMM ms   bf16 tile |err| mean / max   fp32 GEMM |err| max
    512       131           273         1.6e-2 / 6.4e-2 nats          6.3e-6
    768       180           426         1.9e-2 / 8.6e-2 nats          8.0e-6
  (targets drawn from the softmax; uniform targets: 9.6e-3 / 6.0e-2). So the exact CPU head
  costs 2.1-2.4x its GEMM time: an opt-in, not the default. Also measured and rejected: shifting
  each row by its exact target logit inside the GEMM (an extra input column) fixes likely
  targets only (max error unchanged for unlikely ones); recomputing the 8 largest logits
  exactly cuts the error 25x but torch.topk over the tile costs ~45% of the GEMM.

Tied embeddings: T5 checkpoints with tie_word_embeddings=True scale the decoder output by
d_model ** -0.5 before the head. This function applies no rescale: the caller passes the hidden
states exactly as they enter the head.
"""

from __future__ import annotations

import logging

import torch

from .errors import KernelInputError
from .errors import KernelUnavailableError
from .log_softmax_gather import check_targets_tensor, log_softmax_gather, triton_available

__all__ = ["CPU_CHUNK_TOKENS", "CUDA_CHUNK_TOKENS", "DEFAULT_CHUNK_TOKENS", "default_chunk_tokens",
           "lm_head_log_softmax_gather"]

log = logging.getLogger(__name__)

# Rows per head-matmul chunk, measured on this CPU (2 cores, Xeon with AMX; D=512, V=32128,
# N=2048; `python -m instructrec.bench.log_softmax_gather --sweep --sizes 2048`: chunk sizes
# interleaved, best of 3; the machine was shared with other jobs (load ~12-20), so CPU time, which
# such load disturbs far less than wall time, is the figure that decided):
#   chunk                 64    128    256    512   1024   2048
#   fp32 CPU ms/call   2,316  1,554  1,148  1,067  1,068  1,110
#   bf16 CPU ms/call   1,461    905    641    501    598    610
# Small chunks lose matmul efficiency (the whole weight is streamed once per chunk); past 512 rows
# the [chunk, V] tile (63 MiB fp32; 94 MiB bf16 with its fp32 copy) falls out of the 105 MiB L3
# between the matmul and the reduction. 512 is the best of both dtypes.
CPU_CHUNK_TOKENS = 512
# CUDA (reasoned, not yet timed: no GPU was at hand; `python -m instructrec.bench.log_softmax_gather
# --device cuda --sweep`, part of `make gpu-check`, measures it). Each chunk streams the whole
# [V, D] bf16 weight once for 2 * rows * V * D FLOPs: the GEMM is compute-bound only when rows
# exceed peak FLOP/s over memory bandwidth, ~165 on an H200 (790 TFLOP/s / 4.8 TB/s) and ~300 on
# an H100 PCIe; 1024 rows keeps it there with margin for every Flan-T5 width, and gives the
# kernel 1024 row programs, several per SM. The fp32 tile (1024 x 32128 x 4 B = 126 MiB) is
# written and read once, whatever the chunk, unless it fits the 50 MB L2 (<= ~256 rows), which
# would cost 4x the launches and a weight re-read per 256 rows.
CUDA_CHUNK_TOKENS = 1024
# Kept for callers that import it: the CPU value. New code: default_chunk_tokens(device).
DEFAULT_CHUNK_TOKENS = CPU_CHUNK_TOKENS
_EXP_FLOOR = 80.0  # see _torch_chunk
# torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 a, b: CUDA only, torch >= 2.8.
_MM_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()
_warned_rounded_logits = False


def default_chunk_tokens(device: torch.device | str) -> int:
    """LM-head rows per matmul chunk for `device`: CPU_CHUNK_TOKENS (measured) on CPU,
    CUDA_CHUNK_TOKENS on a GPU. The one definition of the default; the engine asks here."""
    return CUDA_CHUNK_TOKENS if torch.device(device).type == "cuda" else CPU_CHUNK_TOKENS


def lm_head_log_softmax_gather(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    ignore_index: int = -100,
    use_triton: bool | None = None,
    *,
    check_targets: bool = True,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[i] = log_softmax(hidden[i] @ weight.T, fp32)[targets[i]]; 0.0 where targets[i] == ignore_index.

    hidden: [N, D] and weight: [V, D], same dtype (fp32 or bf16; fp16 is accepted but T5 overflows
    in it) and device. targets: [N] int64/int32. chunk_tokens: rows per head matmul (None:
    default_chunk_tokens(hidden.device)); the extra memory is one [chunk_tokens, V] tile, plus an
    fp32 copy when the torch path reduces a bf16 tile (512 x 32128: 63 MiB fp32, 94 MiB bf16).
    logits_dtype: the dtype of that tile (see the module docstring). None: float32 where the GEMM
    can write fp32 from bf16/fp16 inputs for free (CUDA, torch >= 2.8; and fp32 inputs), else the
    input dtype. torch.float32 with bf16 inputs on CPU: an fp32 GEMM on upcast copies (exact,
    2.1-2.4x the bf16 GEMM time on this project's CPU).
    use_triton: None picks the Triton kernel for CUDA tensors and the torch path otherwise; True
    forces the kernel (on CPU only under TRITON_INTERPRET=1), False forces the torch path.
    check_targets: validate the target range (one host sync on CUDA).
    Runs on the inputs' own device (cuda:1 tensors on cuda:1).
    Inference only: no autograd graph is built through the chunks. Returns [N] fp32.
    """
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(hidden.device) if isinstance(hidden, torch.Tensor) else CPU_CHUNK_TOKENS
    _check_head_inputs(hidden, weight, chunk_tokens, logits_dtype)
    N, V = hidden.shape[0], weight.shape[0]
    # Validate targets once for the whole batch, not per chunk (the range check syncs on CUDA).
    check_targets_tensor(targets, N, V, ignore_index, hidden.device, check_targets)
    if use_triton is None:
        use_triton = hidden.is_cuda
    if use_triton and not triton_available(hidden.device):
        raise KernelUnavailableError(
            f"use_triton=True but the Triton kernel cannot run on {hidden.device} tensors here "
            "(needs CUDA, or TRITON_INTERPRET=1 set before importing instructrec.kernels); "
            "pass use_triton=None to pick the torch path on CPU")

    out = torch.empty(N, dtype=torch.float32, device=hidden.device)  # [N]
    if N == 0:
        return out
    tile_dtype, fp32_gemm = _tile_plan(hidden, logits_dtype)
    if fp32_gemm:
        # Upcast once per call, not per chunk: V x D conversions, ~1% of the fp32 GEMMs that follow.
        weight = weight.float()
    chunk = min(chunk_tokens, N)
    # One logits tile reused by every chunk: a fresh [chunk, V] allocation per chunk would be
    # returned to the OS and page-faulted back in each time on CPU.
    tile = torch.empty((chunk, V), dtype=tile_dtype, device=hidden.device)  # [chunk, V]
    tile32 = (torch.empty((chunk, V), dtype=torch.float32, device=hidden.device)
              if tile_dtype != torch.float32 and not use_triton else None)
    with torch.no_grad():
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            rows = stop - start
            h = hidden[start:stop]
            if fp32_gemm:
                logits = torch.mm(h.float(), weight.t(), out=tile[:rows])  # [rows, V]
            elif tile_dtype != hidden.dtype:
                logits = torch.mm(h, weight.t(), out_dtype=tile_dtype, out=tile[:rows])  # [rows, V] fp32
            else:
                logits = torch.mm(h, weight.t(), out=tile[:rows])  # [rows, V]
            if use_triton:
                log_softmax_gather(logits, targets[start:stop], ignore_index,
                                   out=out[start:stop], check_targets=False)
            else:
                _torch_chunk(logits, targets[start:stop], ignore_index, out[start:stop],
                             None if tile32 is None else tile32[:rows])
    return out


def _tile_plan(hidden: torch.Tensor, logits_dtype: torch.dtype | None) -> tuple[torch.dtype, bool]:
    """(dtype of the logits tile, whether the GEMM runs in fp32 on upcast inputs)."""
    global _warned_rounded_logits
    if hidden.dtype == torch.float32:
        return torch.float32, False
    native_fp32_out = hidden.is_cuda and _MM_HAS_OUT_DTYPE
    if logits_dtype is None:
        if native_fp32_out:
            return torch.float32, False
        if hidden.is_cuda and not _warned_rounded_logits:
            _warned_rounded_logits = True
            log.warning("torch %s has no mm(..., out_dtype=float32): LM-head logits are rounded to %s "
                        "before the log-softmax (up to ~0.06 nats per token); torch >= 2.8 keeps them "
                        "in fp32 at no cost, or pass logits_dtype=torch.float32 (an fp32 GEMM)",
                        torch.__version__, hidden.dtype)
        return hidden.dtype, False
    if logits_dtype == hidden.dtype:
        return hidden.dtype, False
    return torch.float32, not native_fp32_out


def _torch_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 out: torch.Tensor, logits32: torch.Tensor | None) -> None:
    """out = z[i, t_i] - logsumexp(z[i]) in fp32, z = logits (upcast into logits32 for bf16);
    0.0 where t_i == ignore_index. Overwrites the tile it works on (it is scratch).

    In place on the [rows, V] tile: gather the targets first, then amax, sub_, exp_, sum. No
    [rows, V] temporary is allocated: torch.logsumexp allocates two (x - max and its exp), and
    on this CPU (1 thread, CPU time, rows=512, V=32128) it took 74 ms against 34 ms in place;
    a fused torch.log_softmax + gather took 63 ms and allocates the whole log-prob tile."""
    if logits32 is not None:
        logits = logits32.copy_(logits)  # [rows, V] fp32
    ignored = targets == ignore_index  # [rows]
    safe = torch.where(ignored, torch.zeros_like(targets), targets).long()
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)  # [rows]
    row_max = logits.amax(dim=1, keepdim=True)  # [rows, 1]
    # A row of all -inf has max -inf; shift by 0 there so exp gives no NaN, and lse = -inf.
    empty_row = torch.isinf(row_max) & (row_max < 0)  # [rows, 1]
    shift = torch.where(empty_row, torch.zeros_like(row_max), row_max)
    # Clamp before exp: a logit more than 80 below its row's max adds under 1.8e-35 to a sum of at
    # least 1, which fp32 cannot see, while exp of values under -87.3 yields denormals that this
    # CPU computes ~12x slower (244 ms against 19 ms for a [512, 32128] tile with 2 threads; random
    # or weakly trained models spread their logits over hundreds of units). Exact in fp32.
    sum_exp = logits.sub_(shift).clamp_(min=-_EXP_FLOOR).exp_().sum(dim=1)  # [rows]
    lse = shift.squeeze(1) + torch.log(sum_exp)  # [rows]
    lse.masked_fill_(empty_row.squeeze(1), float("-inf"))  # the clamp made their sums V * e^-80, not 0
    torch.where(ignored, torch.zeros_like(lse), picked - lse, out=out)


def _check_head_inputs(hidden, weight, chunk_tokens, logits_dtype) -> None:
    problems = []
    if logits_dtype is not None and logits_dtype != torch.float32 and (
            not isinstance(hidden, torch.Tensor) or logits_dtype != hidden.dtype):
        problems.append(f"logits_dtype must be None, torch.float32 or the inputs' dtype, got {logits_dtype!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        problems.append("hidden must be a 2-D tensor [N, D] (flatten leading dims: hidden.reshape(-1, D))")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        problems.append("weight must be a 2-D tensor [V, D] (the LM head's weight, as nn.Linear stores it)")
    if not problems:
        if hidden.shape[1] != weight.shape[1]:
            problems.append(
                f"hidden has D={hidden.shape[1]} but weight is [V={weight.shape[0]}, D={weight.shape[1]}]; "
                "pass the head weight as [V, D], not transposed")
        if hidden.dtype != weight.dtype:
            problems.append(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other")
        if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"hidden dtype must be float32, bfloat16 or float16, got {hidden.dtype}")
        if hidden.device != weight.device:
            problems.append(f"hidden is on {hidden.device} but weight is on {weight.device}")
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            problems.append("inference only: call under torch.inference_mode() or torch.no_grad()")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        problems.append(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if problems:
        raise KernelInputError("; ".join(problems))
