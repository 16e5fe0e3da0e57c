"""Grouped tournament for instructions that list their candidates (T3 reranking).

A listed-candidates instruction cannot hold 100+ titles (source budget, and the model was tuned
on about 10), so: split the candidates into groups of at most G (seeded shuffle), score each
group's candidates under that group's own instruction, advance the top w of each group, and
repeat over the winners until at most G remain; that final group is scored once more. The full
ranking is the final order, then the candidates eliminated in later rounds before those
eliminated earlier, each tier by its score in the round it left.

The class is a step machine (groups() -> record(scores)) so the engine can run the same round of
many requests' tournaments in one batch; `run_tournament` drives one with any scorer callable.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import InputError

__all__ = ["Tournament", "run_tournament"]


class Tournament:
    def __init__(self, n_candidates: int, group_size: int = 10, advance: int = 1, seed: int = 0):
        check_tournament_options(group_size, advance)
        if n_candidates < 1:
            raise InputError("candidates", "a tournament needs at least one candidate")
        self.n, self.G, self.w = n_candidates, group_size, advance
        # Seeded per tournament (not shared across requests), so a request's ranking does not
        # depend on what else is in the batch.
        self._rng = np.random.default_rng(seed)
        self._pool = np.arange(n_candidates)
        self._round = 0
        self._last_round = np.full(n_candidates, -1, dtype=np.int64)
        self._last_score = np.full(n_candidates, -np.inf)
        self._groups: list[np.ndarray] | None = None
        self.done = False
        self._start_round()

    def _start_round(self) -> None:
        pool = self._pool
        if len(pool) <= self.G:  # final round: the whole pool as one group, in pool order
            self._groups = [pool]
        else:
            shuffled = self._rng.permutation(pool)
            self._groups = np.array_split(shuffled, math.ceil(len(pool) / self.G))

    @property
    def is_final_round(self) -> bool:
        return len(self._pool) <= self.G

    def groups(self) -> list[np.ndarray]:
        """Candidate numbers of each group of the current round (each at most G)."""
        if self.done:
            raise RuntimeError("tournament already finished")
        return self._groups

    def record(self, scores: list[np.ndarray]) -> None:
        """Scores of the current round, aligned with groups(); advances to the next round."""
        groups = self.groups()
        if len(scores) != len(groups):
            raise ValueError(f"{len(scores)} score arrays for {len(groups)} groups")
        final = self.is_final_round
        winners = []
        for g, s in zip(groups, scores):
            s = np.asarray(s, dtype=np.float64)
            if s.shape != g.shape:
                raise ValueError(f"scores of shape {s.shape} for a group of {len(g)}")
            self._last_round[g] = self._round
            self._last_score[g] = s
            best = np.argsort(-s, kind="stable")[: self.w]
            winners.append(g[np.sort(best)])
        self._round += 1
        if final:
            self.done = True
            self._groups = None
            return
        self._pool = np.concatenate(winners)
        self._start_round()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ranking: candidate numbers best first, each candidate's score from its last round)."""
        if not self.done:
            raise RuntimeError("tournament not finished")
        idx = np.arange(self.n)
        # lexsort: last key is primary -> round reached (desc), then score (desc), then number.
        order = np.lexsort((idx, -self._last_score, -self._last_round))
        return order, self._last_score[order]

    @property
    def rounds(self) -> int:
        return self._round


def check_tournament_options(group_size: int, advance: int) -> None:
    if not isinstance(group_size, int) or group_size < 2:
        raise InputError("group_size", f"must be an int >= 2, got {group_size!r}")
    # With n > G split into m = ceil(n/G) >= 2 groups, n/m > G/2 candidates on average, so w <= G//2
    # guarantees fewer winners than entrants, so every round shrinks the pool.
    if not isinstance(advance, int) or not 1 <= advance <= group_size // 2:
        raise InputError("advance", f"must be an int in [1, group_size // 2 = {group_size // 2}], "
                         f"got {advance!r}", "lower advance or raise group_size")


def run_tournament(n_candidates: int, scorer: Callable[[list[np.ndarray]], list[np.ndarray]],
                   group_size: int = 10, advance: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Drive one tournament: scorer(groups of candidate numbers) -> one score array per group."""
    t = Tournament(n_candidates, group_size, advance, seed)
    while not t.done:
        t.record(scorer(t.groups()))
    return t.result()
