"""Ranking metrics for one relevant item among scored candidates: HR@k and NDCG@k.

Every evaluation instance here has exactly one positive (the held-out item) among K candidates,
so with `rank` the positive's 1-based position:
    HR@k   = 1 if rank <= k else 0
    NDCG@k = 1 / log2(rank + 1) if rank <= k else 0   (the ideal DCG is 1: the positive first)

Ties are broken pessimistically: the positive is placed after every negative whose score equals
its own, so rank = 1 + #(negatives with score >= the positive's score). A model that gives every
candidate the same score therefore gets rank K, not 1 and not an average; a constant scorer
cannot look good by accident. NaN is read the same pessimistic way: a NaN positive ranks last
(rank K) and a NaN negative counts as ahead of the positive.

Instances that could not be scored at all (an engine error) count as misses: rank = K + 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

DEFAULT_CUTOFFS = (1, 3, 5)


def pessimistic_rank(scores: Sequence[float], positive_index: int) -> int:
    """1-based rank of `scores[positive_index]`, placing it after every tied negative."""
    if not 0 <= positive_index < len(scores):
        raise IndexError(f"positive_index {positive_index} outside {len(scores)} scores")
    positive = float(scores[positive_index])
    if math.isnan(positive):
        return len(scores)
    ahead = sum(1 for i, s in enumerate(scores)
                if i != positive_index and (float(s) >= positive or math.isnan(float(s))))
    return 1 + ahead


def rank_in_result(ranked_ids: Sequence[str], scores: Sequence[float], positive_id: str) -> int:
    """Pessimistic rank of `positive_id` in an engine result (`ranked_ids` aligned with `scores`).

    The engine's own order is not trusted for ties: the rank is recomputed from the scores.
    """
    try:
        index = list(ranked_ids).index(positive_id)
    except ValueError:
        raise KeyError(f"positive id {positive_id!r} is not among the ranked ids") from None
    return pessimistic_rank(scores, index)


def hit_rate_at(rank: int, k: int) -> float:
    return 1.0 if rank <= k else 0.0


def ndcg_at(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0


def summarize_ranks(ranks: Iterable[int], cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> dict[str, float]:
    """Mean HR@k and NDCG@k over instances, keyed "hr@1", "ndcg@5", ...; plus "n" (count)."""
    ranks = list(ranks)
    out: dict[str, float] = {"n": float(len(ranks))}
    for k in cutoffs:
        out[f"hr@{k}"] = sum(hit_rate_at(r, k) for r in ranks) / len(ranks) if ranks else math.nan
        out[f"ndcg@{k}"] = sum(ndcg_at(r, k) for r in ranks) / len(ranks) if ranks else math.nan
    return out


# The two-sided 95% point of the standard normal.
Z_95 = 1.959963984540054


def paired_hit_difference(ranks_a: Sequence[int], ranks_b: Sequence[int], k: int = 1) -> tuple[float, float]:
    """HR@k of method a minus HR@k of method b on the same lists (ranks aligned by list), and the
    half-width of its 95% interval: the normal interval of the mean per-list difference
    d_i = hit_a,i - hit_b,i, i.e. mean(d) +- Z_95 x std(d, ddof=1) / sqrt(n). Paired: the lists
    both methods rank alike add nothing to the width, so it is much narrower than comparing two
    separate intervals, and it is what "a beats b on these lists" needs. At least 2 lists."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"paired ranks need the same lists: {len(ranks_a)} against {len(ranks_b)}")
    n = len(ranks_a)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 lists, got {n}")
    d = [hit_rate_at(a, k) - hit_rate_at(b, k) for a, b in zip(ranks_a, ranks_b)]
    mean = sum(d) / n
    variance = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, Z_95 * math.sqrt(variance / n)
