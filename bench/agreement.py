"""Ranking agreement of a provider with the reference: top-1 agreement and Kendall's tau.

Rankings are lists of candidate numbers, best first. Kendall's tau here is tau-b over two score
vectors (ties count as neither concordant nor discordant and shrink the denominator); for two
permutations it equals the classic (concordant - discordant) / (n choose 2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long score vectors; nan when either is constant or n < 2."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-d vectors of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    i, j = np.triu_indices(len(a), k=1)  # every pair once: n <= a few hundred here
    da = np.sign(a[i] - a[j])
    db = np.sign(b[i] - b[j])
    concordant_minus_discordant = float(np.sum(da * db))
    untied_a = float(np.count_nonzero(da))
    untied_b = float(np.count_nonzero(db))
    if untied_a == 0 or untied_b == 0:
        return float("nan")
    return concordant_minus_discordant / np.sqrt(untied_a * untied_b)


def ranking_to_scores(ranking: Sequence[int]) -> np.ndarray:
    """Scores (higher is better) of candidates 0..n-1 from a ranking, best first."""
    order = np.asarray(ranking, dtype=np.int64)
    scores = np.empty(len(order), dtype=np.float64)
    scores[order] = -np.arange(len(order), dtype=np.float64)
    return scores


def ranking_agreement(rankings: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict:
    """Top-1 agreement and mean Kendall tau over the requests both ranked (the first
    min(len) of each: every provider scores the same first-N inputs)."""
    n = min(len(rankings), len(reference))
    if n == 0:
        raise ValueError("no request ranked by both the provider and the reference")
    top1 = [rankings[k][0] == reference[k][0] for k in range(n)]
    taus = [kendall_tau(ranking_to_scores(rankings[k]), ranking_to_scores(reference[k])) for k in range(n)]
    return {"requests": n, "top1_agreement": float(np.mean(top1)), "kendall_tau": float(np.nanmean(taus))}
