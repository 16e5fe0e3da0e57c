"""Host-side packing and batching (engine/packing.py), checked by hand on small cases, and the
block-diagonal decoder against decoding each candidate alone through the same model."""

from __future__ import annotations

import numpy as np
import torch

from instructrec.engine.model import T5, T5Config
from instructrec.engine.packing import IGNORE, Unit, decoder_arrays, pack_rows, pack_unit, plan_batches
from instructrec.engine.presets import shape_config


def test_pack_rows_fills_rows_longest_first():
    rows = pack_rows([3, 5, 2, 4, 9], row_tokens=8)
    # Longest first, next fit: 9 alone (over the cap); 5, and 4 does not fit beside it; 4+3; 2.
    assert rows == [[4], [1], [3, 0], [2]]
    assert sorted(c for r in rows for c in r) == [0, 1, 2, 3, 4]


def test_pack_rows_respects_the_cap_and_keeps_every_candidate_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=500)
    rows = pack_rows(lengths, row_tokens=128)
    assert sorted(c for r in rows for c in r) == list(range(500))
    assert all(sum(lengths[c] for c in r) <= 128 for r in rows)
    # Next-fit decreasing wastes less than one candidate per row: rows are at least 128-40 full.
    assert sum(sum(lengths[c] for c in r) < 88 for r in rows[:-1]) == 0


def test_decoder_arrays_layout_by_hand():
    u = Unit(source=np.array([5, 1]), targets=[np.array([7, 8, 1]), np.array([9, 1])])
    pack_unit(u, row_tokens=16)
    a = decoder_arrays([u], [10], start_id=0, pad_id=0)
    assert u.rows == [[0, 1]] and a.ids.shape == (1, 1, 5)
    # Candidate 0: inputs [start, 7, 8] -> targets [7, 8, </s>]; candidate 1: [start, 9] -> [9, </s>].
    assert a.ids[0, 0].tolist() == [0, 7, 8, 0, 9]
    assert a.targets[0, 0].tolist() == [7, 8, 1, 9, 1]
    assert a.segments[0, 0].tolist() == [0, 0, 0, 1, 1]
    assert a.slots[0, 0].tolist() == [10, 10, 10, 11, 11]


def test_decoder_arrays_pad_short_units():
    long = pack_unit(Unit(source=np.array([1]), targets=[np.array([4, 4, 4, 1])]), 16)
    short = pack_unit(Unit(source=np.array([1]), targets=[np.array([6, 1])]), 16)
    a = decoder_arrays([long, short], [0, 1], start_id=0, pad_id=0)
    assert a.targets[1, 0].tolist() == [6, 1, IGNORE, IGNORE]
    assert a.segments[1, 0].tolist() == [0, 0, -1, -1] and a.slots[1, 0, 2:].tolist() == [-1, -1]


def test_plan_batches_keeps_to_the_budget():
    rng = np.random.default_rng(1)
    units = [pack_unit(Unit(source=np.ones(int(rng.integers(5, 60))),
                            targets=[np.ones(int(n)) for n in rng.integers(2, 20, size=int(rng.integers(1, 12)))]), 64)
             for _ in range(80)]
    batches = plan_batches(units, batch_tokens=512)
    assert sorted(i for b in batches for i in b) == list(range(80))
    for b in batches:
        us = [units[i] for i in b]
        if len(us) > 1:
            assert len(us) * max(len(u.source) for u in us) <= 512
            assert len(us) * max(len(u.rows) for u in us) * max(u.row_len for u in us) <= 512


def test_block_diagonal_rows_equal_decoding_each_candidate_alone():
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = T5(T5Config.from_hf(shape_config("t5-tiny"))).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    src = torch.randint(2, 500, (1, 12))
    mask = torch.ones_like(src, dtype=torch.bool)
    cands = [torch.randint(2, 500, (n,)) for n in (5, 1, 9, 3)]
    ids = torch.cat([torch.cat([torch.zeros(1, dtype=torch.long), c[:-1]]) for c in cands])  # [18]
    seg = torch.cat([torch.full((len(c),), k) for k, c in enumerate(cands)])
    with torch.no_grad():
        kv = model.encoder_kv(model.encode(src, mask))
        packed = model.decode(ids[None, None], seg[None, None], kv, mask)[0, 0]  # [18, D]
        pos = 0
        for c in cands:
            x = torch.cat([torch.zeros(1, dtype=torch.long), c[:-1]])
            alone = model.decode(x[None, None], torch.zeros_like(x)[None, None], kv, mask)[0, 0]
            torch.testing.assert_close(packed[pos:pos + len(c)], alone, atol=1e-5, rtol=1e-5)
            pos += len(c)
