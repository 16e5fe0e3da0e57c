"""HR@k / NDCG@k against hand-computed cases, ties and NaN included (pessimistic ranking)."""

from __future__ import annotations

import math

import pytest

from instructrec.training.metrics import (
    hit_rate_at, ndcg_at, pessimistic_rank, rank_in_result, summarize_ranks)


def test_rank_of_a_clear_winner_and_a_clear_loser():
    scores = [-1.0, -3.0, -7.5]
    assert pessimistic_rank(scores, 0) == 1
    assert pessimistic_rank(scores, 1) == 2
    assert pessimistic_rank(scores, 2) == 3


def test_ties_place_the_positive_after_every_tied_negative():
    # Positive at index 0 tied with two negatives, one negative below: 2 ahead -> rank 3.
    assert pessimistic_rank([-2.0, -2.0, -2.0, -9.0], 0) == 3
    # A constant scorer over 10 candidates ranks the positive last, whatever its index.
    assert pessimistic_rank([0.0] * 10, 0) == 10
    assert pessimistic_rank([0.0] * 10, 9) == 10


def test_nan_is_read_pessimistically():
    assert pessimistic_rank([math.nan, -1.0, -2.0], 0) == 3  # NaN positive: last
    assert pessimistic_rank([-1.0, math.nan, -2.0], 0) == 2  # NaN negative: counted ahead


def test_hit_rate_and_ndcg_by_hand():
    assert hit_rate_at(1, 1) == 1.0 and hit_rate_at(2, 1) == 0.0 and hit_rate_at(5, 5) == 1.0
    assert ndcg_at(1, 5) == 1.0
    assert ndcg_at(2, 5) == pytest.approx(0.6309297535714575)  # 1 / log2(3)
    assert ndcg_at(3, 5) == pytest.approx(0.5)  # 1 / log2(4)
    assert ndcg_at(6, 5) == 0.0


def test_summary_over_instances_by_hand():
    summary = summarize_ranks([1, 2, 6])
    assert summary["n"] == 3
    assert summary["hr@1"] == pytest.approx(1 / 3)
    assert summary["hr@3"] == pytest.approx(2 / 3)
    assert summary["hr@5"] == pytest.approx(2 / 3)
    assert summary["ndcg@3"] == pytest.approx((1 + 0.6309297535714575) / 3)
    assert summary["ndcg@5"] == pytest.approx((1 + 0.6309297535714575) / 3)


def test_rank_in_an_engine_result_recomputes_ties_from_scores():
    ranked_ids, scores = ["b", "a", "c"], [-2.0, -2.0, -5.0]
    # The engine listed "b" first, but "a" ties it: both get the pessimistic rank 2.
    assert rank_in_result(ranked_ids, scores, "b") == 2
    assert rank_in_result(ranked_ids, scores, "a") == 2
    assert rank_in_result(ranked_ids, scores, "c") == 3
    with pytest.raises(KeyError):
        rank_in_result(ranked_ids, scores, "z")
    with pytest.raises(IndexError):
        pessimistic_rank([1.0], 1)


def test_cutoffs_larger_than_the_list():
    # 3 candidates: any rank is within 5, so HR@5 is 1 whatever the rank, and NDCG@5 equals
    # NDCG@3 = 1/log2(rank + 1): ranks 1, 2, 3 -> 1, 0.6309..., 0.5.
    ranks = [pessimistic_rank([0.9, 0.2, 0.1], 0), pessimistic_rank([0.9, 0.2, 0.1], 1),
             pessimistic_rank([0.1, 0.1, 0.1], 0)]
    assert ranks == [1, 2, 3]
    summary = summarize_ranks(ranks, cutoffs=(1, 3, 5, 10))
    assert summary["hr@5"] == summary["hr@10"] == 1.0
    assert summary["hr@1"] == pytest.approx(1 / 3)
    expected = (1.0 + 1.0 / math.log2(3) + 0.5) / 3
    assert summary["ndcg@5"] == pytest.approx(expected) and summary["ndcg@10"] == pytest.approx(expected)
    assert summary["ndcg@3"] == pytest.approx(expected)
    # A one-candidate list: the positive is first at every cutoff.
    assert summarize_ranks([pessimistic_rank([-4.2], 0)]) == {
        "n": 1.0, "hr@1": 1.0, "ndcg@1": 1.0, "hr@3": 1.0, "ndcg@3": 1.0, "hr@5": 1.0, "ndcg@5": 1.0}


def test_paired_hit_difference_by_hand():
    from instructrec.training.metrics import paired_hit_difference

    # Lists: a hits alone twice, b hits alone once, both hit once, neither once (n = 5).
    a = [1, 1, 1, 4, 2]
    b = [3, 5, 1, 1, 7]
    diff, half = paired_hit_difference(a, b)
    # d = [1, 1, 0, -1, 0]: mean 0.2; sample variance ((0.8^2) * 2 + 0.2^2 + 1.2^2 + 0.2^2) / 4 = 0.7
    assert diff == pytest.approx(0.2)
    assert half == pytest.approx(1.959963984540054 * (0.7 / 5) ** 0.5)
    # At k = 2, a's rank 2 is a hit too: d = [1, 1, 0, -1, 1], mean 0.4.
    assert paired_hit_difference(a, b, k=2)[0] == pytest.approx(0.4)
    # The same ranks: no difference and no width.
    assert paired_hit_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same lists: 5 against 4"):
        paired_hit_difference(a, b[:4])
    with pytest.raises(ValueError, match="at least 2 lists"):
        paired_hit_difference([1], [2])
