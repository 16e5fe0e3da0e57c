"""Iterative k-core of a user-item interaction graph."""

from __future__ import annotations

import numpy as np


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Indices of the interactions in the k-core, and the number of filtering rounds.

    The standard definition: drop every user and every item with fewer than k interactions,
    and repeat until each remaining user and item has at least k. Each (user, item) pair must
    appear once (de-duplicate first). users and items are non-negative integer ids.
    """
    keep = np.arange(len(users))
    if k <= 1 or len(keep) == 0:
        return keep, 0
    u, i = users, items
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    rounds = 0
    while True:
        user_degree = np.bincount(u, minlength=n_users)
        item_degree = np.bincount(i, minlength=n_items)
        mask = (user_degree[u] >= k) & (item_degree[i] >= k)
        rounds += 1
        if mask.all():
            return keep, rounds
        keep, u, i = keep[mask], u[mask], i[mask]
        if len(keep) == 0:
            return keep, rounds
