"""Fusing the model's scores with a per-candidate prior the caller supplies (`candidate_priors`).

A tuned model ranks titles by what the instruction says; a catalogue prior (popularity, a margin,
a business rule as a number) says what is likely regardless. `instructrec eval` measures the two
fused as the `instructrec+popularity` method, and the batch job serves the same fusion with a
`candidate_priors` column and a score form ending in `+priors:W` (engine/types.py). Both read
this module, so on lists scored directly the job computes what evaluation measured (a grouped
tournament fuses within each group, where evaluation fuses its final positions).

Each list (a request's candidates, or one tournament group) is fused on its own:
standardised(score) + W x standardised(prior). Standardising within the list makes one W serve
every score form (a summed log-likelihood spans tens of nats, a per-token mean a few) and every
prior scale; W = 0 ranks as the model alone, a large W as the prior with the model breaking ties.
"""

from __future__ import annotations

import numpy as np

__all__ = ["standardised", "fuse_priors"]


def standardised(values: np.ndarray) -> np.ndarray:
    """`values` with mean 0 and standard deviation 1 (all zeros where they are all equal)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.max() > values.min():  # the mean of equal values can round off them: a std of ~1e-16
        return np.zeros_like(values, dtype=np.float64)
    return (values - values.mean()) / values.std()


def fuse_priors(scores: np.ndarray, priors: np.ndarray, weight: float) -> np.ndarray:
    """One list's model scores fused with its candidates' priors (same length): standardised(scores)
    + weight x standardised(priors). `weight` finite and >= 0 (ValueError otherwise)."""
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(f"prior weight must be finite and >= 0, got {weight!r}")
    scores, priors = np.asarray(scores, dtype=np.float64), np.asarray(priors, dtype=np.float64)
    if scores.shape != priors.shape:
        raise ValueError(f"{priors.shape} priors for scores of shape {scores.shape}")
    return standardised(scores) + weight * standardised(priors)
