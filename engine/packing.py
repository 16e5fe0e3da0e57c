"""Host-side planning: candidates packed into decoder rows, units batched by a token budget, and
the padded index arrays of one batch. Pure numpy, no model: the tests check it directly.

The device loop (engine/runner.py) does not upload padded [B, R, T] arrays: pack_unit also lays
each unit's candidates out flat in row order (`RowLayout`), and the runner sends only the
concatenated target ids and a few numbers per candidate, from which the device builds the padded
decoder inputs itself. `decoder_arrays` builds the same padded arrays on the host: the exporter
uses it, and the tests check the device construction against it.

A *unit* is one instruction encoding and the candidates scored under it (a whole request, or one
tournament group). A candidate with target ids [y_1 .. y_n] (closing </s> included) contributes
decoder inputs [start, y_1 .. y_{n-1}] and targets [y_1 .. y_n] to a row; rows hold several
candidates up to `row_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

__all__ = ["Unit", "RowLayout", "pack_rows", "pack_unit", "plan_batches", "rows_per_pass", "BatchPlan", "PassPlan",
           "plan_batch", "write_batch", "DecoderArrays", "decoder_arrays", "IGNORE"]

IGNORE = -100  # target id of padding slots (the LM-head kernel's ignore_index)


@dataclass
class RowLayout:
    """A packed unit's candidates in row order (row 0's candidates first, each row's in its order),
    so that a batch's decoder inputs are a few vector operations away. Plain lists: a rerank-10
    unit has ten entries, for which numpy's per-call overhead would cost more than the work."""

    candidates: list[int]  # [C] candidate numbers, row by row
    rows: list[int]  # [C] row of each
    offsets: list[int]  # [C] first token of each within its row
    lengths: list[int]  # [C] tokens of each (its target ids, closing </s> included)


@dataclass
class Unit:
    source: np.ndarray  # [S] int64 instruction token ids (closing </s> included)
    targets: list[np.ndarray]  # per candidate: [n_c] int64 target ids (closing </s> included)
    owner: int = -1  # index of the request it belongs to
    tag: object = None  # the caller's bookkeeping (e.g. the tournament group)
    rows: list[list[int]] = field(default_factory=list)  # candidate numbers per row, set by pack
    row_len: int = 0  # longest row, in tokens
    layout: RowLayout | None = None  # the rows as flat lists, set by pack
    scores: np.ndarray | None = None  # [n_candidates] float64 sums of token log-probs, once run
    # An ensemble reranker's unit: every model's `scores`, in the reranker's model order (scores
    # is then the first model's); None where one model scored it.
    model_scores: list[np.ndarray] | None = None

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
    """Sets unit.rows, unit.row_len and unit.layout."""
    lengths = [len(t) for t in unit.targets]
    unit.rows = pack_rows(lengths, row_tokens)
    layout = RowLayout([], [], [], [])
    row_len = 0
    for r, row in enumerate(unit.rows):
        used = 0
        for c in row:
            layout.candidates.append(c)
            layout.rows.append(r)
            layout.offsets.append(used)
            layout.lengths.append(lengths[c])
            used += lengths[c]
        row_len = max(row_len, used)
    unit.row_len = row_len
    unit.layout = layout
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
class PassPlan:
    """One decoder pass of a batch: rows [r0, r0 + rows) of every unit, its tokens [t0, t1) and
    candidates [c0, c1) within the batch's upload, and each candidate's output slot."""

    r0: int
    rows: int
    t0: int
    t1: int
    c0: int
    c1: int
    longest: int  # tokens of its longest candidate
    slots: np.ndarray  # [c1 - c0] int64 output slot of each candidate


@dataclass
class BatchPlan:
    """A batch's one int64 upload and where its parts lie: instruction ids [B, S] (padded with the
    pad id) at 0, their lengths [B] at lengths_at, the target ids of every pass's candidates
    [N] at targets_at, then per candidate (pass by pass) its length, its first token's index in its
    pass's token list, and its first token's flat position in that pass's [B, rows, T] decoder
    slots minus that index (so a token's flat position is its index plus its candidate's shift)."""

    B: int
    S: int  # instruction slots (longest instruction, rounded up to the pad multiple)
    T: int  # decoder row slots (longest row, rounded up to the pad multiple)
    lengths_at: int
    targets_at: int
    cand_lengths_at: int
    cand_starts_at: int
    cand_shifts_at: int
    size: int
    passes: list[PassPlan]
    parts: list[np.ndarray]  # what follows the lengths, in upload order


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_batch(units: list[Unit], slot_base: np.ndarray, batch_tokens: int, pad_multiple: int = 1) -> BatchPlan:
    """The decoder passes of a batch of packed units (rows_per_pass rows of every unit per pass)
    and the parts of its upload. Candidate c of unit b has output slot slot_base[b] + c."""
    B = len(units)
    S = _round_up(max(len(u.source) for u in units), pad_multiple)
    T = _round_up(max(u.row_len for u in units), pad_multiple)
    R = max(len(u.rows) for u in units)
    step = rows_per_pass(B, T, batch_tokens)
    layouts = [u.layout for u in units]
    counts = [len(lay.lengths) for lay in layouts]
    n_all = sum(counts)

    def flat(name: str) -> np.ndarray:  # [C] one layout field of every unit, in batch order
        return np.fromiter(chain.from_iterable(getattr(lay, name) for lay in layouts), np.int64, n_all)

    unit_of = np.repeat(np.arange(B, dtype=np.int64), counts)  # [C] unit of each candidate
    rows, offsets, lengths = flat("rows"), flat("offsets"), flat("lengths")
    slots = np.repeat(np.asarray(slot_base, dtype=np.int64), counts) + flat("candidates")  # [C]
    targets = np.concatenate([u.targets[c] for u, lay in zip(units, layouts) for c in lay.candidates])
    passes: list[PassPlan] = []
    parts_t, parts_len, parts_start, parts_shift = [], [], [], []
    t0 = c0 = 0
    for r0 in range(0, R, step):
        rc = min(step, R - r0)
        if rc == R:  # the usual case: one pass holds every row
            pick, tok = slice(None), targets
        else:  # the candidates (and tokens) of rows [r0, r0 + rc), in batch order
            keep = (rows >= r0) & (rows < r0 + rc)
            pick, tok = np.flatnonzero(keep), targets[np.repeat(keep, lengths)]
        n_len = lengths[pick]
        starts = np.cumsum(n_len) - n_len  # [Cp] first token of each in this pass's token list
        flat_first = (unit_of[pick] * rc + rows[pick] - r0) * T + offsets[pick]  # [Cp] in [B, rc, T]
        parts_t.append(tok)
        parts_len.append(n_len)
        parts_start.append(starts)
        parts_shift.append(flat_first - starts)
        t1, c1 = t0 + len(tok), c0 + len(n_len)
        passes.append(PassPlan(r0, rc, t0, t1, c0, c1, int(n_len.max()), slots[pick]))
        t0, c0 = t1, c1
    at = B * S + B
    return BatchPlan(B=B, S=S, T=T, lengths_at=B * S, targets_at=at, cand_lengths_at=at + t0,
                     cand_starts_at=at + t0 + c0, cand_shifts_at=at + t0 + 2 * c0, size=at + t0 + 3 * c0,
                     passes=passes, parts=[*parts_t, *parts_len, *parts_start, *parts_shift])


def write_batch(buf: np.ndarray, units: list[Unit], plan: BatchPlan, pad_id: int) -> None:
    """Write the batch's upload into buf ([plan.size] int64), in place."""
    src = buf[:plan.B * plan.S].reshape(plan.B, plan.S)
    src.fill(pad_id)
    for b, u in enumerate(units):
        src[b, :len(u.source)] = u.source
    buf[plan.lengths_at:plan.targets_at] = [len(u.source) for u in units]
    np.concatenate(plan.parts, out=buf[plan.targets_at:plan.size])


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
