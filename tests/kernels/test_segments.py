"""segment_sum (deterministic per-segment sums) against independent references: math.fsum of each
segment's values (exact) and a plain Python loop; repeated calls give the same bits; the layout
contract (one contiguous run per segment) is checked with typed errors."""

from __future__ import annotations

import math

import pytest
import torch

from instructrec.kernels import KernelInputError, segment_sum

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _engine_like(n_segments: int, seed: int, present: float = 0.8):
    """Token log-probs of candidates as a decoder pass lays them out: each present candidate's
    tokens contiguous (1-40 of them), candidates in a shuffled order, some candidates absent
    (scored in another pass). Values are fp32 log-probs in [-20, -0.01]."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_segments, generator=g)
    keep = order[torch.rand(n_segments, generator=g) < present]
    lengths = torch.randint(1, 41, (keep.numel(),), generator=g)
    ids = torch.repeat_interleave(keep, lengths)  # [N]
    values = -(torch.rand(ids.numel(), generator=g) * 19.99 + 0.01)  # [N] fp32
    return values, ids, int(lengths.max()) if lengths.numel() else 1


def _fsum_reference(values: torch.Tensor, ids: torch.Tensor, n_segments: int) -> list[float]:
    groups: dict[int, list[float]] = {}
    for v, s in zip(values.tolist(), ids.tolist()):
        groups.setdefault(s, []).append(v)
    return [math.fsum(groups.get(s, [])) for s in range(n_segments)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_exact_sum_of_each_segment(seed):
    # fp32 values in [-20, -0.01] share a 2^-30 grid and a segment's sum stays under 2^10, so every
    # partial sum in fp64 is exact whatever the order: the result must equal fsum bit for bit.
    values, ids, longest = _engine_like(500, seed)
    got = segment_sum(values.to(DEVICE), ids.to(DEVICE), 500, longest)
    assert got.dtype == torch.float64 and got.shape == (500,)
    assert got.cpu().tolist() == _fsum_reference(values, ids, 500)


def test_general_values_match_a_python_loop_and_repeat_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    values, ids, _ = _engine_like(300, 5)
    values = values * torch.exp(torch.randn(values.shape, generator=g) * 8)  # magnitudes over ~20 binades
    want = torch.zeros(300, dtype=torch.float64)
    for v, s in zip(values.double().tolist(), ids.tolist()):
        want[s] += v
    runs = [segment_sum(values.to(DEVICE), ids.to(DEVICE), 300).cpu() for _ in range(3)]
    torch.testing.assert_close(runs[0], want, rtol=1e-12, atol=0)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_absent_segments_empty_input_int32_ids_and_fp32_sums():
    values = torch.tensor([1.5, 2.25, -4.0, 8.0, 0.5])
    ids = torch.tensor([3, 3, 0, 0, 5], dtype=torch.int32)
    got = segment_sum(values.to(DEVICE), ids.to(DEVICE), 7, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert got.cpu().tolist() == [4.0, 0.0, 0.0, 3.75, 0.0, 0.5, 0.0]
    empty = segment_sum(values[:0].to(DEVICE), ids[:0].to(DEVICE), 4)
    assert empty.cpu().tolist() == [0.0] * 4


@pytest.mark.parametrize("ids, kwargs, match", [
    ([0, 1, 0], {}, "one run per segment"),
    ([0, 0, 4], {}, r"\[0, 4\)"),
    ([0, -1, -1], {}, "first: -1"),
    ([2, 2, 2], {"max_segment_length": 2}, "over max_segment_length=2"),
    ([0, 1], {}, "give one segment id per value"),
    ([0, 1, 2], {"max_segment_length": 0}, "max_segment_length must be"),
])
def test_broken_layouts_raise_typed_errors(ids, kwargs, match):
    values = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    with pytest.raises(KernelInputError, match=match):
        segment_sum(values, torch.tensor(ids, device=DEVICE), 4, **kwargs)


def test_wrong_types_raise_typed_errors():
    with pytest.raises(KernelInputError, match="segment_ids must be a 1-D int64 or int32"):
        segment_sum(torch.ones(3), torch.ones(3), 2)
    with pytest.raises(KernelInputError, match="values must be a 1-D floating-point"):
        segment_sum(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(KernelInputError, match="dtype must be a floating-point"):
        segment_sum(torch.ones(3), torch.zeros(3, dtype=torch.long), 2, dtype=torch.int64)
