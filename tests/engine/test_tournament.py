"""Grouped tournament: hand-checkable rounds with a known scorer, determinism, coverage, and the
engine's use of it (one encoder pass per group, listed instructions only)."""

from __future__ import annotations

import numpy as np
import pytest

from instructrec.engine import InputError, Request
from instructrec.engine.tournament import Tournament, run_tournament


def _value_scorer(values):
    return lambda groups: [values[g] for g in groups]


def test_hand_checked_two_rounds():
    values = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    t = Tournament(5, group_size=2, advance=1, seed=4)
    first = [g.tolist() for g in t.groups()]
    assert sorted(c for g in first for c in g) == [0, 1, 2, 3, 4] and all(len(g) <= 2 for g in first)
    order, scores = run_tournament(5, _value_scorer(values), group_size=2, advance=1, seed=4)
    # Group winners (the best of each group) advance; with fixed per-candidate values the overall
    # best (1, value 0.9) wins every round, and 2 (0.1) never wins a group of two.
    assert order[0] == 1 and order[-1] == 2
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(scores, values[order])  # a fixed scorer gives each value back


def test_ranking_is_final_order_then_earlier_rounds():
    values = np.arange(25, dtype=float)[::-1].copy()  # candidate c has value 24 - c
    t = Tournament(25, group_size=10, advance=1, seed=0)
    groups = [g.copy() for g in t.groups()]
    assert len(groups) == 3 and sorted(np.concatenate(groups).tolist()) == list(range(25))
    t.record([values[g] for g in groups])
    winners = [int(g[np.argmax(values[g])]) for g in groups]
    assert sorted(t.groups()[0].tolist()) == sorted(winners) and t.is_final_round
    t.record([values[t.groups()[0]]])
    order, _ = t.result()
    final = sorted(winners, key=lambda c: -values[c])
    rest = sorted(set(range(25)) - set(winners), key=lambda c: -values[c])
    assert order.tolist() == final + rest


def test_recursive_rounds_and_determinism():
    rng = np.random.default_rng(0)
    values = rng.normal(size=250)
    calls = []

    def scorer(groups):
        calls.append([len(g) for g in groups])
        return [values[g] for g in groups]

    a = run_tournament(250, scorer, group_size=10, advance=1, seed=3)
    assert calls == [[10] * 25, [9, 8, 8], [3]]  # 250 -> 25 winners -> 3 winners -> final
    b = run_tournament(250, _value_scorer(values), group_size=10, advance=1, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert sorted(a[0].tolist()) == list(range(250))
    assert a[0][0] == int(np.argmax(values))
    c = Tournament(250, 10, 1, seed=4).groups()
    assert any(not np.array_equal(x, y) for x, y in zip(c, Tournament(250, 10, 1, seed=3).groups()))


def test_advance_must_shrink_the_pool():
    with pytest.raises(InputError, match="advance"):
        Tournament(30, group_size=10, advance=6)
    order, _ = run_tournament(23, _value_scorer(np.arange(23.0)), group_size=10, advance=5)
    assert sorted(order.tolist()) == list(range(23))


# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_engine_runs_a_tournament_for_listed_candidates(tiny_t5_dir):
    from instructrec.engine import Reranker

    rr = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", group_size=10, seed=1)
    titles = [f"Racing game number {i}" for i in range(35)]
    listed = Request(instruction="Choose one of: {candidates}", candidates=titles, request_id="listed")
    plain = Request(instruction="A racing game.", candidates=titles, request_id="plain")
    res = rr.rank([listed, plain])
    # listed: 35 -> 4 groups -> 4 winners -> final round of 4: 5 encodings; plain: 1 encoding.
    assert rr.stats.encoder_passes == 6
    for r in res:
        assert sorted(r.ranked_ids, key=int) == [str(i) for i in range(35)] and r.error is None
    np.testing.assert_allclose(sorted(res[1].scores, reverse=True), rr.score("A racing game.", titles)[
        np.argsort(-rr.score("A racing game.", titles))], rtol=3e-7, atol=1e-4)
    again = rr.rank([listed])[0]
    assert again.ranked_ids == res[0].ranked_ids  # deterministic for a seed
    # Replay with the public pieces: each group scored directly under its own listing, the
    # winners listed in group order for the final.
    t = Tournament(35, group_size=10, advance=1, seed=1)
    while not t.done:
        t.record([rr.score(f"Choose one of: {{candidates}}", [titles[c] for c in g]) for g in t.groups()])
    order, scores = t.result()
    assert again.ranked_ids == [str(c) for c in order]
    np.testing.assert_allclose(again.scores, scores, rtol=3e-7, atol=1e-4)
