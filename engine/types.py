"""Small typed objects at the engine boundary: Request in, RankedResult out, EngineStats counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

# Reranker.score / rank `normalize`: a candidate's summed token log-likelihood, that per token, or
# that minus the title's own log-likelihood under an empty instruction (its prior: "calibrated").
NORMALIZE_CHOICES = ("sum", "mean", "calibrated")

__all__ = ["Request", "RankedResult", "EngineStats", "NORMALIZE_CHOICES"]


@dataclass
class Request:
    """One ranking request: a free `instruction` (where `{candidates}` is replaced by the numbered
    candidate list of each tournament group) or the structured fields formatted through a
    template, plus candidate titles with optional ids (default: positions "0", "1", ...)."""

    instruction: str | None = None
    candidates: Sequence[str] = ()
    candidate_ids: Sequence[str] | None = None
    request_id: str | None = None
    history: Sequence[str] | None = None
    preference: str | None = None
    intention: str | None = None
    intention_kind: str | None = None  # "vague" | "specific"
    context: str | None = None
    template: str | None = None


@dataclass
class RankedResult:
    """Candidates best first. `scores` are aligned with `ranked_ids`: log P(title | instruction)
    (or its per-token mean). Scored directly (one encoding) they are descending. After a grouped
    tournament each score is the one from the candidate's last round, under that round's group
    instruction, so scores are descending only within candidates eliminated in the same round;
    the order of `ranked_ids` is the ranking. On error: `error` and `error_kind` set, lists empty."""

    request_id: str | None
    ranked_ids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    n_candidates: int = 0
    error: str | None = None
    error_kind: str | None = None


@dataclass
class EngineStats:
    """Work counters. `padded_decoder_tokens` counts every decoder slot computed, padding included
    (so padding = padded_decoder_tokens - decoder_tokens); likewise for the encoder."""

    requests: int = 0
    candidates: int = 0  # candidate scorings: a tournament candidate counts once per round it plays
    encoder_passes: int = 0  # one per instruction encoding (per request, or per tournament group)
    encoder_tokens: int = 0
    padded_encoder_tokens: int = 0
    decoder_tokens: int = 0
    padded_decoder_tokens: int = 0
    batches: int = 0  # encoder batches
    decoder_passes: int = 0  # a batch whose rows exceed the token budget is decoded in several
    title_priors: int = 0  # titles whose prior was scored (normalize="calibrated"; cache misses)

    @property
    def decoder_padding_fraction(self) -> float:
        return 1.0 - self.decoder_tokens / self.padded_decoder_tokens if self.padded_decoder_tokens else 0.0

    def as_dict(self) -> dict:
        return asdict(self)
