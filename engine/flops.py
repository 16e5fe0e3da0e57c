"""Matrix-product FLOPs of T5 work, counted from a model's shape and real token counts: the one
count the engine's users (training's utilisation figure) and the benchmarks (bench/flops.py) share.

Only matrix products are counted (2*m*n*k each), as torch.utils.flop_counter does: projections,
attention scores and mixing, feed-forward, LM head. Norms, softmax, the relative position bias
and embedding lookups are left out (well under 1% of the total at these shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Iterable, Mapping

__all__ = ["T5Shape", "FlopCount", "encoding_flops", "training_flops"]


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_ff: int
    heads: int
    d_kv: int
    encoder_layers: int
    decoder_layers: int
    vocab: int
    gated: bool

    @classmethod
    def from_config(cls, config: Mapping) -> "T5Shape":
        """From a T5 config.json dict (e.g. `instructrec.engine.presets.shape_config(name)`)."""
        return cls(d_model=config["d_model"], d_ff=config["d_ff"], heads=config["num_heads"], d_kv=config["d_kv"],
                   encoder_layers=config["num_layers"],
                   decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
                   vocab=config["vocab_size"],
                   gated=str(config.get("feed_forward_proj", "relu")).startswith("gated"))

    @property
    def inner(self) -> int:
        return self.heads * self.d_kv

    @property
    def ffn_per_token(self) -> int:
        return 2 * self.d_model * self.d_ff * (3 if self.gated else 2)  # wi_0, wi_1, wo (gated) or wi, wo


@dataclass
class FlopCount:
    """Matmul FLOPs by part (their sum is `total`)."""

    encoder: float = 0.0
    cross_kv: float = 0.0
    decoder: float = 0.0
    head: float = 0.0

    @property
    def total(self) -> float:
        return self.encoder + self.cross_kv + self.decoder + self.head

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.encoder + other.encoder, self.cross_kv + other.cross_kv,
                         self.decoder + other.decoder, self.head + other.head)

    def as_dict(self) -> dict:
        return {"encoder": self.encoder, "cross_kv": self.cross_kv, "decoder": self.decoder, "head": self.head,
                "total": self.total}


def encoding_flops(shape: T5Shape, source_len: int, target_lens: Iterable[int], *, causal: bool = True,
                   head_tokens: int | None = None) -> FlopCount:
    """One encoder pass over `source_len` tokens, its cross-attention K/V, and each target decoded
    on its own (`causal`: position i attends i keys; else all n, as a dense masked product does).
    `head_tokens`: rows through the LM head (default: every target token)."""
    d, inner, s = shape.d_model, shape.inner, source_len
    projections = 4 * 2 * d * inner  # q, k, v, o
    encoder = shape.encoder_layers * (s * (projections + shape.ffn_per_token) + 2 * 2 * s * s * inner)
    cross_kv = shape.decoder_layers * 2 * 2 * s * d * inner
    decoder = 0.0
    tokens = 0
    for n in target_lens:
        tokens += n
        keys = n * (n + 1) / 2 if causal else n * n  # self-attention (query, key) pairs
        per_layer = (n * (projections + 2 * 2 * d * inner + shape.ffn_per_token)  # self q,k,v,o; cross q,o; FFN
                     + 2 * 2 * keys * inner + 2 * 2 * n * s * inner)  # self and cross scores + mixing
        decoder += shape.decoder_layers * per_layer
    head = 2 * d * shape.vocab * (tokens if head_tokens is None else head_tokens)
    return FlopCount(float(encoder), float(cross_kv), float(decoder), float(head))


def training_flops(shape: T5Shape, source_lens: Iterable[int], target_lens: Iterable[int],
                   negative_lens: Iterable[Iterable[int]] | None = None) -> float:
    """Model FLOPs of one training step over rows (source length, target length): each row's
    forward (its target decoded causally, the head on its real target tokens) times 3 for the
    forward and the two backward products (gradients of inputs and of weights). `negative_lens`
    (`train --rank-negatives`): per row, the decoded lengths of its negatives, each one more
    decoder pass and head over the row's one encoding."""
    forward = 0.0
    for s, n, others in zip(source_lens, target_lens, repeat(()) if negative_lens is None else negative_lens):
        forward += encoding_flops(shape, int(s), [int(n), *(int(m) for m in others)]).total
    return 3.0 * forward
