"""Iterative k-core against a brute-force reference on random bipartite graphs."""

from __future__ import annotations

import numpy as np
import pytest

from instructrec.training.data.kcore import k_core


def brute_force_k_core(edges: set[tuple[int, int]], k: int) -> set[tuple[int, int]]:
    """The definition, literally: remove under-k users and items until nothing changes."""
    while True:
        user_degree: dict[int, int] = {}
        item_degree: dict[int, int] = {}
        for u, i in edges:
            user_degree[u] = user_degree.get(u, 0) + 1
            item_degree[i] = item_degree.get(i, 0) + 1
        kept = {(u, i) for u, i in edges if user_degree[u] >= k and item_degree[i] >= k}
        if kept == edges:
            return kept
        edges = kept


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    n_users, n_items = rng.integers(5, 60), rng.integers(5, 40)
    density = rng.uniform(0.02, 0.3)
    mask = rng.random((n_users, n_items)) < density
    users, items = np.nonzero(mask)
    order = rng.permutation(len(users))  # file order is arbitrary
    users, items = users[order].astype(np.int32), items[order].astype(np.int32)

    kept, rounds = k_core(users, items, k)
    got = {(int(users[j]), int(items[j])) for j in kept}
    assert got == brute_force_k_core(set(zip(users.tolist(), items.tolist())), k)
    assert np.all(np.diff(kept) > 0)  # indices in input order
    if got:
        degrees_u = np.bincount(users[kept])
        degrees_i = np.bincount(items[kept])
        assert degrees_u[degrees_u > 0].min() >= k and degrees_i[degrees_i > 0].min() >= k


def test_cascade_needs_several_rounds():
    # A chain: removing item 2 (degree 1) drops user 1 below 2, which drops item 1, ...
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3], dtype=np.int32)
    items = np.array([0, 1, 1, 2, 3, 4, 3, 4, 0], dtype=np.int32)
    kept, rounds = k_core(users, items, 2)
    assert {(int(users[j]), int(items[j])) for j in kept} == {(2, 3), (2, 4), (3, 3), (3, 4)}
    assert rounds >= 3


def test_empty_and_trivial():
    empty = np.array([], dtype=np.int32)
    assert len(k_core(empty, empty, 5)[0]) == 0
    users = np.array([0, 1], dtype=np.int32)
    assert k_core(users, users, 1)[0].tolist() == [0, 1]
    assert len(k_core(users, users, 2)[0]) == 0
