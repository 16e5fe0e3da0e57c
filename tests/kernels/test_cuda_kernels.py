"""The compiled kernels on a CUDA GPU (`pytest -m gpu`, part of `make gpu-check`): the autotuned
Triton kernel against its reference on odd shapes in fp32/bf16/fp16, every autotune
configuration compiled, fp32 LM-head logits from bf16 inputs, a launch on a second GPU, and
segment_sum under torch's deterministic mode. Elsewhere these are collected and skipped."""

from __future__ import annotations

import pytest
import torch

from instructrec.kernels import (
    AUTOTUNE_CONFIGS,
    lm_head_log_softmax_gather,
    log_softmax_gather,
    log_softmax_gather_reference,
    segment_sum,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make gpu-check` on one)"),
]
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")
CUDA = torch.device("cuda")
# Both sides reduce the same logits in fp32; they differ only by summation order over V terms.
TOL = dict(rtol=1e-5, atol=1e-4)


def _case(n: int, V: int, dtype: torch.dtype, seed: int, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 8  # [n, V]
    targets = torch.randint(0, V, (n,), generator=g)
    if n >= 3:
        logits[1, V - 1] = 60.0  # the max in the last block
        targets[2] = -100
    return logits.to(dtype).to(device), targets.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n, V", [(1, 32128), (7, 32100), (33, 1000), (257, 32128), (13, 4093), (5, 40000)])
def test_compiled_kernel_matches_reference_on_odd_shapes(n, V, dtype):
    logits, targets = _case(n, V, dtype, seed=n * V)
    got = log_softmax_gather(logits, targets)
    torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL)
    if n >= 3:
        assert got[2].item() == 0.0  # the ignored row


@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=[f"block{b}-warps{w}" for b, w in AUTOTUNE_CONFIGS])
def test_every_autotune_config_compiles_and_matches(config):
    logits, targets = _case(64, 32128, torch.bfloat16, seed=config[0] + config[1])
    got = log_softmax_gather(logits, targets, config=config)
    torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL)


def test_lm_head_keeps_bf16_logits_in_fp32_on_cuda():
    # A bf16 tile would be off by up to 2^-8 max|z| (~0.1 here); the fp32-output GEMM is within
    # fp32 arithmetic of the fp64 truth.
    from instructrec.kernels import lm_head

    if not lm_head._MM_HAS_OUT_DTYPE:
        pytest.skip(f"torch {torch.__version__} has no mm(out_dtype=...): needs torch >= 2.8")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 768, generator=g).bfloat16()
    weight = (torch.randn(32128, 768, generator=g) * (4 / 768 ** 0.5)).bfloat16()
    targets = torch.randint(0, 32128, (300,), generator=g)
    logits = hidden.double() @ weight.double().T
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    with torch.inference_mode():
        got = lm_head_log_softmax_gather(hidden.to(CUDA), weight.to(CUDA), targets.to(CUDA), chunk_tokens=128)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-3)


def test_lm_head_on_cuda_matches_the_cpu_path_in_fp32():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(500, 512, generator=g)
    weight = torch.randn(32128, 512, generator=g) * (4 / 512 ** 0.5)
    targets = torch.randint(0, 32128, (500,), generator=g)
    targets[::7] = -100
    with torch.inference_mode():
        cpu = lm_head_log_softmax_gather(hidden, weight, targets)
        gpu = lm_head_log_softmax_gather(hidden.to(CUDA), weight.to(CUDA), targets.to(CUDA))
    # TF32 is off for torch.mm by default, so both are fp32 GEMMs: differences are summation order.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=2e-4)


@two_gpus
def test_kernel_and_head_run_on_the_second_gpu():
    second = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    logits, targets = _case(9, 32128, torch.bfloat16, seed=1, device=second)
    got = log_softmax_gather(logits, targets)
    assert got.device == second and torch.cuda.current_device() == 0
    torch.testing.assert_close(got, log_softmax_gather_reference(logits, targets), **TOL)
    hidden = torch.randn(40, 256, device=second, dtype=torch.bfloat16)
    weight = torch.randn(32128, 256, device=second, dtype=torch.bfloat16) * 0.1
    tgt = torch.randint(0, 32128, (40,), device=second)
    with torch.inference_mode():
        on_second = lm_head_log_softmax_gather(hidden, weight, tgt)
        on_first = lm_head_log_softmax_gather(hidden.to("cuda:0"), weight.to("cuda:0"), tgt.to("cuda:0"))
    assert on_second.device == second
    torch.testing.assert_close(on_second.cpu(), on_first.cpu(), rtol=0, atol=1e-5)


def test_segment_sum_is_deterministic_on_cuda():
    # torch's deterministic mode raises on any op without a deterministic CUDA implementation
    # (a floating-point cumsum, for one); segment_sum must run under it and repeat bit for bit.
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (5000,), generator=g)
    ids = torch.repeat_interleave(torch.randperm(5000, generator=g), lengths).to(CUDA)
    values = (torch.randn(ids.numel(), generator=g) * 5 - 3).to(CUDA)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [segment_sum(values, ids, 5000, 40, check=False) for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0].cpu(), segment_sum(values.cpu(), ids.cpu(), 5000, 40), rtol=1e-12, atol=1e-9)
