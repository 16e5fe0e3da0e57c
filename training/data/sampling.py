"""Seeded splits and negative sampling.

Every random choice draws from its own stream of numpy's SeedSequence([seed, stream]), so adding
a new random step never changes the draws of an existing one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

STREAM_SEARCH_SPLIT = 1
STREAM_NEGATIVES = 2

SEARCH_FRACTIONS = (0.8, 0.1, 0.1)


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def leave_one_out(sequence_lengths: np.ndarray, positions: np.ndarray,
                  owner: np.ndarray) -> np.ndarray:
    """Split label per interaction: 0 train, 1 valid, 2 test.

    The last interaction of a user is test and the second to last valid, as long as at least one
    interaction stays in train before it: a user with 2 interactions gets train + test, a user
    with 1 only train (there is no history to predict from).
    """
    n = sequence_lengths[owner]
    labels = np.zeros(len(positions), dtype=np.int8)
    labels[(positions == n - 1) & (n >= 2)] = 2
    labels[(positions == n - 2) & (n >= 3)] = 1
    return labels


def search_split(n_items: int, seed: int) -> np.ndarray:
    """Split label per item (0 train, 1 valid, 2 test), 80/10/10 of a seeded permutation
    (rounded: train = round(0.8 n), valid = round(0.1 n), test the rest)."""
    order = rng_for(seed, STREAM_SEARCH_SPLIT).permutation(n_items)
    n_train = int(round(SEARCH_FRACTIONS[0] * n_items))
    n_valid = int(round(SEARCH_FRACTIONS[1] * n_items))
    labels = np.full(n_items, 2, dtype=np.int8)
    labels[order[:n_train]] = 0
    labels[order[n_train:n_train + n_valid]] = 1
    return labels


# Draws per instance and per round of the vectorised rejection sampler: 2x the negatives
# leaves a shortfall only for users who saw a large share of the catalog (handled exactly).
_OVERDRAW = 2
_BLOCK = 16_384  # instances per block: ~20 MB of temporaries for 9 negatives


def sample_candidates(instance_users: np.ndarray, targets: np.ndarray, seen_keys: np.ndarray,
                      n_items: int, count: int, seed: int
                      ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Negatives and shuffled candidate lists for held-out instances, block by block.

    instance_users[j], targets[j]: the user and target item of instance j. seen_keys: sorted
    user * n_items + item of every interaction, so "never interacted" is one searchsorted.
    Negatives are uniform over the user's unseen items, without repeats. Yields, for each block
    of instances in order, (block, negatives [B, count], candidates [B, count + 1]) where the
    candidates are the target and its negatives in a random order; rows are padded with -1 at
    the end when the user has fewer than `count` unseen items.
    """
    rng = rng_for(seed, STREAM_NEGATIVES)
    for start in range(0, len(instance_users), _BLOCK):
        block = slice(start, min(start + _BLOCK, len(instance_users)))
        negatives = _sample_block(rng, instance_users[block], seen_keys, n_items, count)
        pool = np.concatenate([targets[block, None].astype(np.int64), negatives], axis=1)
        sort_keys = rng.random(pool.shape)
        sort_keys[pool < 0] = np.inf  # padding stays at the end
        order = np.argsort(sort_keys, axis=1, kind="stable")
        yield block, negatives, np.take_along_axis(pool, order, axis=1)


def _sample_block(rng: np.random.Generator, users: np.ndarray, seen_keys: np.ndarray,
                  n_items: int, count: int) -> np.ndarray:
    out = np.full((len(users), count), -1, dtype=np.int64)
    if count == 0 or len(users) == 0:
        return out
    draws = rng.integers(0, n_items, size=(len(users), _OVERDRAW * count + 2))
    keys = users[:, None].astype(np.int64) * n_items + draws
    where = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
    valid = seen_keys[where] != keys
    # A repeat of an earlier draw in the same row is not valid (stable sort keeps the first).
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros_like(valid)
    np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
    valid &= ~repeat
    taken = np.cumsum(valid, axis=1)
    complete = taken[:, -1] >= count
    pick = valid & (taken <= count) & complete[:, None]
    out[complete] = draws[pick].reshape(-1, count)
    for row in np.flatnonzero(~complete).tolist():
        out[row] = _sample_exact(rng, int(users[row]), seen_keys, n_items, count)
    return out


def _sample_exact(rng: np.random.Generator, user: int, seen_keys: np.ndarray, n_items: int,
                  count: int) -> np.ndarray:
    """Negatives from the explicit complement of the user's items (dense users)."""
    lo, hi = np.searchsorted(seen_keys, [user * n_items, (user + 1) * n_items])
    unseen = np.setdiff1d(np.arange(n_items), seen_keys[lo:hi] - user * n_items)
    chosen = rng.choice(unseen, size=min(count, len(unseen)), replace=False)
    return np.concatenate([chosen, np.full(count - len(chosen), -1)])
