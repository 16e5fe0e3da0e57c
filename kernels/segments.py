"""segment_sum: per-candidate sums of token log-probs, the same bits on every run, CUDA included.

The engine scores a candidate by the sum of its tokens' log-probs. `Tensor.index_add_` (and
`scatter_add_`) sum by atomic adds on CUDA, whose order changes from run to run, so the same
request could get scores that differ in the last bits between a run and its resume. Here the
values of each segment are first placed in a dense [num_segments, max_segment_length] table
(zero padded) by a plain indexed write, then each row is summed by one reduction: no atomics,
no floating-point cumsum (torch.cumsum on CUDA floats is itself non-deterministic; see
torch.use_deterministic_algorithms), nothing that depends on thread timing.

Contract: the values of one segment are contiguous in `values` (one run per segment), as the
tokens of one candidate are in a packed decoder row; runs may come in any segment order.
"""

from __future__ import annotations

import torch

from .errors import KernelInputError

__all__ = ["segment_sum"]


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                max_segment_length: int | None = None, *, dtype: torch.dtype = torch.float64,
                check: bool = True) -> torch.Tensor:
    """out[s] = sum of values[i] over the run of i with segment_ids[i] == s; 0 for absent segments.

    values: [N] float. segment_ids: [N] int64/int32 in [0, num_segments), each segment's entries
    contiguous. max_segment_length: the longest run (None: measured, one host sync on CUDA).
    dtype: of the sums (float64 by default: fp32 log-probs add exactly there in practice).
    check: validate ids, run lengths and contiguity (host syncs on CUDA; the engine, which builds
    the ids itself, passes False). On the inputs' device; no host sync when check=False and
    max_segment_length is given. Returns [num_segments] `dtype`.
    """
    _check_shapes(values, segment_ids, num_segments, max_segment_length, dtype)
    device = values.device
    n = values.shape[0]
    if n == 0:
        return torch.zeros(num_segments, dtype=dtype, device=device)
    ids = segment_ids.long()
    position = torch.arange(n, device=device)  # [N]
    run_starts = torch.ones(n, dtype=torch.bool, device=device)
    run_starts[1:] = ids[1:] != ids[:-1]
    # Index of the first entry of each entry's run: a running max of the run-start positions
    # (integer cummax: exact and deterministic).
    first = torch.where(run_starts, position, torch.zeros_like(position)).cummax(0).values  # [N]
    column = position - first  # [N] place inside its run
    if max_segment_length is None:
        max_segment_length = int(column.max()) + 1
    if check:
        _check_runs(ids, run_starts, column, num_segments, max_segment_length)
    table = torch.zeros(num_segments, max_segment_length, dtype=dtype, device=device)
    # Each (segment, column) pair is written once (one run per segment), so this plain indexed
    # write has one writer per cell and no accumulation order to vary.
    table.index_put_((ids, column), values.to(dtype))
    return table.sum(dim=1)


def _check_shapes(values, segment_ids, num_segments, max_segment_length, dtype) -> None:
    problems = []
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
        problems.append("values must be a 1-D floating-point tensor [N]")
    if (not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 1
            or segment_ids.dtype not in (torch.int64, torch.int32)):
        problems.append("segment_ids must be a 1-D int64 or int32 tensor [N]")
    if not problems:
        if segment_ids.shape != values.shape:
            problems.append(f"segment_ids has {segment_ids.shape[0]} entries but values has {values.shape[0]}; "
                            "give one segment id per value")
        if segment_ids.device != values.device:
            problems.append(f"segment_ids is on {segment_ids.device} but values on {values.device}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        problems.append(f"num_segments must be a non-negative int, got {num_segments!r}")
    if max_segment_length is not None and (isinstance(max_segment_length, bool)
                                           or not isinstance(max_segment_length, int) or max_segment_length < 1):
        problems.append(f"max_segment_length must be a positive int or None, got {max_segment_length!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        problems.append(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if problems:
        raise KernelInputError("; ".join(problems))


def _check_runs(ids, run_starts, column, num_segments, max_segment_length) -> None:
    if bool((ids < 0).any()) or bool((ids >= num_segments).any()):
        bad = ids[(ids < 0) | (ids >= num_segments)]
        raise KernelInputError(f"segment_ids must lie in [0, {num_segments}); "
                               f"{bad.numel()} do not (first: {int(bad[0])})")
    longest = int(column.max()) + 1
    if longest > max_segment_length:
        raise KernelInputError(f"a segment has {longest} entries, over max_segment_length={max_segment_length}; "
                               "pass the longest run (or None to measure it)")
    runs = int(run_starts.sum())
    distinct = int(torch.unique(ids).numel())
    if runs != distinct:
        raise KernelInputError(f"segment_ids form {runs} runs for {distinct} segments: each segment's "
                               "values must be contiguous (one run per segment)")
