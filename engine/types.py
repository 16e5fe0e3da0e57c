"""Small typed objects at the engine boundary: Request in, RankedResult out, EngineStats counters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

from .errors import InputError

# Reranker.score / rank `normalize`: a candidate's summed token log-likelihood, that per token, or
# that minus the title's own log-likelihood under an empty instruction (its prior: "calibrated").
# "calibrated:W" subtracts W times the prior: W = 1 is "calibrated", 0 the sum, and a negative W
# adds the prior, which favours the titles the model generates whatever it is asked (the most
# frequent training targets, close to popularity). W is a setting chosen on validation.
# Any of them may end in "+priors:V": the list's scores fused with the request's `candidate_priors`
# (engine/fusion.py: standardised score + V x standardised prior), as `instructrec eval`'s
# instructrec+popularity method fuses popularity.
NORMALIZE_CHOICES = ("sum", "mean", "calibrated")
PRIORS_SUFFIX = "+priors:"

__all__ = ["Request", "RankedResult", "EngineStats", "NORMALIZE_CHOICES", "PRIORS_SUFFIX", "ScoreForm",
           "parse_score_form"]


class ScoreForm(NamedTuple):
    """A parsed `normalize` value: its kind (one of NORMALIZE_CHOICES), for "calibrated" the weight
    of the title prior it subtracts, and the weight of the request's `candidate_priors` fused into
    the scores ("+priors:V"; 0: no fusion, and no priors needed)."""

    kind: str
    prior_weight: float = 0.0
    candidate_prior_weight: float = 0.0


def parse_score_form(value: str, field: str = "normalize") -> ScoreForm:
    """"sum", "mean", "calibrated" or "calibrated:W" (W a finite number), optionally followed by
    "+priors:V" (V a finite number >= 0) -> ScoreForm; anything else is an InputError naming `field`."""
    fix = ('use sum, mean, calibrated, or calibrated:W to subtract W times the title prior (e.g. '
           'calibrated:0.5; a negative W adds it), optionally followed by +priors:V to fuse the '
           "requests' candidate_priors with weight V >= 0 (e.g. calibrated:0.5+priors:2)")
    if not isinstance(value, str):
        raise InputError(field, f"unknown score form {value!r}", fix)
    base, plus, fused_text = value.partition(PRIORS_SUFFIX)
    fused = 0.0
    if plus:
        try:
            fused = float(fused_text)
        except ValueError:
            raise InputError(field, f"{value!r}: the candidate prior weight {fused_text!r} is not a number",
                             fix) from None
        if not (math.isfinite(fused) and fused >= 0):
            raise InputError(field, f"{value!r}: the candidate prior weight must be finite and >= 0", fix)
    form = _parse_base_form(value, base, field, fix)
    return form._replace(candidate_prior_weight=fused)


def _parse_base_form(value: str, base: str, field: str, fix: str) -> ScoreForm:
    kind, colon, weight_text = base.partition(":")
    if kind not in NORMALIZE_CHOICES or (colon and kind != "calibrated"):
        raise InputError(field, f"unknown score form {value!r}", fix)
    if kind != "calibrated":
        return ScoreForm(kind)
    if not colon:
        return ScoreForm(kind, 1.0)
    try:
        weight = float(weight_text)
    except ValueError:
        raise InputError(field, f"{value!r}: the prior weight {weight_text!r} is not a number", fix) from None
    if not math.isfinite(weight):
        raise InputError(field, f"{value!r}: the prior weight must be finite", fix)
    return ScoreForm(kind, weight)


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
    # One number per candidate (popularity as log(1 + interactions), a margin, ...), fused into the
    # scores by a score form ending in "+priors:V"; ignored by the other forms.
    candidate_priors: Sequence[float] | None = None


@dataclass
class RankedResult:
    """Candidates best first. `scores` are aligned with `ranked_ids`: log P(title | instruction)
    (or its per-token mean). Scored directly (one encoding) they are descending. After a grouped
    tournament each score is the one from the candidate's last round, under that round's group
    instruction, so scores are descending only within candidates eliminated in the same round;
    the order of `ranked_ids` is the ranking. Under a "+priors:V" form the scores are the fused
    values of engine/fusion.py (standardised within each list or group), not log-likelihoods.
    On error: `error` and `error_kind` set, lists empty."""

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
