"""pytest-benchmark suite for the engine's host-side planning (engine/packing.py) at realistic
sizes: rerank-10 batches (64 units of 10 titles), a 2,000-candidate request, the one upload of a
batch that the device loop sends (plan_batch + write_batch), and the padded decoder arrays of one
batch as the exporter builds them. Peers have no packing step (they pad each pair), so the engine
is timed alone here; its share of a request's time shows in `instructrec bench`.

    pytest benchmarks/test_bench_packing.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest

from instructrec.engine.packing import (IGNORE, Unit, decoder_arrays, pack_rows, pack_unit, plan_batch, plan_batches,
                                       write_batch)
from instructrec.engine.runner import CPU_BATCH_TOKENS, DEFAULT_ROW_TOKENS

ROW_TOKENS, BATCH_TOKENS = DEFAULT_ROW_TOKENS, CPU_BATCH_TOKENS  # the engine's CPU defaults (engine/runner.py)


def _units(n_units: int, n_candidates: int, seed: int = 0) -> list[Unit]:
    rng = np.random.default_rng(seed)
    # instruction ~270 tokens (20 titles of history), titles 8-30 tokens: the bench's rerank-10 inputs
    return [Unit(source=rng.integers(2, 32000, size=int(rng.integers(230, 310))),
                 targets=[rng.integers(2, 32000, size=int(rng.integers(8, 30))) for _ in range(n_candidates)],
                 owner=i) for i in range(n_units)]


@pytest.mark.parametrize("n_candidates", [10, 2000])
def test_pack_rows(benchmark, n_candidates):
    lengths = np.random.default_rng(0).integers(8, 30, size=n_candidates)
    rows = benchmark(pack_rows, lengths, ROW_TOKENS)
    assert sorted(c for r in rows for c in r) == list(range(n_candidates))  # every candidate once
    assert all(sum(lengths[c] for c in r) <= ROW_TOKENS for r in rows)


def test_plan_batches_rerank10(benchmark):
    units = [pack_unit(u, ROW_TOKENS) for u in _units(64, 10)]
    batches = benchmark(plan_batches, units, BATCH_TOKENS)
    assert sorted(i for b in batches for i in b) == list(range(64))


def test_decoder_arrays_rerank10_batch(benchmark):
    units = [pack_unit(u, ROW_TOKENS) for u in _units(16, 10)]
    base = list(np.cumsum([0] + [len(u.targets) for u in units])[:-1])
    arrays = benchmark(decoder_arrays, units, base, 0, 0)
    # every real target token is placed exactly once
    assert int((arrays.targets != IGNORE).sum()) == sum(u.n_decoder_tokens for u in units)


@pytest.mark.parametrize("n_units, n_candidates", [(16, 10), (1, 2000)])
def test_batch_upload(benchmark, n_units, n_candidates):
    units = [pack_unit(u, ROW_TOKENS) for u in _units(n_units, n_candidates)]
    base = np.cumsum([0] + [len(u.targets) for u in units])[:-1]

    def upload():
        plan = plan_batch(units, base, BATCH_TOKENS)
        buf = np.empty(plan.size, dtype=np.int64)
        write_batch(buf, units, plan, 0)
        return plan, buf

    plan, buf = benchmark(upload)
    # every real target token is sent exactly once
    assert plan.passes[-1].t1 == sum(u.n_decoder_tokens for u in units)
