"""The contract every baseline shares: what it is fitted on, what it scores, how it stops early.

Every baseline is scored on caller-given candidate lists (the data layer's stored lists), so the
evaluation compares all methods on identical candidates with the same pessimistic tie rule
(`instructrec.training.metrics`). A baseline never reorders or filters a list: row i, column j
of `score(...)` is the score of `requests[i].candidate_ids[j]`.

Candidates a model cannot represent (an item id never seen in training, for the ID-based models)
score `-inf`, which the pessimistic tie rule places after every scored candidate; the count is
logged as a warning, never hidden.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from instructrec.engine.errors import InputError
from instructrec.training.metrics import pessimistic_rank, summarize_ranks

logger = logging.getLogger(__name__)

PAD_INDEX = 0  # index 0 of every item table is padding; item i of the catalog has index i + 1
VALIDATION_METRICS = ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5")


@dataclass(frozen=True)
class ItemCatalog:
    """Items known to a baseline: ids in a fixed order with their title and category path."""

    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    index: Mapping[str, int] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self):
        if not (len(self.item_ids) == len(self.titles) == len(self.categories)):
            raise InputError("items", f"{len(self.item_ids)} ids, {len(self.titles)} titles and "
                             f"{len(self.categories)} category lists", "give one of each per item")
        index = {item_id: i + 1 for i, item_id in enumerate(self.item_ids)}
        if len(index) != len(self.item_ids):
            raise InputError("items.item_id", "duplicate item ids", "deduplicate the item table")
        object.__setattr__(self, "index", index)

    @classmethod
    def from_records(cls, item_ids: Sequence[str], titles: Sequence[str | None],
                     categories: Sequence[Sequence[str] | None] | None = None) -> ItemCatalog:
        categories = categories if categories is not None else [()] * len(item_ids)
        return cls(tuple(str(i) for i in item_ids), tuple(t or "" for t in titles),
                   tuple(tuple(c or ()) for c in categories))

    def __len__(self) -> int:
        return len(self.item_ids)

    def indices(self, item_ids: Iterable[str]) -> list[int]:
        """Catalog index of each id (0 for an id not in the catalog)."""
        return [self.index.get(i, PAD_INDEX) for i in item_ids]

    def category_path(self, item_id: str) -> str:
        """The I2-style specific intention of the original: the item's category labels joined."""
        row = self.index.get(item_id)
        return ", ".join(self.categories[row - 1]) if row else ""

    def text(self, item_id: str) -> str:
        row = self.index.get(item_id)
        if not row:
            return ""
        return " ".join([self.titles[row - 1], *self.categories[row - 1]])


@dataclass(frozen=True)
class TrainingData:
    """Chronological training item sequences per user plus the item catalog."""

    sequences: Mapping[str, Sequence[str]]
    items: ItemCatalog

    def __post_init__(self):
        if not self.sequences:
            raise InputError("sequences", "no training sequences", "pass at least one user's items")
        unknown = sum(1 for seq in self.sequences.values() for i in seq if i not in self.items.index)
        if unknown:
            raise InputError("sequences", f"{unknown} interactions name items missing from the catalog",
                             "build the catalog from items.parquet of the same prepared data")

    def item_counts(self) -> np.ndarray:
        """Training interaction count per catalog index (index 0, padding, counts 0)."""
        counts = np.zeros(len(self.items) + 1, dtype=np.int64)
        for seq in self.sequences.values():
            np.add.at(counts, self.items.indices(seq), 1)
        return counts


@dataclass(frozen=True)
class RankingRequest:
    """One scoring request: the user's chronological history, an optional query, candidates."""

    user_id: str
    history: tuple[str, ...]
    candidate_ids: tuple[str, ...]
    query: str | None = None


@dataclass(frozen=True)
class LabeledRequest:
    """A request with its held-out target (which must be among the candidates)."""

    request: RankingRequest
    target_item_id: str

    def __post_init__(self):
        if self.target_item_id not in self.request.candidate_ids:
            raise InputError("target_item_id", f"{self.target_item_id!r} is not among the candidates "
                             f"of user {self.request.user_id!r}", "put the target in candidate_ids")


@dataclass
class FitReport:
    """What training did: validation metric per epoch, the epoch kept, seconds spent."""

    method: str
    metric: str
    valid_by_epoch: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_valid: float = math.nan
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)


def candidate_matrix(requests: Sequence[RankingRequest]) -> int:
    """Number of candidates per request; scores come back as one [n_requests, K] array."""
    if not requests:
        raise InputError("requests", "no requests to score", "pass at least one request")
    sizes = {len(r.candidate_ids) for r in requests}
    if len(sizes) != 1 or 0 in sizes:
        raise InputError("candidate_ids", f"candidate list lengths {sorted(sizes)} in one call",
                         "score requests with the same non-zero number of candidates together")
    return sizes.pop()


def warn_unknown_candidates(method: str, n_unknown: int, n_total: int) -> None:
    if n_unknown:
        logger.warning("%s: %d of %d candidates are not in the training catalog; they score -inf "
                       "and rank after every known candidate", method, n_unknown, n_total)


def evaluate(scores: np.ndarray, labeled: Sequence[LabeledRequest]) -> dict[str, float]:
    """HR@1/3/5 and NDCG@3/5 of scored labeled requests (pessimistic ties, shared metrics)."""
    ranks = [pessimistic_rank(row, lr.request.candidate_ids.index(lr.target_item_id))
             for row, lr in zip(scores, labeled, strict=True)]
    return summarize_ranks(ranks)


def check_metric(metric: str) -> str:
    if metric not in VALIDATION_METRICS:
        raise InputError("metric", f"unknown validation metric {metric!r}",
                         f"use one of {', '.join(VALIDATION_METRICS)}")
    return metric


class EarlyStopping:
    """Keep the weights of the best validation epoch; stop after `patience` epochs without gain."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.history: list[float] = []

    def update(self, epoch: int, value: float, model: torch.nn.Module) -> bool:
        """Record one epoch; return True when training should stop."""
        self.history.append(value)
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return epoch - self.best_epoch >= self.patience

    def validate(self, epoch: int, name: str, score, valid: Sequence[LabeledRequest], metric: str,
                 model: torch.nn.Module) -> bool:
        """Score the validation requests with `score` (a model's `score` method), log and record
        the epoch's `metric`; return True when training should stop."""
        value = evaluate(score([v.request for v in valid]), valid)[metric]
        logger.info("%s epoch %d valid %s %.4f", name, epoch, metric, value)
        return self.update(epoch, value, model)

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def fill(self, report: FitReport, *, validated: bool, max_epochs: int, seconds: float) -> FitReport:
        """Copy the kept epoch into `report`; without validation the last epoch is kept."""
        report.train_seconds = seconds
        report.valid_by_epoch = self.history
        report.best_epoch = self.best_epoch if validated else max_epochs - 1
        report.best_valid = self.best if validated else math.nan
        return report


def seed_everything(seed: int) -> tuple[torch.Generator, np.random.Generator]:
    """Seed torch (dropout, init), Python and NumPy; return generators for batching and sampling."""
    torch.manual_seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed), np.random.default_rng(seed)


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def left_padded(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Right-align each row's latest `length` indices; pad on the left with PAD_INDEX."""
    out = torch.full((len(rows), length), PAD_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        tail = list(row)[-length:]
        if tail:
            out[r, length - len(tail):] = torch.tensor(tail, dtype=torch.long)
    return out
