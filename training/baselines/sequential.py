"""SASRec and BERT4Rec: self-attention over the item-ID sequence, written compactly here.

RecBole (what the original used) does not install cleanly beside our pins (it requires
ray<=2.6.3, our ray extra needs >=2.9; see training/baselines/README.md), so both follow their
papers in our own code:

- SASRec (Kang & McAuley, ICDM 2018): item + learned absolute position embeddings, a stack of
  pre-LayerNorm blocks (causal self-attention, position-wise feed-forward), a final LayerNorm;
  the state at position t scores the item at t+1 by a dot product with the shared item
  embedding. Loss: binary cross-entropy with one uniformly sampled negative per position (the
  paper's), or full softmax cross-entropy over all items (`loss="ce"`).
- BERT4Rec (Sun et al., CIKM 2019): the same blocks without the causal mask; Cloze training
  replaces a fraction `mask_prob` of the items with a [MASK] token and predicts them with a
  softmax over all items (output layer tied to the item embedding, plus a bias); a fraction of
  rows mask only their last item, as the paper does, to match inference, where one [MASK] is
  appended after the history and its state scores the candidates.

Sequences are right-aligned and left-padded with index 0; padding never enters attention as a
key (a padded position attends only to itself so no softmax row is empty, and its output is
zeroed), and padded positions carry no loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


@dataclass(frozen=True)
class SequentialConfig:
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.5  # SASRec's setting for the sparse Amazon datasets
    max_len: int = 50  # SASRec's and BERT4Rec's length for Amazon Beauty/Games-sized data
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 5  # epochs without a validation gain before stopping
    metric: str = "ndcg@5"
    seed: int = 0
    loss: str = "bce"  # SASRec only: "bce" (one sampled negative) or "ce" (all items)
    mask_prob: float = 0.2  # BERT4Rec only: Cloze masking rate
    last_item_mask_fraction: float = 0.1  # BERT4Rec only: rows masking only their last item

    def __post_init__(self):
        check_metric(self.metric)
        if self.hidden_dim % self.num_heads:
            raise InputError("hidden_dim", f"{self.hidden_dim} is not divisible by num_heads "
                             f"{self.num_heads}", "pick hidden_dim a multiple of num_heads")
        if self.loss not in ("bce", "ce"):
            raise InputError("loss", f"unknown loss {self.loss!r}", "use 'bce' or 'ce'")
        if not 0.0 < self.mask_prob < 1.0:
            raise InputError("mask_prob", f"{self.mask_prob} outside (0, 1)", "use e.g. 0.2")


# Grids tuned on the validation candidates (each point trained with early stopping).
SASREC_GRID = {"hidden_dim": [32, 64], "dropout": [0.2, 0.5]}
BERT4REC_GRID = {"hidden_dim": [32, 64], "mask_prob": [0.2, 0.4]}


def attention_allowed(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, L, L]: may query position i attend to key position j.

    Keys must be real items (and at or before i when causal); every position may attend to
    itself, so a padded query has one allowed key instead of an all -inf softmax row.
    """
    length = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, length, -1)  # [B, L(query), L(key)]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool)
    return allowed[:, None]


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, length, 3, self.heads, dim // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, dh]
        logits = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)  # [B, H, L, L]
        weights = self.dropout(logits.masked_fill(~allowed, -math.inf).softmax(-1))
        attended = (weights @ v).transpose(1, 2).reshape(b, length, dim)
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class ItemSequenceEncoder(nn.Module):
    """Item + position embeddings through self-attention blocks; returns [B, L, D] states."""

    def __init__(self, n_items: int, config: SequentialConfig, causal: bool, extra_tokens: int = 0):
        super().__init__()
        self.causal = causal
        self.max_len = config.max_len
        # index 0 padding, 1..n_items items, then `extra_tokens` (BERT4Rec's [MASK])
        self.item_embedding = nn.Embedding(n_items + 1 + extra_tokens, config.hidden_dim, padding_idx=PAD_INDEX)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(config.hidden_dim, config.num_heads, config.dropout)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_dim)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[PAD_INDEX].zero_()

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        valid = sequence != PAD_INDEX  # [B, L], L <= max_len, rows right-aligned
        # positions count from the right end (the latest item is always max_len - 1), so a batch
        # padded only to its longest row equals the same rows padded to max_len; on Video Games
        # (mean train length 6.8) that skips most of the padding work of a fixed L = 50
        positions = torch.arange(self.max_len - sequence.shape[1], self.max_len)
        x = self.dropout(self.item_embedding(sequence) + self.position_embedding(positions))
        x = x * valid[..., None]
        allowed = attention_allowed(valid, self.causal)
        for block in self.blocks:
            x = block(x, allowed) * valid[..., None]
        return self.final_norm(x) * valid[..., None]  # h: [B, L, D]


def batch_length(rows: Sequence[Sequence[int]], max_len: int) -> int:
    """Pad a batch to its longest row (at least 1), capped at max_len."""
    return max(1, min(max_len, max((len(r) for r in rows), default=1)))


def length_bucketed_batches(rows: Sequence[Sequence[int]], batch_size: int,
                            rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches of rows of similar length, in random order.

    Rows are sorted by (length, a fresh random key), cut into batches, and the batches shuffled:
    every row is seen once per epoch, and a batch pads to its own longest row. On Video Games
    (train lengths mean 6.8, max 50+) random batches padded to ~50 almost always.
    """
    lengths = np.array([len(r) for r in rows])
    order = np.lexsort((rng.random(len(rows)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class _SequentialBaseline:
    """Shared training loop: shuffled user batches, validation each epoch, best epoch kept."""

    name = "sequential"
    grid: dict = {}

    def __init__(self, config: SequentialConfig | None = None, **overrides):
        self.config = replace(config or SequentialConfig(), **overrides)
        self.model: nn.Module | None = None
        self.items: ItemCatalog | None = None

    # subclasses: build the network, a batch's loss, and the state that scores candidates
    def _build(self, n_items: int) -> nn.Module:
        raise NotImplementedError

    def _batch_loss(self, rows: list[list[int]], gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _query_states(self, histories: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def _candidate_logits(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, train: TrainingData, valid: Sequence[LabeledRequest] = ()) -> FitReport:
        cfg = self.config
        gen, rng = seed_everything(cfg.seed)
        self.items = train.items
        self.model = self._build(len(train.items))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        users = sorted(train.sequences)
        rows = [train.items.indices(train.sequences[u]) for u in users]
        rows = [r for r in rows if len(r) >= 2]  # one item alone has nothing to predict from
        if not rows:
            raise InputError("sequences", "no user has two or more training items",
                             "sequential models need histories of length >= 2")
        stopper = EarlyStopping(cfg.patience)
        report = FitReport(self.name, cfg.metric, config=asdict(cfg))
        with Stopwatch() as watch:
            for epoch in range(cfg.max_epochs):
                self.model.train()
                for batch_index in length_bucketed_batches(rows, cfg.batch_size, rng):
                    batch = [rows[i] for i in batch_index]
                    loss = self._batch_loss(batch, gen)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if valid and stopper.validate(epoch, self.name, self.score, valid, cfg.metric, self.model):
                    break
            stopper.restore(self.model)
        return stopper.fill(report, validated=bool(valid), max_epochs=cfg.max_epochs, seconds=watch.seconds)

    @torch.no_grad()
    def score(self, requests: Sequence[RankingRequest], batch_size: int = 512) -> np.ndarray:
        """[n_requests, K] scores aligned with each request's candidate list."""
        if self.model is None or self.items is None:
            raise RuntimeError(f"{self.name}.score called before fit")
        width = candidate_matrix(requests)
        self.model.eval()
        out = np.empty((len(requests), width), dtype=np.float64)
        unknown = 0
        # score in order of history length so each chunk pads little; rows go back to their slot
        by_length = sorted(range(len(requests)), key=lambda r: len(requests[r].history))
        for start in range(0, len(requests), batch_size):
            slots = by_length[start:start + batch_size]
            chunk = [requests[r] for r in slots]
            histories = [[i for i in self.items.indices(r.history) if i != PAD_INDEX] for r in chunk]
            candidates = torch.tensor([self.items.indices(r.candidate_ids) for r in chunk])  # [b, K]
            logits = self._candidate_logits(self._query_states(histories), candidates).double()
            known = candidates != PAD_INDEX
            unknown += int((~known).sum())
            out[slots] = logits.masked_fill(~known, -math.inf).numpy()
        warn_unknown_candidates(self.name, unknown, out.size)
        return out


class SASRec(_SequentialBaseline):
    name = "sasrec"
    grid = SASREC_GRID

    def _build(self, n_items: int) -> nn.Module:
        self.n_items = n_items
        return ItemSequenceEncoder(n_items, self.config, causal=True)

    def _batch_loss(self, rows, gen):
        length = min(self.config.max_len, max(len(r) for r in rows) - 1)
        inputs = left_padded([r[:-1] for r in rows], length)  # items 0..n-2 predict 1..n-1
        targets = left_padded([r[1:] for r in rows], length)
        states = self.model(inputs)  # [B, L, D]
        valid = targets != PAD_INDEX
        table = self.model.item_embedding.weight
        if self.config.loss == "ce":
            logits = states[valid] @ table[1:self.n_items + 1].T  # [positions, N]
            return F.cross_entropy(logits, targets[valid] - 1)
        negatives = torch.randint(1, self.n_items + 1, targets.shape, generator=gen)
        # one redraw where the negative hit the positive; a remaining hit has probability 1/N^2
        redraw = torch.randint(1, self.n_items + 1, targets.shape, generator=gen)
        negatives = torch.where(negatives == targets, redraw, negatives)
        pos_logit = (states * table[targets]).sum(-1)[valid]
        neg_logit = (states * table[negatives]).sum(-1)[valid]
        return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))

    def _query_states(self, histories):
        return self.model(left_padded(histories, batch_length(histories, self.config.max_len)))[:, -1]  # [b, D]

    def _candidate_logits(self, states, candidates):
        return (states[:, None, :] * self.model.item_embedding(candidates)).sum(-1)


class ClozeHead(nn.Module):
    """BERT4Rec's output layer: GELU projection, then logits tied to the item embedding + bias."""

    def __init__(self, dim: int, n_items: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.bias = nn.Parameter(torch.zeros(n_items + 1))

    def forward(self, states: torch.Tensor, table: torch.Tensor, items: torch.Tensor | None = None):
        h = self.project(states)
        if items is None:  # all items: [P, N + 1] over indices 0..N (0 masked off by the caller)
            return h @ table.T + self.bias
        return (h[:, None, :] * table[items]).sum(-1) + self.bias[items]  # [b, K]


class _Bert4RecNetwork(nn.Module):
    def __init__(self, n_items: int, config: SequentialConfig):
        super().__init__()
        self.encoder = ItemSequenceEncoder(n_items, config, causal=False, extra_tokens=1)
        self.head = ClozeHead(config.hidden_dim, n_items)
        self.n_items = n_items

    def item_table(self) -> torch.Tensor:
        return self.encoder.item_embedding.weight[:self.n_items + 1]


def cloze_mask(inputs: torch.Tensor, mask_prob: float, last_item_fraction: float,
               gen: torch.Generator) -> torch.Tensor:
    """Boolean [B, L]: which real positions to replace by [MASK] for Cloze training.

    Each real item is masked with probability `mask_prob`; a row left with none masks its last
    item; a fraction `last_item_fraction` of rows masks only its last item (inference's shape).
    Padding is never masked.
    """
    valid = inputs != PAD_INDEX
    masked = (torch.rand(inputs.shape, generator=gen) < mask_prob) & valid
    last_only = torch.rand(inputs.shape[0], generator=gen) < last_item_fraction
    empty = ~masked.any(1)
    last = torch.zeros_like(masked)
    last[:, -1] = valid[:, -1]  # right-aligned rows: the last column is the latest item
    return torch.where((last_only | empty)[:, None], last, masked)


class BERT4Rec(_SequentialBaseline):
    name = "bert4rec"
    grid = BERT4REC_GRID

    def _build(self, n_items: int) -> nn.Module:
        self.mask_index = n_items + 1
        return _Bert4RecNetwork(n_items, self.config)

    def _batch_loss(self, rows, gen):
        cfg = self.config
        items = left_padded(rows, batch_length(rows, cfg.max_len))
        masked = cloze_mask(items, cfg.mask_prob, cfg.last_item_mask_fraction, gen)
        states = self.model.encoder(items.masked_fill(masked, self.mask_index))
        logits = self.model.head(states[masked], self.model.item_table())  # [P, N + 1]
        logits[:, PAD_INDEX] = -math.inf
        return F.cross_entropy(logits, items[masked])

    def _query_states(self, histories):
        keep = self.config.max_len - 1  # room for the appended [MASK]
        rows = [h[-keep:] + [self.mask_index] for h in histories]
        return self.model.encoder(left_padded(rows, batch_length(rows, self.config.max_len)))[:, -1]

    def _candidate_logits(self, states, candidates):
        return self.model.head(states, self.model.item_table(), candidates)
