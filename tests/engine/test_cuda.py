"""The engine on a CUDA GPU (`pytest -m gpu`, part of `make gpu-check`), against the CPU fp32
engine as reference: fp32 and bf16 scores within per-dtype tolerances, bf16 top-1 agreement on
200 requests, repeatable scores, the device loop's pinned staging and one wait per read window,
torch's deterministic mode, a resumed GPU job equal to an uninterrupted one, a second GPU, and the
onnx backend on onnxruntime's CUDA provider. Elsewhere these are collected and skipped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from instructrec.engine import Request, Reranker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make gpu-check` on one)"),
]
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")

_WORDS = ("red blue green space racer quest legend kart puzzle tower dragon night street rally pro mouse "
          "wheel soccer tennis galaxy fleet command island maze").split()


def _requests(n: int, seed: int = 0) -> list[Request]:
    """n requests of 10 distinct 2-4 word titles each (random-weight models give their scores a
    spread of tens of nats, so top-1 is decided by margins far above bf16 noise: median top-1
    gap ~9 nats on the tiny model, measured on CPU)."""
    rng = np.random.default_rng(seed)

    def title() -> str:
        return " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 5)), replace=False)).title()

    out = []
    for i in range(n):
        titles: list[str] = []
        while len(titles) < 10:
            t = title()
            if t not in titles:
                titles.append(t)
        out.append(Request(instruction=f"The user bought {title()} and {title()}. What do they buy next?",
                           candidates=titles, request_id=str(i)))
    return out


def _scores(results) -> list[np.ndarray]:
    """Scores in candidate order (results list them best first)."""
    out = []
    for r in results:
        s = np.empty(len(r.ranked_ids))
        s[np.array(r.ranked_ids, dtype=np.int64)] = r.scores
        out.append(s)
    return out


@pytest.fixture(scope="module")
def cpu_fp32(tiny_t5_dir):
    return _scores(Reranker.from_pretrained(tiny_t5_dir, device="cpu", dtype="float32").rank(_requests(200)))


def test_cuda_fp32_scores_match_the_cpu_engine(tiny_t5_dir, cpu_fp32):
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="float32")
    got = _scores(rr.rank(_requests(200)))
    # fp32 on both (torch keeps TF32 off for matmuls by default): summation order only. Scores
    # are sums of ~10 token log-probs of -5 to -40 each.
    for g, w in zip(got, cpu_fp32):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-3)


def test_cuda_bf16_agrees_with_cpu_fp32_on_200_requests(tiny_t5_dir, cpu_fp32):
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="bfloat16")
    got = _scores(rr.rank(_requests(200)))
    # bf16 weights and activations (unit roundoff 2^-8) move a score by about 1% of its size (CPU
    # bf16 against fp32 here: median 0.13, max 0.88 nats on scores of -66 to -300).
    for g, w in zip(got, cpu_fp32):
        np.testing.assert_allclose(g, w, rtol=0.02, atol=0.05)
    agreement = np.mean([int(np.argmax(g)) == int(np.argmax(w)) for g, w in zip(got, cpu_fp32)])
    assert agreement >= 0.99, f"top-1 agreement bf16 (cuda) vs fp32 (cpu): {agreement:.3f}"


def test_cuda_scores_repeat_bit_for_bit(tiny_t5_dir):
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="bfloat16")
    requests = _requests(60, seed=1)
    first, second = _scores(rr.rank(requests)), _scores(rr.rank(requests))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_small_batches_and_windows_on_cuda_match_one_big_batch(tiny_t5_dir):
    """Many batches and read windows in flight: the pinned staging buffers are refilled while
    earlier copies and batches are still queued, and window sums are read one window late; a
    buffer reused too early would change scores far beyond fp32 rounding."""
    requests = _requests(60, seed=5)
    big = _scores(Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="float32").rank(requests))
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="float32", batch_tokens=512, read_window=7)
    small = _scores(rr.rank(requests))
    assert rr.stats.batches >= 20
    for a, b in zip(small, big):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-3)


def test_device_loop_waits_for_the_gpu_once_per_window(tiny_t5_dir):
    """torch's sync debug mode raises on every synchronising call (.cpu(), .item(), a blocking copy,
    a repeat_interleave without output_size, ...). The loop's only wait is an event per read window
    (and per staging buffer), which that mode does not count."""
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="bfloat16", read_window=8)
    requests = _requests(40, seed=6)
    warm = _scores(rr.rank(requests))  # Triton autotuning (which synchronises) happens here
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = _scores(rr.rank(requests))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(np.array_equal(a, b) for a, b in zip(again, warm))


def test_engine_runs_under_torch_deterministic_algorithms(tiny_t5_dir, monkeypatch):
    """No op in the scoring path lacks a deterministic CUDA implementation (torch raises if one does)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for determinism
    requests = _requests(20, seed=7)
    rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="bfloat16")
    free = _scores(rr.rank(requests))
    torch.use_deterministic_algorithms(True)
    try:
        strict = _scores(rr.rank(requests))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(strict, free):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=0.05)


def test_a_gpu_number_past_the_count_is_a_typed_error(tiny_t5_dir):
    from instructrec.engine.errors import InputError

    with pytest.raises(InputError, match="CUDA device"):
        Reranker.from_pretrained(tiny_t5_dir, device=f"cuda:{torch.cuda.device_count()}")


@two_gpus
def test_reranker_on_the_second_gpu(tiny_t5_dir):
    torch.cuda.set_device(0)
    requests = _requests(20, seed=2)
    on_first = _scores(Reranker.from_pretrained(tiny_t5_dir, device="cuda:0", dtype="bfloat16").rank(requests))
    second = Reranker.from_pretrained(tiny_t5_dir, device="cuda:1", dtype="bfloat16")
    assert all(p.device == torch.device("cuda", 1) for p in second.backend.model.parameters())
    on_second = _scores(second.rank(requests))
    assert torch.cuda.current_device() == 0
    for a, b in zip(on_second, on_first):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)


ROWS, ROWS_PER_PART, CHUNK_ROWS = 48, 12, 4


def _rerank(model: Path, input_path: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "instructrec", "rerank", "--model", str(model), "--input", str(input_path),
         "--output", str(output), "--device", "cuda", "--dtype", "bfloat16", "--rows-per-part",
         str(ROWS_PER_PART), "--chunk-rows", str(CHUNK_ROWS), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resumed_gpu_job_equals_an_uninterrupted_one(tiny_t5_dir, tmp_path):
    from instructrec.engine.batch import run_job

    input_path = tmp_path / "requests.parquet"
    requests = _requests(ROWS, seed=3)
    pq.write_table(pa.table({"request_id": [r.request_id for r in requests],
                             "candidates": [list(r.candidates) for r in requests],
                             "instruction": [r.instruction for r in requests]}), input_path, row_group_size=7)
    reference = tmp_path / "reference"
    run_job(tiny_t5_dir, input_path, reference, device="cuda", dtype="bfloat16", rows_per_part=ROWS_PER_PART,
            chunk_rows=CHUNK_ROWS, progress=False)

    output = tmp_path / "out"
    first = _rerank(tiny_t5_dir, input_path, output)
    deadline = time.monotonic() + 300
    while not (output / "part-00000.parquet").exists():
        assert first.poll() is None, f"the job ended before the kill point:\n{first.stderr.read()}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = _rerank(tiny_t5_dir, input_path, output, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    for index in range(ROWS // ROWS_PER_PART):
        name = f"part-{index:05d}.parquet"
        assert pq.read_table(output / name).equals(pq.read_table(reference / name)), name  # bit for bit


def test_onnx_backend_on_cuda_matches_torch_on_cuda(tiny_t5_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install 'instructrec[gpu]')")
    from instructrec.export import export_model

    export_model(tiny_t5_dir, tmp_path / "onnx")
    requests = _requests(30, seed=4)
    onnx = _scores(Reranker.from_pretrained(tmp_path / "onnx", backend="onnx", device="cuda").rank(requests))
    eager = _scores(Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="float32").rank(requests))
    for a, b in zip(onnx, eager):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-3)
