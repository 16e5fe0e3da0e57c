"""pytest-benchmark suite for the LM head + log-softmax-gather: the chunked path against the naive
full log_softmax + gather, fp32 and bf16, flan-t5-small's head (D=512, V=32128).

    pytest benchmarks/test_bench_kernels.py                  # timings only; nothing is asserted on them
    pytest benchmarks/test_bench_kernels.py --benchmark-json=out.json

On a CUDA machine the Triton kernel path is added. Peak memory is measured by
`python -m instructrec.bench.log_softmax_gather` (one subprocess per configuration)."""

from __future__ import annotations

import pytest
import torch

from instructrec.bench.log_softmax_gather import D, V, naive
from instructrec.kernels import lm_head_log_softmax_gather

N = 1024
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ["naive", "chunked-torch"] + (["chunked-triton"] if DEVICE == "cuda" else [])


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def inputs(request):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(request.param).to(DEVICE)  # [N, D]
    weight = (torch.randn(V, D, generator=g) * D ** -0.5).to(request.param).to(DEVICE)  # [V, D]
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)  # [N]
    return hidden, weight, targets


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
def test_lm_head_log_softmax_gather(benchmark, inputs, method):
    hidden, weight, targets = inputs
    if method == "naive":
        fn = lambda: naive(hidden, weight, targets)  # noqa: E731
    else:
        use_triton = method == "chunked-triton"
        fn = lambda: lm_head_log_softmax_gather(hidden, weight, targets, use_triton=use_triton)  # noqa: E731

    def call():
        with torch.inference_mode():
            out = fn()
        _sync()
        return out

    benchmark.extra_info.update(tokens=N, dtype=str(hidden.dtype), device=DEVICE)
    out = benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    # The timed function must still compute the right thing: check it against the full reference.
    want = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    tol = 1e-4 if hidden.dtype == torch.float32 else 0.1
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
