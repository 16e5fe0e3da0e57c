"""log_softmax_gather: out[i] = log_softmax(logits[i, :])[targets[i]], one number per row.

Scoring a candidate title needs only the log-probability of each of its tokens, never the whole
[tokens x V] log-prob tensor. The Triton kernel reads each row of logits once in blocks of BLOCK_V,
keeps an online logsumexp (running max and a running sum rescaled whenever the max grows), then
reads the target's logit: out = logit[target] - logsumexp(logit). All arithmetic is fp32 whatever
the logits' dtype. Rows whose target equals `ignore_index` (padding) get 0.0 and are not read.

`log_softmax_gather_reference` is the same function in plain torch (fp32 log_softmax + gather),
written independently of the kernel; the tests compare the two.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from .errors import KernelInputError, KernelUnavailableError

__all__ = ["AUTOTUNE_CONFIGS", "log_softmax_gather", "log_softmax_gather_reference", "triton_available"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)

# Triton is an optional dependency (extras `gpu` / `dev`): the CPU torch path of the LM head must
# import and run without it, so the kernel is only defined when triton is installed.
_HAS_TRITON = importlib.util.find_spec("triton") is not None

if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _log_softmax_gather_kernel(
        logits_ptr,  # [N, V], last dim contiguous, any dtype in _FLOAT_DTYPES
        logits_row_stride,
        targets_ptr,  # [N] int32/int64, contiguous
        out_ptr,  # [N] fp32, contiguous
        V,
        ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row).to(tl.int64)
        if target == ignore_index:
            # Padding row: nothing to read; 0.0 so that summing a padded row is harmless.
            tl.store(out_ptr + row, 0.0)
        elif (target < 0) | (target >= V):
            # The launcher rejects these unless the caller disabled the check; never read out of
            # bounds, and make the bad row visible instead of returning a plausible number.
            tl.store(out_ptr + row, float("nan"))
        else:
            row_ptr = logits_ptr + row * logits_row_stride
            cols = tl.arange(0, BLOCK_V)
            # fp32 scalars (Triton float literals are fp32), carried through the loop.
            running_max = float("-inf")
            running_sum = 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, axis=0))
                # While every logit seen so far is -inf the shift would be -inf - -inf = NaN;
                # shifting by 0 instead gives exp(-inf) = 0, the right contribution.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
                running_max = new_max
            logsumexp = running_max + tl.log(running_sum)
            target_logit = tl.load(row_ptr + target).to(tl.float32)
            tl.store(out_ptr + row, target_logit - logsumexp)

    # (BLOCK_V, num_warps) the autotuner times on CUDA, once per process for each V (and, as Triton
    # adds them to the key, each logits / targets dtype). One program streams one row: with
    # V = 32128 a single 32,768 block reads the row in one trip (32 fp32 values per thread at 32
    # warps, 64 at 16), which is the usual best for row-wise reductions of this width; 4096 x 8
    # warps (8 trips, the value used before tuning) and the sizes between are the alternatives.
    # Not timed on a GPU yet (none was at hand): the autotuner picks, and
    # `python -m instructrec.bench.log_softmax_gather --device cuda` reports the result.
    AUTOTUNE_CONFIGS = ((4096, 8), (8192, 16), (16384, 16), (32768, 16), (32768, 32))

    def _configs_for_v(configs, named_args, **kwargs):
        """Blocks wider than the row add only masked lanes: cap each at next_power_of_2(V) and
        drop the duplicates, so a small vocabulary times 1-3 configs instead of 5."""
        cap = triton.next_power_of_2(int(named_args["V"]))
        unique: dict = {}
        for config in configs:
            block = min(int(config.kwargs["BLOCK_V"]), cap)
            unique.setdefault((block, config.num_warps),
                              triton.Config({"BLOCK_V": block}, num_warps=config.num_warps))
        return list(unique.values())

    _autotuned_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in AUTOTUNE_CONFIGS],
        key=["V"],
        prune_configs_by={"early_config_prune": _configs_for_v},
    )(_log_softmax_gather_kernel)

    def _kernel_is_interpreted() -> bool:
        # triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set at import time.
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_log_softmax_gather_kernel, InterpretedFunction)
else:
    AUTOTUNE_CONFIGS = ()


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of `device` in this process: a CUDA device
    with triton installed, or any device under the Triton interpreter (TRITON_INTERPRET=1 set
    before this module was imported)."""
    if not _HAS_TRITON:
        return False
    return torch.device(device).type == "cuda" or _kernel_is_interpreted()


# The interpreter runs programs one after another in numpy, so the fewer (wider) blocks per row
# the faster: one block of the whole row, at most 32,768 wide (a V=32128 row in one trip).
_INTERPRETER_MAX_BLOCK_V = 32768


def _launch(logits: torch.Tensor, targets: torch.Tensor, out: torch.Tensor, V: int, ignore_index: int,
            config: tuple[int, int] | None = None) -> None:
    """Run the kernel over every row. CUDA: the autotuned configuration for V (or `config`,
    (BLOCK_V, num_warps), to force one), launched on the tensors' own GPU: Triton launches on the
    current device, so without the guard a tensor on cuda:1 would be read by a kernel on cuda:0.
    Interpreter: one block per row unless `config` says otherwise (no timing: it measures nothing)."""
    grid = (logits.shape[0],)
    args = (logits, logits.stride(0), targets, out, V, ignore_index)
    guard = torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if config is not None:
            block_v, num_warps = config
            _log_softmax_gather_kernel[grid](*args, BLOCK_V=block_v, num_warps=num_warps)
        elif _kernel_is_interpreted():
            block_v = min(_INTERPRETER_MAX_BLOCK_V, triton.next_power_of_2(V))
            _log_softmax_gather_kernel[grid](*args, BLOCK_V=block_v)
        else:
            _autotuned_kernel[grid](*args)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 check_targets: bool = True) -> None:
    """Typed errors for everything the kernel cannot handle."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise KernelInputError(
            f"logits must be a 2-D tensor [N, V], got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}; "
            "flatten leading dims with logits.reshape(-1, V)")
    if logits.dtype not in _FLOAT_DTYPES:
        raise KernelInputError(
            f"logits dtype must be one of {_FLOAT_DTYPES}, got {logits.dtype}")
    check_targets_tensor(targets, logits.shape[0], logits.shape[1], ignore_index, logits.device, check_targets)


def check_targets_tensor(targets: torch.Tensor, n_rows: int, V: int, ignore_index: int,
                         device: torch.device, check_range: bool) -> None:
    """Typed errors for targets that do not fit [n_rows] rows of V classes; shared with the
    LM-head launcher, which validates once per call rather than once per chunk."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        raise KernelInputError(
            f"targets must be a 1-D tensor [N], got "
            f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.shape[0] != n_rows:
        raise KernelInputError(
            f"targets has {targets.shape[0]} entries but there are {n_rows} rows; "
            "pass one target id per row")
    if targets.dtype not in _INDEX_DTYPES:
        raise KernelInputError(f"targets dtype must be int64 or int32, got {targets.dtype}")
    if targets.device != device:
        raise KernelInputError(
            f"targets is on {targets.device} but the rows are on {device}; move them to one device")
    if V < 1:
        raise KernelInputError("the vocabulary dimension V must be at least 1")
    if check_range and n_rows > 0:
        # One host sync (on CUDA); callers that build targets themselves pass check_targets=False.
        real = targets[targets != ignore_index]
        if real.numel() and (bool((real < 0).any()) or bool((real >= V).any())):
            bad = real[(real < 0) | (real >= V)]
            raise KernelInputError(
                f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                f"{bad.numel()} do not (first: {int(bad[0])})")


def log_softmax_gather(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    out: torch.Tensor | None = None,
    check_targets: bool = True,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """log_softmax(logits.float(), -1)[i, targets[i]] for every row i, by the Triton kernel.

    logits: [N, V] fp32/bf16/fp16 on CUDA (or any device under TRITON_INTERPRET=1); the last dim
    must be contiguous or it is copied. targets: [N] int64/int32; rows equal to `ignore_index`
    give 0.0. out: optional [N] fp32 buffer to write into (e.g. a slice of a larger result).
    check_targets: validate the target range (one host sync on CUDA); out-of-range targets that
    slip through with check_targets=False give NaN, never an out-of-bounds read.
    config: (BLOCK_V, num_warps) to force one launch configuration (tests and benchmarks; BLOCK_V
    a power of two); None: the autotuned one on CUDA, one block per row in the interpreter.
    The kernel runs on the logits' own device (cuda:1 tensors launch on cuda:1). Returns [N] fp32.
    """
    if not _HAS_TRITON:
        raise KernelUnavailableError(
            "log_softmax_gather needs triton: pip install 'instructrec[gpu]' (or use "
            "log_softmax_gather_reference / the torch path of lm_head_log_softmax_gather)")
    _check_inputs(logits, targets, ignore_index, check_targets)
    if not triton_available(logits.device):
        raise KernelUnavailableError(
            f"the Triton kernel cannot run on {logits.device} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing instructrec.kernels to run it in the interpreter")
    N, V = logits.shape
    if config is not None:
        block_v, num_warps = config
        if block_v < 1 or block_v & (block_v - 1) or num_warps < 1 or num_warps & (num_warps - 1):
            raise KernelInputError(f"config must be (BLOCK_V, num_warps), both powers of two, got {config!r}")
    if out is None:
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
    elif (out.shape != (N,) or out.dtype != torch.float32 or out.device != logits.device
          or not out.is_contiguous()):
        raise KernelInputError(
            f"out must be a contiguous [{N}] float32 tensor on {logits.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if N == 0:
        return out
    if logits.stride(1) != 1:
        # The kernel reads a row as one contiguous run; any row stride is fine.
        logits = logits.contiguous()
    targets = targets.contiguous()
    _launch(logits, targets, out, V, ignore_index, config)
    return out


def log_softmax_gather_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Plain torch: fp32 log_softmax over the last dim, gather the target, 0.0 at ignored rows.
    Materialises the full [N, V] fp32 log-probs: a reference, not a fast path. Returns [N] fp32."""
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [N, V]
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, torch.zeros_like(targets), targets).long()
    picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [N]
    return torch.where(ignored, torch.zeros_like(picked), picked)
