"""Popularity: a candidate's score is its number of training interactions.

Nothing to tune and nothing to stop early; `fit` still reports the validation metric so the
report table has the same columns for every method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instructrec.training.baselines.common import (
    FitReport, LabeledRequest, RankingRequest, Stopwatch, TrainingData, candidate_matrix,
    check_metric, evaluate,
)


class Popularity:
    name = "popularity"

    def __init__(self, metric: str = "ndcg@5"):
        self.metric = check_metric(metric)
        self.counts: dict[str, int] | None = None

    def fit(self, train: TrainingData, valid: Sequence[LabeledRequest] = ()) -> FitReport:
        with Stopwatch() as watch:
            counts = train.item_counts()
            self.counts = {item_id: int(counts[i + 1]) for i, item_id in enumerate(train.items.item_ids)}
        report = FitReport(self.name, self.metric, train_seconds=watch.seconds, best_epoch=0)
        if valid:
            report.best_valid = evaluate(self.score([v.request for v in valid]), valid)[self.metric]
            report.valid_by_epoch = [report.best_valid]
        return report

    def score(self, requests: Sequence[RankingRequest]) -> np.ndarray:
        """[n_requests, K] training counts; an item never seen in training counts 0."""
        if self.counts is None:
            raise RuntimeError("Popularity.score called before fit")
        width = candidate_matrix(requests)
        scores = np.zeros((len(requests), width), dtype=np.float64)
        for r, request in enumerate(requests):
            scores[r] = [self.counts.get(i, 0) for i in request.candidate_ids]
        return scores
