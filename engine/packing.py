"""Host-side planning: candidates packed into decoder rows, units batched by a token budget, and
the padded index arrays of one batch. Pure numpy, no model: the tests check it directly.

A *unit* is one instruction encoding and the candidates scored under it (a whole request, or one
tournament group). A candidate with target ids [y_1 .. y_n] (closing </s> included) contributes
decoder inputs [start, y_1 .. y_{n-1}] and targets [y_1 .. y_n] to a row; rows hold several
candidates up to `row_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Unit", "pack_rows", "plan_batches", "DecoderArrays", "decoder_arrays", "IGNORE"]

IGNORE = -100  # target id of padding slots (the LM-head kernel's ignore_index)


@dataclass
class Unit:
    source: np.ndarray  # [S] int64 instruction token ids (closing </s> included)
    targets: list[np.ndarray]  # per candidate: [n_c] int64 target ids (closing </s> included)
    owner: int = -1  # index of the request it belongs to
    tag: object = None  # the caller's bookkeeping (e.g. the tournament group)
    rows: list[list[int]] = field(default_factory=list)  # candidate numbers per row, set by pack
    row_len: int = 0  # longest row, in tokens
    scores: np.ndarray | None = None  # [n_candidates] float64 sums of token log-probs, once run

    @property
    def n_decoder_tokens(self) -> int:
        return int(sum(len(t) for t in self.targets))


def pack_rows(lengths: list[int] | np.ndarray, row_tokens: int) -> list[list[int]]:
    """Candidate numbers per row: longest first, each row filled until the next candidate does
    not fit (next-fit decreasing). Titles have similar lengths, so this wastes little and stays
    O(K log K) for 2,000 candidates. A candidate longer than row_tokens gets a row of its own."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    rows: list[list[int]] = []
    used = row_tokens + 1
    for c in order.tolist():
        n = int(lengths[c])
        if used + n > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(c)
        used += n
    return rows


def pack_unit(unit: Unit, row_tokens: int) -> Unit:
    lengths = [len(t) for t in unit.targets]
    unit.rows = pack_rows(lengths, row_tokens)
    unit.row_len = max(sum(lengths[c] for c in row) for row in unit.rows)
    return unit


def plan_batches(units: list[Unit], batch_tokens: int) -> list[list[int]]:
    """Unit numbers per batch. Units are sorted by (rows, source length, row length) so that a
    batch pads little, then grouped greedily while both the encoder slots B*S and the decoder
    slots B*R*T stay within batch_tokens. A unit larger than the budget alone is a batch of its
    own (its rows are then decoded in several passes, see rows_per_pass)."""
    order = sorted(range(len(units)),
                   key=lambda i: (len(units[i].rows), len(units[i].source), units[i].row_len))
    batches: list[list[int]] = []
    cur: list[int] = []
    s = r = t = 0
    for i in order:
        u = units[i]
        ns, nr, nt = max(s, len(u.source)), max(r, len(u.rows)), max(t, u.row_len)
        b = len(cur) + 1
        if cur and (b * ns > batch_tokens or b * nr * nt > batch_tokens):
            batches.append(cur)
            cur, ns, nr, nt = [], len(u.source), len(u.rows), u.row_len
        cur.append(i)
        s, r, t = ns, nr, nt
    if cur:
        batches.append(cur)
    return batches


def rows_per_pass(n_units: int, row_len: int, batch_tokens: int) -> int:
    return max(1, batch_tokens // max(1, n_units * row_len))


@dataclass
class DecoderArrays:
    ids: np.ndarray  # [B, R, T] decoder input ids (padding: pad id)
    segments: np.ndarray  # [B, R, T] candidate number within the row (padding: -1)
    targets: np.ndarray  # [B, R, T] target ids (padding: IGNORE)
    slots: np.ndarray  # [B, R, T] output slot of each token's candidate (padding: -1)


def decoder_arrays(units: list[Unit], slot_base: list[int], start_id: int, pad_id: int,
                   rows: slice | None = None) -> DecoderArrays:
    """Padded arrays of the rows `rows` of every unit of a batch; candidate c of unit b writes
    to slot slot_base[b] + c."""
    R = max(len(u.rows) for u in units)
    rows = rows or slice(0, R)
    r0, r1 = rows.start, min(rows.stop, R)
    T = max(u.row_len for u in units)
    B = len(units)
    ids = np.full((B, r1 - r0, T), pad_id, dtype=np.int64)
    seg = np.full((B, r1 - r0, T), -1, dtype=np.int64)
    tgt = np.full((B, r1 - r0, T), IGNORE, dtype=np.int64)
    slot = np.full((B, r1 - r0, T), -1, dtype=np.int64)
    for b, u in enumerate(units):
        for r, row in enumerate(u.rows[r0:r1]):
            pos = 0
            for k, c in enumerate(row):
                y = u.targets[c]
                n = len(y)
                ids[b, r, pos] = start_id
                ids[b, r, pos + 1:pos + n] = y[:-1]
                tgt[b, r, pos:pos + n] = y
                seg[b, r, pos:pos + n] = k
                slot[b, r, pos:pos + n] = slot_base[b] + c
                pos += n
    return DecoderArrays(ids, seg, tgt, slot)
