"""DSSM-style two-tower retriever, for product search and for the hard-negative scenario.

Two kinds share one network shape (a tower maps its input to an L2-normalised vector; the score
is the dot product over a temperature):
- `kind="search"`: query text -> item text. Item IDs are not used, so items held out of training
  (the product-search split) are represented by their title and categories alone.
- `kind="user"`: the user tower reads the history (each item as ID embedding + title text,
  pooled as [mean of the last `history_len` items, the last item]); the item tower reads the
  item's ID and title. Its top-scored items, minus everything the user interacted with, are the
  hard negatives (`retrieve_hard_negatives`).

Training: in-batch softmax (each positive against the other positives of its batch; a duplicate
of the positive elsewhere in the batch is masked out, not counted as a negative).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from instructrec.engine.errors import InputError
from instructrec.training.baselines.common import (
    PAD_INDEX, EarlyStopping, FitReport, ItemCatalog, LabeledRequest, RankingRequest, Stopwatch,
    TrainingData, candidate_matrix, check_metric, left_padded, seed_everything,
    warn_unknown_candidates,
)
from instructrec.training.baselines.text import build_text_features

TWO_TOWER_KINDS = ("search", "user")
TWO_TOWER_GRID = {"temperature": [0.05, 0.1], "hidden_dim": [64, 128]}


@dataclass(frozen=True)
class TwoTowerConfig:
    kind: str = "user"
    hidden_dim: int = 64
    temperature: float = 0.1
    text_encoder: str = "bow"
    history_len: int = 20  # the original's history cap
    pairs_per_user: int = 10  # user kind: (prefix -> next item) pairs from each user's latest items
    lr: float = 3e-3
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 4
    metric: str = "ndcg@5"
    seed: int = 0

    def __post_init__(self):
        check_metric(self.metric)
        if self.kind not in TWO_TOWER_KINDS:
            raise InputError("kind", f"unknown two-tower kind {self.kind!r}", "use 'search' or 'user'")
        if self.temperature <= 0:
            raise InputError("temperature", f"{self.temperature} is not positive", "use e.g. 0.1")


def in_batch_softmax_loss(queries: torch.Tensor, items: torch.Tensor, item_index: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each query [B, D] against the B items of the batch, its own positive
    on the diagonal; another row holding the same item (`item_index` equal) is masked out."""
    logits = queries @ items.T / temperature  # [B, B]
    duplicate = (item_index[:, None] == item_index[None, :]) & ~torch.eye(len(item_index), dtype=torch.bool)
    return F.cross_entropy(logits.masked_fill(duplicate, -math.inf), torch.arange(len(item_index)))


class _TwoTowerNetwork(nn.Module):
    def __init__(self, n_items: int, text_module: nn.Module, dim: int, use_ids: bool):
        super().__init__()
        self.text = text_module
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=PAD_INDEX) if use_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.1)
        self.item_mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.query_mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.user_mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.Tanh(), nn.Linear(dim, dim))

    def item_base(self, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """ID + text embedding of items; `features` are the items' text features, row-aligned."""
        base = self.text(features)
        return base + self.ids(index) if self.ids is not None else base

    def item_vectors(self, index, features):
        return F.normalize(self.item_mlp(self.item_base(index, features)), dim=-1)

    def query_vectors(self, features):
        return F.normalize(self.query_mlp(self.text(features)), dim=-1)

    def user_vectors(self, history: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """history: [B, H] left-padded item indices; item_features: the catalog's feature table."""
        b, h = history.shape
        flat = history.reshape(-1)
        items = self.item_base(flat, item_features[flat]).view(b, h, -1)  # [B, H, D]
        valid = (history != PAD_INDEX)[..., None]
        mean = (items * valid).sum(1) / valid.sum(1).clamp(min=1)
        last = items[:, -1] * valid[:, -1]
        return F.normalize(self.user_mlp(torch.cat([mean, last], -1)), dim=-1)


class TwoTowerRetriever:
    name = "two_tower"
    grid = TWO_TOWER_GRID

    def __init__(self, config: TwoTowerConfig | None = None, **overrides):
        self.config = replace(config or TwoTowerConfig(), **overrides)
        self.name = f"two_tower_{self.config.kind}"
        self.model: _TwoTowerNetwork | None = None
        self.items: ItemCatalog | None = None

    def fit(self, train: TrainingData, valid: Sequence[LabeledRequest] = (), *,
            search_pairs: Sequence[tuple[str, str]] | None = None) -> FitReport:
        """Train on (history -> next item) pairs of `train` (user kind) or on `search_pairs`
        of (query text, item id) (search kind; e.g. `category_queries` over the search train split)."""
        cfg = self.config
        gen, rng = seed_everything(cfg.seed)
        self.items = items = train.items
        if cfg.kind == "search":
            if not search_pairs:
                raise InputError("search_pairs", "kind='search' needs (query, item_id) training pairs",
                                 "pass e.g. category_queries(items, search_train_item_ids)")
            missing = [i for _, i in search_pairs if i not in items.index]
            if missing:
                raise InputError("search_pairs", f"{len(missing)} pairs name items missing from the catalog "
                                 f"(first {missing[0]!r})", "use item ids of items.parquet")
            queries = [q for q, _ in search_pairs]
        else:
            queries = []
        item_texts = [""] + [items.text(i) for i in items.item_ids]
        self.features = build_text_features(cfg.text_encoder, item_texts + queries)
        self.item_features = self.features.featurize(item_texts)  # precomputed once: [N + 1, ...]
        self.model = _TwoTowerNetwork(len(items), self.features.module(cfg.hidden_dim), cfg.hidden_dim,
                                      use_ids=cfg.kind == "user")
        if cfg.kind == "search":
            inputs = self.features.featurize(queries)
            targets = torch.tensor(items.indices(i for _, i in search_pairs))
        else:
            inputs, targets = self._user_pairs(train)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        stopper = EarlyStopping(cfg.patience)
        report = FitReport(self.name, cfg.metric, config=asdict(cfg))
        with Stopwatch() as watch:
            for epoch in range(cfg.max_epochs):
                self.model.train()
                order = torch.from_numpy(rng.permutation(len(targets)))
                for start in range(0, len(order), cfg.batch_size):
                    batch = order[start:start + cfg.batch_size]
                    if len(batch) < 2:  # in-batch softmax needs a negative
                        continue
                    target = targets[batch]
                    left = (self.model.query_vectors(inputs[batch]) if cfg.kind == "search"
                            else self.model.user_vectors(inputs[batch], self.item_features))
                    right = self.model.item_vectors(target, self.item_features[target])
                    loss = in_batch_softmax_loss(left, right, target, cfg.temperature)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if valid and stopper.validate(epoch, self.name, self.score, valid, cfg.metric, self.model):
                    break
            stopper.restore(self.model)
        return stopper.fill(report, validated=bool(valid), max_epochs=cfg.max_epochs, seconds=watch.seconds)

    def _user_pairs(self, train: TrainingData) -> tuple[torch.Tensor, torch.Tensor]:
        histories, targets = [], []
        for user in sorted(train.sequences):
            seq = train.items.indices(train.sequences[user])
            for t in range(max(1, len(seq) - self.config.pairs_per_user), len(seq)):
                histories.append(seq[:t])
                targets.append(seq[t])
        if not targets:
            raise InputError("sequences", "no user has two or more training items",
                             "the user tower needs a history and a next item")
        return left_padded(histories, self.config.history_len), torch.tensor(targets)

    def _request_vectors(self, requests: Sequence[RankingRequest]) -> torch.Tensor:
        if self.config.kind == "search":
            missing = [r.user_id for r in requests if not r.query]
            if missing:
                raise InputError("query", f"{len(missing)} search requests have no query (first user "
                                 f"{missing[0]!r})", "set RankingRequest.query for kind='search'")
            return self.model.query_vectors(self.features.featurize([r.query for r in requests]))
        histories = [[i for i in self.items.indices(r.history) if i != PAD_INDEX] for r in requests]
        return self.model.user_vectors(left_padded(histories, self.config.history_len), self.item_features)

    @torch.no_grad()
    def score(self, requests: Sequence[RankingRequest], batch_size: int = 1024) -> np.ndarray:
        """[n_requests, K] cosine / temperature scores aligned with the candidate lists."""
        if self.model is None:
            raise RuntimeError(f"{self.name}.score called before fit")
        width = candidate_matrix(requests)
        self.model.eval()
        out = np.empty((len(requests), width), dtype=np.float64)
        unknown = 0
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            left = self._request_vectors(chunk)  # [b, D]
            cands = torch.tensor([self.items.indices(r.candidate_ids) for r in chunk])  # [b, K]
            flat = cands.reshape(-1)
            right = self.model.item_vectors(flat, self.item_features[flat]).view(len(chunk), width, -1)
            logits = ((left[:, None, :] * right).sum(-1) / self.config.temperature).double()
            known = cands != PAD_INDEX
            unknown += int((~known).sum())
            out[start:start + len(chunk)] = logits.masked_fill(~known, -math.inf).numpy()
        warn_unknown_candidates(self.name, unknown, out.size)
        return out

    @torch.no_grad()
    def all_item_vectors(self) -> torch.Tensor:
        index = torch.arange(len(self.items) + 1)
        return self.model.item_vectors(index, self.item_features)  # [N + 1, D]; row 0 is padding


def category_queries(items: ItemCatalog, item_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(category path, item id) pairs: the original's specific intention (I2) as a search query;
    items without categories are skipped."""
    return [(items.category_path(i), i) for i in item_ids if items.category_path(i)]


@torch.no_grad()
def retrieve_hard_negatives(model: TwoTowerRetriever, histories: Sequence[Sequence[str]],
                            exclude: Sequence[Collection[str]], k: int = 9,
                            batch_size: int = 512) -> list[list[str]]:
    """The `k` items the user tower scores highest for each history, skipping `exclude[i]`
    (pass every item the user interacted with, the held-out target included).

    Returned best first. Exact float ties between two learned item vectors are not broken by any
    rule of ours (torch.topk decides); they need two items with identical ID and text inputs.
    """
    if model.model is None or model.config.kind != "user":
        raise InputError("model", "hard negatives need a fitted two-tower model of kind 'user'",
                         "fit TwoTowerRetriever(kind='user') first")
    if len(histories) != len(exclude):
        raise InputError("exclude", f"{len(exclude)} exclusion sets for {len(histories)} histories",
                         "give one set of interacted items per history")
    n_items = len(model.items)
    if k > n_items:
        raise InputError("k", f"{k} negatives asked from a catalog of {n_items} items", "lower k")
    model.model.eval()
    table = model.all_item_vectors()  # [N + 1, D]
    out: list[list[str]] = []
    for start in range(0, len(histories), batch_size):
        requests = [RankingRequest("", tuple(h), ()) for h in histories[start:start + batch_size]]
        scores = model._request_vectors(requests) @ table.T  # [b, N + 1]
        scores[:, PAD_INDEX] = -math.inf
        for r, skip in enumerate(exclude[start:start + batch_size]):
            banned = [i for i in model.items.indices(skip) if i != PAD_INDEX]
            scores[r, banned] = -math.inf
        available = (scores > -math.inf).sum(1)
        if int(available.min()) < k:
            raise InputError("exclude", f"a user excludes all but {int(available.min())} items, fewer than k={k}",
                             "lower k or exclude fewer items")
        top = scores.topk(k, dim=1).indices
        out.extend([model.items.item_ids[i - 1] for i in row] for row in top.tolist())
    return out
