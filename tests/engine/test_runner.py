"""The device loop (engine/runner.py) on CPU: the decoder inputs it builds on the device against the
host reference (packing.decoder_arrays), scores unchanged by padding, batching and read windows,
no atomic accumulation anywhere in the loop, the exact-head option, device-sized defaults and the
device check. CUDA-only behaviour (pinned copies, one sync per window, a second GPU) is in
tests/engine/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from instructrec.engine import Reranker, Request
from instructrec.engine.errors import InputError
from instructrec.engine.loading import resolve_device
from instructrec.engine.packing import IGNORE, Unit, decoder_arrays, pack_unit, plan_batch, write_batch
from instructrec.engine.runner import (CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS, DeviceRunner, PassInputs,
                                       default_batch_tokens, default_pad_multiple)
from instructrec.engine.types import EngineStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START, PAD = 0, 0


def _units(seed: int, n_units: int, max_candidates: int, row_tokens: int) -> list[Unit]:
    rng = np.random.default_rng(seed)
    return [pack_unit(Unit(source=rng.integers(2, 500, size=int(rng.integers(3, 40))),
                           targets=[rng.integers(2, 500, size=int(rng.integers(1, 12)))
                                    for _ in range(int(rng.integers(1, max_candidates + 1)))]), row_tokens)
            for _ in range(n_units)]


@pytest.mark.parametrize("batch_tokens, pad_multiple", [(100_000, 1), (60, 1), (100_000, 8), (90, 16)])
def test_device_built_decoder_inputs_equal_the_host_reference(batch_tokens, pad_multiple):
    units = _units(seed=batch_tokens + pad_multiple, n_units=7, max_candidates=9, row_tokens=20)
    slot_base = np.cumsum([0] + [len(u.targets) for u in units])
    batch = plan_batch(units, slot_base[:-1], batch_tokens, pad_multiple)
    upload = np.full(batch.size, 12345, dtype=np.int64)  # garbage where nothing is written
    write_batch(upload, units, batch, PAD)
    data = torch.from_numpy(upload)
    assert batch.T % pad_multiple == 0 and batch.S % pad_multiple == 0
    src = upload[:batch.B * batch.S].reshape(batch.B, batch.S)
    for b, u in enumerate(units):
        assert src[b, :len(u.source)].tolist() == u.source.tolist() and (src[b, len(u.source):] == PAD).all()
    assert upload[batch.lengths_at:batch.targets_at].tolist() == [len(u.source) for u in units]
    assert not (upload == 12345).any()  # every slot of the upload written
    if batch_tokens == 60:
        assert len(batch.passes) > 1  # rows split over several decoder passes
    for p in batch.passes:
        ref = decoder_arrays(units, list(slot_base[:-1]), START, PAD, slice(p.r0, p.r0 + p.rows))
        x = PassInputs.build(data, batch, p, START, PAD)
        T = ref.ids.shape[2]
        ids = x.ids.numpy()
        assert ids.shape == (len(units), p.rows, batch.T)
        np.testing.assert_array_equal(ids[..., :T], ref.ids)
        assert (ids[..., T:] == PAD).all()
        # Targets and output slots of the real tokens, put back at their flat positions.
        targets = np.full(ids.size, IGNORE)
        targets[x.flat.numpy()] = x.targets.numpy()
        np.testing.assert_array_equal(targets.reshape(ids.shape)[..., :T], ref.targets)
        slots = np.full(ids.size, -1)
        slots[x.flat.numpy()] = p.slots[x.candidate.numpy()]
        np.testing.assert_array_equal(slots.reshape(ids.shape)[..., :T], ref.slots)
        # Segments: the same tokens share a segment in each row (the numbers themselves may differ).
        seg = x.segments.numpy()
        assert (seg[..., T:] == -1).all()
        seg = seg[..., :T]
        np.testing.assert_array_equal(seg == -1, ref.segments == -1)
        same = seg[..., :, None] == seg[..., None, :]
        np.testing.assert_array_equal(same, ref.segments[..., :, None] == ref.segments[..., None, :])


@pytest.fixture(scope="module")
def tiny(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32")


def _alone(model, unit: Unit) -> np.ndarray:
    """Reference scores: each candidate decoded alone (no packing, no padding, no batch) and its
    log-probs taken from the full float64 log-softmax."""
    src = torch.as_tensor(unit.source)[None]
    mask = torch.ones_like(src, dtype=torch.bool)
    kv = model.encoder_kv(model.encode(src, mask))
    out = []
    for y in unit.targets:
        y = torch.as_tensor(y)
        ids = torch.cat([torch.tensor([START]), y[:-1]])[None, None]
        h = model.decode(ids, torch.zeros_like(ids), kv, mask)[0, 0]  # [n, D]
        logp = torch.log_softmax(h.double() @ model.lm_weight.double().T, -1)
        out.append(logp.gather(1, y[:, None]).sum().item())
    return np.array(out)


@pytest.mark.parametrize("options", [dict(), dict(pad_multiple=16), dict(batch_tokens=40, row_tokens=12),
                                     dict(read_window=2), dict(batch_tokens=200, read_window=3, row_tokens=12)])
def test_scores_equal_decoding_each_candidate_alone(tiny, options):
    """Whatever the padding, batching (several decoder passes per batch included) and read windows."""
    units = _units(seed=3, n_units=9, max_candidates=8, row_tokens=1)
    runner = DeviceRunner(tiny.backend, **options)
    stats = EngineStats()
    with torch.inference_mode():
        runner.run(units, stats)
        want = [_alone(tiny.backend.model, u) for u in units]
    if options.get("batch_tokens") == 40:
        assert stats.decoder_passes > stats.batches  # some rows decoded in several passes
    for u, w in zip(units, want):
        # Token log-probs of -5 to -40 in fp32: rounding differs with the packing and shapes.
        np.testing.assert_allclose(u.scores, w, rtol=1e-5, atol=1e-4)


def test_read_windows_reach_the_reranker(tiny):
    requests = [Request(instruction=f"The user bought item {i} and item {i + 3}. What next?",
                        candidates=[f"Game {i} {'deluxe ' * (k % 4)}edition {k}" for k in range(3 + i % 9)])
                for i in range(12)]
    one = Reranker(tiny.backend, tiny.tokenizer).rank(requests)
    windowed = Reranker(tiny.backend, tiny.tokenizer, read_window=5)
    many = windowed.rank(requests)
    assert windowed.stats.batches >= 3
    for a, b in zip(one, many):
        assert a.ranked_ids == b.ranked_ids
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


_ATOMIC_ACCUMULATION = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce",
                        "scatter_reduce_", "index_reduce", "index_reduce_", "put_", "put",
                        "embedding_dense_backward", "_unsafe_index_put"}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("index_put", "index_put_", "_index_put_impl_"):
            accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if accumulate:
                name += "(accumulate=True)"
        self.seen.append(name)
        return func(*args, **kwargs)


def test_no_atomic_accumulation_in_the_device_loop(tiny):
    """Ops that sum into a shared element by atomics on CUDA (their order, hence the last bits of a
    score, changes from run to run there; torch lists them as nondeterministic) are not used by the
    loop: scores of a resumed GPU job can only equal an uninterrupted one's without them."""
    units = [pack_unit(Unit(source=np.arange(2, 12 + i), targets=[np.arange(3, 3 + k) for k in range(1, 6)]), 8)
             for i in range(4)]
    with _RecordOps() as ops:
        DeviceRunner(tiny.backend, batch_tokens=40).run(units, EngineStats())
    assert all(u.scores is not None and np.isfinite(u.scores).all() for u in units)
    atomic = sorted({n for n in ops.seen if n in _ATOMIC_ACCUMULATION or "accumulate=True" in n})
    assert not atomic, f"accumulating ops in the device loop: {atomic}"


def test_scores_repeat_bit_for_bit_under_the_same_settings(tiny):
    first, second = _units(seed=4, n_units=6, max_candidates=8, row_tokens=16), _units(4, 6, 8, 16)
    DeviceRunner(tiny.backend, batch_tokens=100, read_window=3).run(first, EngineStats())
    DeviceRunner(tiny.backend, batch_tokens=100, read_window=3).run(second, EngineStats())
    assert all(np.array_equal(a.scores, b.scores) for a, b in zip(first, second))


def test_exact_head_brings_bf16_scores_to_the_fp32_head(tiny_t5_dir):
    bf16 = Reranker.from_pretrained(tiny_t5_dir, dtype="bfloat16")
    exact = Reranker(bf16.backend, bf16.tokenizer, exact_head=True)
    model, tok = bf16.backend.model, bf16.tokenizer
    instruction = "The user bought Tetris and Halo 3. What do they buy next?"
    titles = ["Forza Horizon 4 - Xbox One", "Mario Kart 8 Deluxe", "Logitech G502 Gaming Mouse"]
    default, precise, want = [], [], []
    with torch.inference_mode():
        for title in titles:  # one at a time: the engine decodes it alone, as the reference does
            default.append(bf16.score(instruction, [title])[0])
            precise.append(exact.score(instruction, [title])[0])
            unit = Unit(source=np.array(tok(instruction).input_ids),
                        targets=[np.array(tok(text_target=title).input_ids)])
            want.append(_alone(model, unit)[0])  # the same bf16 hidden states, head in float64
    err_default = np.abs(np.array(default) - want).max()
    err_exact = np.abs(np.array(precise) - want).max()
    # Rounding bf16 logits moves each token's log-prob by ~1e-2 nats; the fp32 head by ~1e-6.
    assert err_exact < 1e-3 < err_default, (err_exact, err_default)


def test_exact_head_needs_a_backend_that_has_one(tiny):
    class FixedHead:  # a backend whose head is a fixed graph, as onnxruntime's is
        cfg, dtype, device = tiny.backend.cfg, torch.float32, torch.device("cpu")

    with pytest.raises(InputError, match="exact_head"):
        DeviceRunner(FixedHead(), exact_head=True)
    with pytest.raises(InputError, match="exact_head"):
        Reranker(tiny.backend, tiny.tokenizer, exact_head="yes")


def test_batch_tokens_default_follows_the_device(tiny):
    assert default_batch_tokens("cpu") == CPU_BATCH_TOKENS == 8192
    assert default_batch_tokens("cuda:1") == CUDA_BATCH_TOKENS > CPU_BATCH_TOKENS
    assert Reranker(tiny.backend, tiny.tokenizer).batch_tokens == CPU_BATCH_TOKENS
    assert Reranker(tiny.backend, tiny.tokenizer, batch_tokens=512).batch_tokens == 512
    assert default_pad_multiple("cpu", torch.bfloat16) == 1
    assert default_pad_multiple("cuda", torch.float32) == 8 and default_pad_multiple("cuda", torch.bfloat16) == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_a_typed_input_error(tiny_t5_dir):
    with pytest.raises(InputError, match="CUDA is not available") as caught:
        Reranker.from_pretrained(tiny_t5_dir, device="cuda:0")
    assert caught.value.field == "device"


def test_a_gpu_number_past_the_machines_count_is_a_typed_input_error(monkeypatch):
    # One GPU, as torch.cuda would report it on a one-GPU machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError, match=r"1 CUDA device \(cuda:0 to cuda:0\)") as caught:
        resolve_device("cuda:1")
    assert caught.value.field == "device"
