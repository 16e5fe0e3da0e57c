"""TEM-style personalized search (after Bi, Ai & Croft, "A Transformer-based Embedding Model for
Personalized Product Search", SIGIR 2020), in our own compact code.

The query (a non-linear projection of its text encoding) and the user's latest `history_len`
item embeddings form one sequence; a bidirectional transformer encoder reads it and the output at
the query slot is the user-query representation, scored against item embeddings by a dot product.
An item embedding is its ID embedding plus its title/category text encoding, so an item with few
interactions still has a representation. Training: softmax cross-entropy over all catalog items
for (history, query) -> next item examples from each user's latest training items.

Differences from the paper, on purpose: learned history-position embeddings (the order carries
the sequential signal our scenarios evaluate; TEM itself is order-free), pre-LayerNorm blocks
shared with SASRec, full softmax instead of sampled negatives (prepared Video Games 2018 has
11,642 items: one [256 x 11,642] logit matrix per batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
from instructrec.training.baselines.sequential import SelfAttentionBlock, attention_allowed
from instructrec.training.baselines.text import build_text_features

TEM_GRID = {"hidden_dim": [32, 64], "num_layers": [1, 2]}


@dataclass(frozen=True)
class TEMConfig:
    hidden_dim: int = 64
    num_layers: int = 1
    num_heads: int = 2
    dropout: float = 0.1
    history_len: int = 20  # the original's history cap
    pairs_per_user: int = 10  # (history, query) -> item examples from each user's latest items
    text_encoder: str = "bow"
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 4
    metric: str = "ndcg@5"
    seed: int = 0

    def __post_init__(self):
        check_metric(self.metric)
        if self.hidden_dim % self.num_heads:
            raise InputError("hidden_dim", f"{self.hidden_dim} is not divisible by num_heads "
                             f"{self.num_heads}", "pick hidden_dim a multiple of num_heads")


class _TEMNetwork(nn.Module):
    def __init__(self, n_items: int, text_module: nn.Module, config: TEMConfig):
        super().__init__()
        dim = config.hidden_dim
        self.text = text_module
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=PAD_INDEX)
        self.query_projection = nn.Linear(dim, dim)
        self.slot_type = nn.Embedding(2, dim)  # 0: query slot, 1: history item
        self.position = nn.Embedding(config.history_len, dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, config.num_heads, config.dropout)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(dim)
        for table in (self.ids, self.slot_type, self.position):
            nn.init.normal_(table.weight, std=0.1)

    def item_embedding(self, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.ids(index) + self.text(features)

    def user_query(self, history: torch.Tensor, query_features: torch.Tensor,
                   item_features: torch.Tensor) -> torch.Tensor:
        """history: [B, H] left-padded indices; returns the query slot's output [B, D]."""
        b, h = history.shape
        flat = history.reshape(-1)
        items = self.item_embedding(flat, item_features[flat]).view(b, h, -1)
        items = items + self.position(torch.arange(h)) + self.slot_type.weight[1]
        query = torch.tanh(self.query_projection(self.text(query_features))) + self.slot_type.weight[0]
        x = torch.cat([query[:, None], items], 1)  # [B, 1 + H, D]
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool), history != PAD_INDEX], 1)
        allowed = attention_allowed(valid, causal=False)
        for block in self.blocks:
            x = block(x, allowed) * valid[..., None]
        return self.final_norm(x[:, 0])


class TEM:
    name = "tem"
    grid = TEM_GRID

    def __init__(self, config: TEMConfig | None = None, **overrides):
        self.config = replace(config or TEMConfig(), **overrides)
        self.model: _TEMNetwork | None = None
        self.items: ItemCatalog | None = None

    def fit(self, train: TrainingData, valid: Sequence[LabeledRequest] = (), *,
            query_for: Callable[[str, str], str] | None = None) -> FitReport:
        """`query_for(user_id, item_id)` gives the training query of a (user, target) example;
        by default the target's category path (the original's specific intention, I2)."""
        cfg = self.config
        gen, rng = seed_everything(cfg.seed)
        self.items = items = train.items
        query_for = query_for or (lambda user, item: items.category_path(item))
        histories, queries, targets = [], [], []
        for user in sorted(train.sequences):
            seq = list(train.sequences[user])
            for t in range(max(1, len(seq) - cfg.pairs_per_user), len(seq)):
                histories.append(items.indices(seq[:t]))
                queries.append(query_for(user, seq[t]))
                targets.append(items.index[seq[t]])
        if not targets:
            raise InputError("sequences", "no user has two or more training items",
                             "TEM needs a history and a next item")
        item_texts = [""] + [items.text(i) for i in items.item_ids]
        self.features = build_text_features(cfg.text_encoder, item_texts + queries)
        self.item_features = self.features.featurize(item_texts)  # precomputed once: [N + 1, ...]
        history_tensor = left_padded(histories, cfg.history_len)
        query_tensor = self.features.featurize(queries)
        target_tensor = torch.tensor(targets)
        all_items = torch.arange(1, len(items) + 1)
        self.model = _TEMNetwork(len(items), self.features.module(cfg.hidden_dim), cfg)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        stopper = EarlyStopping(cfg.patience)
        report = FitReport(self.name, cfg.metric, config=asdict(cfg))
        with Stopwatch() as watch:
            for epoch in range(cfg.max_epochs):
                self.model.train()
                order = torch.from_numpy(rng.permutation(len(targets)))
                for start in range(0, len(order), cfg.batch_size):
                    batch = order[start:start + cfg.batch_size]
                    states = self.model.user_query(history_tensor[batch], query_tensor[batch], self.item_features)
                    table = self.model.item_embedding(all_items, self.item_features[all_items])  # [N, D]
                    loss = F.cross_entropy(states @ table.T, target_tensor[batch] - 1)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if valid and stopper.validate(epoch, self.name, self.score, valid, cfg.metric, self.model):
                    break
            stopper.restore(self.model)
        return stopper.fill(report, validated=bool(valid), max_epochs=cfg.max_epochs, seconds=watch.seconds)

    @torch.no_grad()
    def score(self, requests: Sequence[RankingRequest], batch_size: int = 512) -> np.ndarray:
        """[n_requests, K] scores; every request needs a query."""
        if self.model is None:
            raise RuntimeError("TEM.score called before fit")
        width = candidate_matrix(requests)
        missing = [r.user_id for r in requests if r.query is None]
        if missing:
            raise InputError("query", f"{len(missing)} requests have no query (first user {missing[0]!r})",
                             "set RankingRequest.query for personalized search")
        self.model.eval()
        out = np.empty((len(requests), width), dtype=np.float64)
        unknown = 0
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            histories = [[i for i in self.items.indices(r.history) if i != PAD_INDEX] for r in chunk]
            states = self.model.user_query(left_padded(histories, self.config.history_len),
                                           self.features.featurize([r.query for r in chunk]), self.item_features)
            cands = torch.tensor([self.items.indices(r.candidate_ids) for r in chunk])  # [b, K]
            flat = cands.reshape(-1)
            emb = self.model.item_embedding(flat, self.item_features[flat]).view(len(chunk), width, -1)
            logits = (states[:, None, :] * emb).sum(-1).double()
            known = cands != PAD_INDEX
            unknown += int((~known).sum())
            out[start:start + len(chunk)] = logits.masked_fill(~known, -math.inf).numpy()
        warn_unknown_candidates(self.name, unknown, out.size)
        return out
