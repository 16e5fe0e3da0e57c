"""Unique request ids in bounded memory.

Request ids must be unique: results are joined back by id. A first pass over the input reads only
the `request_id` column, and every occurrence of a repeated id becomes an error row (picking "the
first" would make a join on request_id silently ambiguous; the rule needs no row order, so every
runner applies it identically).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from .job_input import JobInput, iter_record_batches

__all__ = ["RequestIdSet", "find_duplicate_request_ids"]


class RequestIdSet:
    """Set of request ids stored as 128-bit BLAKE2b digests: 16 bytes per id once merged.

    A Python set of a million short strings costs ~90 MB; this costs ~16 MB, so memory stays
    nearly flat as inputs grow. At 128 bits a false "seen" needs ~2^64 ids (birthday bound).
    Recent ids live in a small Python set; every `merge_every` ids they are merged into two
    uint64 arrays sorted by (hi, lo) and looked up with a vectorised binary search.
    """

    def __init__(self, merge_every: int = 1 << 16):
        self._hi = np.empty(0, np.uint64)
        self._lo = np.empty(0, np.uint64)
        self._recent: set[int] = set()
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)

    @staticmethod
    def _digest(request_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=16).digest(), "little")

    def _in_sorted(self, digests: list[int]) -> np.ndarray:
        found = np.zeros(len(digests), bool)
        if not len(self._hi) or not digests:
            return found
        hi = np.fromiter((d >> 64 for d in digests), np.uint64, len(digests))
        lo = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), np.uint64, len(digests))
        start = np.searchsorted(self._hi, hi, side="left")
        inside = start < len(self._hi)
        candidate = np.zeros(len(digests), bool)
        candidate[inside] = self._hi[start[inside]] == hi[inside]
        for i in np.flatnonzero(candidate):  # equal high halves: rare, scan the run
            j = start[i]
            while j < len(self._hi) and self._hi[j] == hi[i]:
                if self._lo[j] == lo[i]:
                    found[i] = True
                    break
                j += 1
        return found

    def _merge(self) -> None:
        recent = list(self._recent)
        hi = np.concatenate([self._hi, np.fromiter((d >> 64 for d in recent), np.uint64, len(recent))])
        lo = np.concatenate([self._lo, np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in recent), np.uint64, len(recent))])
        order = np.lexsort((lo, hi))
        self._hi, self._lo = hi[order], lo[order]
        self._recent.clear()

    def add_many(self, request_ids: Sequence[str]) -> list[bool]:
        """Add ids in order; for each, whether it had been seen before (earlier or in this call)."""
        digests = [self._digest(r) for r in request_ids]
        in_sorted = self._in_sorted(digests)
        seen = []
        for digest, old in zip(digests, in_sorted):
            if old or digest in self._recent:
                seen.append(True)
            else:
                self._recent.add(digest)
                seen.append(False)
        if len(self._recent) >= self._merge_every:
            self._merge()
        return seen


def find_duplicate_request_ids(job_input: JobInput) -> dict[str, int]:
    """{request_id: occurrences} for every non-empty id that occurs more than once.

    Reads only the request_id column. Memory: 16 bytes per distinct id plus the duplicates.
    """
    seen_ids = RequestIdSet()
    duplicates: Counter[str] = Counter()
    for _, batch in iter_record_batches(job_input, ["request_id"]):
        ids = [r for r in batch.column(0).to_pylist() if r]  # null/empty ids are their own error
        for request_id, seen in zip(ids, seen_ids.add_many(ids)):
            if seen:
                duplicates[request_id] += 1
    return {request_id: count + 1 for request_id, count in duplicates.items()}
