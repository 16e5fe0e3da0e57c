"""lm_head_log_softmax_gather (chunked head matmul + log-softmax-gather) against the plain
full-materialisation reference torch.log_softmax(hidden.float() @ weight.float().T) gathered;
both the torch path and the Triton kernel path (interpreted on CPU, see tests/conftest.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from instructrec.kernels import (
    CPU_CHUNK_TOKENS,
    CUDA_CHUNK_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    KernelInputError,
    default_chunk_tokens,
    lm_head_log_softmax_gather,
    triton_available,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernel = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernel unavailable: install triton and run with CUDA or TRITON_INTERPRET=1")
D = 512
BF16_UNIT_ROUNDOFF = 2.0 ** -8


@functools.lru_cache(maxsize=4)
def _head(V: int) -> torch.Tensor:
    # A head scaled so logits have std ~4 (max ~20 over 32128 classes): logsumexp is well above
    # the max logit and far from log V. One per V: drawing 16M normals per case costs seconds
    # on the shared 2 cores; hidden states and targets stay fresh per case.
    g = torch.Generator().manual_seed(V)
    return torch.randn(V, D, generator=g) * (4 / D ** 0.5)  # [V, D]


def _case(n: int, V: int, dtype: torch.dtype, seed: int):
    """hidden of std 1, the head above, random targets; rows 2 and n-1 are padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g)  # [n, D]
    weight = _head(V)
    targets = torch.randint(0, V, (n,), generator=g)  # [n]
    if n >= 5:
        targets[2] = -100
        targets[n - 1] = -100
    return hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), targets.to(DEVICE)


def _reference(hidden, weight, targets, ignore_index=-100):
    """Full [n, V] fp32 log-probs from the same (possibly bf16) inputs, upcast, then gather."""
    logits = hidden.float() @ weight.float().T  # [n, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    picked = log_probs.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(ignored, torch.zeros_like(picked), picked), logits


def _assert_matches(got, hidden, weight, targets):
    want, logits = _reference(hidden, weight, targets)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    assert not torch.isnan(got).any()
    if hidden.dtype == torch.float32:
        # Same fp32 products; only the matmul's blocking and the summation order differ.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:
        # The head matmul accumulates in fp32 but rounds each logit z to bf16 (|error| <= u|z|,
        # u = 2^-8); a log-prob z_t - logsumexp(z) moves by at most |err(z_t)| + max_j |err(z_j)|
        # <= 2u max|z|, about 0.16 here (max|z| ~ 20), against ~1e-6 for fp32 arithmetic.
        bound = 2 * BF16_UNIT_ROUNDOFF * logits.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=bound)
    assert torch.equal(got[targets == -100], torch.zeros_like(got[targets == -100]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, chunk", [(1, 1), (7, 3), (33, 5), (33, 8), (33, 64), (33, DEFAULT_CHUNK_TOKENS)])
def test_torch_path_matches_reference(n, chunk, dtype):
    hidden, weight, targets = _case(n, 32128, dtype, seed=100 * n + chunk)
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=chunk, use_triton=False)
    _assert_matches(got, hidden, weight, targets)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, V, chunk", [(7, 32128, 3), (33, 1000, 5), (33, 1000, 64), (7, 32100, 7)])
def test_triton_path_matches_reference(n, V, chunk, dtype):
    hidden, weight, targets = _case(n, V, dtype, seed=7 * n + chunk + V)
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=chunk, use_triton=True)
    _assert_matches(got, hidden, weight, targets)


@needs_kernel
def test_triton_and_torch_paths_agree_on_bf16_logits():
    # Both paths reduce the very same bf16 logits tile in fp32, so they agree to fp32 precision
    # even though each is ~0.1 away from the fp32-weights reference.
    hidden, weight, targets = _case(11, 1000, torch.bfloat16, seed=9)
    with torch.inference_mode():
        a = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=4, use_triton=True)
        b = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=4, use_triton=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "triton"])
def test_bf16_inputs_with_fp32_logits_match_fp64(use_triton):
    # logits_dtype=float32: the tile is never rounded to bf16, so the only error left is fp32
    # arithmetic on exact bf16 inputs: ~1e-5 against fp64 where the bf16 tile is off by up to 0.16.
    hidden, weight, targets = _case(33, 32128, torch.bfloat16, seed=21)
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=16, use_triton=use_triton,
                                         logits_dtype=torch.float32)
    logits = hidden.double() @ weight.double().T
    want = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    want = torch.where(targets == -100, torch.zeros_like(want), want)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_default_chunk_is_device_sized_and_used_when_none():
    assert default_chunk_tokens("cpu") == CPU_CHUNK_TOKENS == DEFAULT_CHUNK_TOKENS == 512
    assert default_chunk_tokens(torch.device("cuda", 1)) == CUDA_CHUNK_TOKENS == 1024
    hidden, weight, targets = _case(7, 1000, torch.float32, seed=3)
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=None)
    _assert_matches(got, hidden, weight, targets)


def test_custom_ignore_index_and_empty_input():
    hidden, weight, targets = _case(6, 1000, torch.float32, seed=4)
    targets[targets == -100] = 5
    targets[0] = 999
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=4, ignore_index=999)
        empty = lm_head_log_softmax_gather(hidden[:0], weight, targets[:0])
    want, _ = _reference(hidden, weight, targets, ignore_index=999)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got[0].item() == 0.0
    assert empty.shape == (0,) and empty.dtype == torch.float32


def _bad(**overrides):
    hidden, weight, targets = _case(4, 1000, torch.float32, seed=1)
    args = dict(hidden=hidden, weight=weight, targets=targets)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden=torch.zeros(4, D + 1)), "pass the head weight as"),
    (dict(weight=torch.zeros(D, 1000)), "pass the head weight as"),
    (dict(hidden=torch.zeros(2, 4, D)), "hidden must be a 2-D"),
    (dict(hidden=torch.zeros(4, D, dtype=torch.bfloat16)), "cast one to the other"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), "targets has 5 entries"),
    (dict(targets=torch.tensor([0, 1, 1000, 3])), r"\[0, 1000\)"),
    (dict(targets=torch.tensor([0, -3, 2, 3])), "first: -3"),
    (dict(chunk_tokens=0), "chunk_tokens must be a positive int"),
    (dict(logits_dtype=torch.float16), "logits_dtype must be None, torch.float32"),
])
def test_bad_inputs_raise_typed_errors(overrides, match):
    args = _bad(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()})
    with torch.inference_mode(), pytest.raises(KernelInputError, match=match):
        lm_head_log_softmax_gather(**args)


def test_refuses_to_run_under_autograd():
    args = _bad(weight=torch.zeros(1000, D, device=DEVICE, requires_grad=True))
    with pytest.raises(KernelInputError, match="inference only"):
        lm_head_log_softmax_gather(**args)


def test_torch_path_exact_with_logits_spread_over_hundreds():
    """Logits of random or weakly trained models span hundreds of units: most exp(z - max) fall
    below fp32's normal range. The torch path floors z - max at -80 before exp (for speed); the
    result must still equal the fp64 log-softmax, including targets far below the max."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(40, D, generator=g)  # [40, D]
    weight = _head(4096) * 60  # logits of std ~240
    targets = torch.randint(0, 4096, (40,), generator=g)
    logits = (hidden.double() @ weight.double().T)  # [40, 4096]
    targets[0] = int(logits[0].argmin())  # a target ~1,000 below its row's max
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert (logits.amax(1) - logits.amin(1)).min() > 500  # the regime the floor is for
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden, weight, targets, chunk_tokens=16, use_triton=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=2e-3)
