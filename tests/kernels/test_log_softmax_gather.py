"""log_softmax_gather (Triton kernel) against its plain-torch reference, and the reference against
float64 arithmetic. On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py); on a CUDA machine the compiled kernel runs on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from instructrec.kernels import (
    AUTOTUNE_CONFIGS,
    KernelInputError,
    log_softmax_gather,
    log_softmax_gather_reference,
    triton_available,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernel = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernel unavailable: install triton and run with CUDA or TRITON_INTERPRET=1")

# Both sides read the same logits (bf16 ones included) and do all arithmetic in fp32, so they
# differ only by fp32 summation order over V <= 32128 terms: ~1e-6 relative in practice.
# The huge row's value is about -1e4, where one fp32 ulp is ~1e-3, hence the relative term.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}


def _poisoned(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)


def _random_case(n: int, V: int, dtype: torch.dtype, seed: int):
    """Logits of std 10 (so logsumexp is far from max and from log V), with: a row whose max
    (+1e4) sits in the last block while its target is in the first, a ramp row whose max grows
    in every block (the running sum is rescaled each step), and ignored rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 10  # [n, V]
    targets = torch.randint(0, V, (n,), generator=g)  # [n]
    if n >= 3:
        logits[1, V - 3] = 1e4
        targets[1] = 2
        logits[2] = torch.linspace(-60.0, 60.0, V)
        targets[2] = V // 3
    if n >= 7:
        targets[5] = -100
        targets[n - 1] = -100
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE)


# The interpreter runs one program after another (~0.15 s per 32128-wide row on 2 loaded
# cores), so 33 rows are paired with V=1000 and V=32128 only; 32100 is covered at 1 and 7 rows.
_SHAPES = [(n, V) for n in (1, 7, 33) for V in (1000, 32100, 32128) if (n, V) != (33, 32100)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, V", _SHAPES)
def test_matches_reference(n, V, dtype):
    logits, targets = _random_case(n, V, dtype, seed=1000 * n + V + (dtype == torch.bfloat16))
    out = _poisoned(n)
    got = log_softmax_gather(logits, targets, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    want = log_softmax_gather_reference(logits, targets)
    assert not torch.isnan(got).any(), "a row was left unwritten"
    torch.testing.assert_close(got, want, **TOL[dtype])
    ignored = targets == -100
    assert torch.equal(got[ignored], torch.zeros_like(got[ignored]))


@needs_kernel
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=[f"block{b}-warps{w}" for b, w in AUTOTUNE_CONFIGS])
@pytest.mark.parametrize("V", [1000, 32128, 40000])
def test_every_autotune_config_matches_reference(config, V):
    # The autotuner may pick any of these on a GPU: each must compute the same function, whether
    # its block is wider than the row (V=1000), reads V=32128 in one or several trips, or needs
    # two trips of the widest block (V=40000). Rows 1 and 2 carry the max-in-last-block and ramp cases.
    logits, targets = _random_case(3, V, torch.bfloat16, seed=V + config[0])
    got = log_softmax_gather(logits, targets, out=_poisoned(3), config=config)
    torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL[torch.bfloat16])


@needs_kernel
@pytest.mark.parametrize("config", [(3000, 8), (4096, 0), (4096, 6)])
def test_forced_config_must_be_powers_of_two(config):
    logits, targets = _random_case(2, 1000, torch.float32, seed=1)
    with pytest.raises(KernelInputError, match="powers of two"):
        log_softmax_gather(logits, targets, config=config)


@needs_kernel
def test_allocates_output_and_custom_ignore_index():
    logits, targets = _random_case(7, 1000, torch.float32, seed=7)
    targets[targets == -100] = 17
    targets[0] = -1
    targets[3] = -1
    got = log_softmax_gather(logits, targets, ignore_index=-1)
    want = log_softmax_gather_reference(logits, targets, ignore_index=-1)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert got[0].item() == 0.0 and got[3].item() == 0.0 and got[1].item() < 0.0


@needs_kernel
def test_strided_and_transposed_logits():
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(9, 1300, generator=g) * 10).to(DEVICE)
    targets = torch.randint(0, 1000, (9,), generator=g).to(DEVICE)
    row_strided = wide[:, 100:1100]  # [9, 1000], row stride 1300
    col_major = wide[:, :1000].t().contiguous().t()  # [9, 1000], stride (1, 9)
    for logits in (row_strided, col_major):
        got = log_softmax_gather(logits, targets, out=_poisoned(9))
        torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL[torch.float32])


@needs_kernel
def test_leading_minus_inf_blocks_and_int32_targets():
    # Masked vocabulary: every logit before the last block is -inf, so the running max stays -inf
    # for several blocks before the first finite value arrives.
    V = 32128
    g = torch.Generator().manual_seed(11)
    logits = torch.full((3, V), float("-inf"))
    logits[:, V - 500:] = torch.randn(3, 500, generator=g) * 10
    targets = torch.tensor([V - 1, V - 250, V - 500], dtype=torch.int32)
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    got = log_softmax_gather(logits, targets, out=_poisoned(3))
    torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL[torch.float32])


@needs_kernel
def test_empty_rows():
    got = log_softmax_gather(torch.zeros(0, 1000, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert got.shape == (0,) and got.dtype == torch.float32


@needs_kernel
def test_unchecked_out_of_range_target_gives_nan_not_a_read():
    logits, _ = _random_case(3, 1000, torch.float32, seed=5)
    targets = torch.tensor([4, 1000, -7], device=DEVICE)
    got = log_softmax_gather(logits, targets, out=_poisoned(3), check_targets=False)
    assert torch.isfinite(got[0]) and torch.isnan(got[1:]).all()


@pytest.mark.parametrize("logits, targets, kwargs, match", [
    (torch.zeros(1000), torch.zeros(1, dtype=torch.long), {}, "logits must be a 2-D"),
    (torch.zeros(4, 1000, dtype=torch.int64), torch.zeros(4, dtype=torch.long), {}, "logits dtype"),
    (torch.zeros(4, 1000), torch.zeros(3, dtype=torch.long), {}, "targets has 3 entries"),
    (torch.zeros(4, 1000), torch.zeros(4, 1, dtype=torch.long), {}, "targets must be a 1-D"),
    (torch.zeros(4, 1000), torch.zeros(4), {}, "targets dtype"),
    (torch.zeros(4, 1000), torch.tensor([0, 1, 1000, 2]), {}, r"\[0, 1000\)"),
    (torch.zeros(4, 1000), torch.tensor([0, -5, 3, 2]), {}, "first: -5"),
    (torch.zeros(4, 1000), torch.zeros(4, dtype=torch.long), {"out": torch.zeros(4, dtype=torch.bfloat16)}, "out must be"),
    (torch.zeros(4, 1000), torch.zeros(4, dtype=torch.long), {"out": torch.zeros(5)}, "out must be"),
])
@needs_kernel
def test_bad_inputs_raise_typed_errors(logits, targets, kwargs, match):
    if "out" in kwargs:
        kwargs = {"out": kwargs["out"].to(DEVICE)}
    with pytest.raises(KernelInputError, match=match):
        log_softmax_gather(logits.to(DEVICE), targets.to(DEVICE), **kwargs)


def test_reference_matches_float64_arithmetic():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 777, generator=g) * 10
    logits[0, 700] = 1e4
    targets = torch.tensor([3, 700, -100, 0, 776])
    got = log_softmax_gather_reference(logits, targets)
    for i in range(5):
        if targets[i] == -100:
            assert got[i].item() == 0.0
            continue
        row = logits[i].double().tolist()
        peak = max(row)
        lse = peak + math.log(sum(math.exp(x - peak) for x in row))
        assert got[i].item() == pytest.approx(row[targets[i]] - lse, rel=1e-5, abs=1e-5)
