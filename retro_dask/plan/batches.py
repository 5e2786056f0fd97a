"""Batches for a padded model: items sorted by length, cut where padding and calls cost least."""

from __future__ import annotations

import numpy as np


def length_batches(lengths: np.ndarray, max_batch: int, batch_cost: float,
                   max_tokens: int | None = None) -> list[np.ndarray]:
    """Split items into batches for a padded model: sorted by length, cut where it pays.

    A batch of ``n`` items costs ``n * (longest length) + batch_cost`` (padded
    tokens, plus a fixed cost per model call, in tokens). A dynamic program over
    the sorted lengths finds the cuts of least total cost with at most
    ``max_batch`` items and at most ``max_tokens`` padded tokens per batch:
    long runs of equal lengths become full batches, and the sparse tails of the
    distribution are not padded to their neighbours' length. Returns item
    indices per batch.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    s = np.asarray(lengths, dtype=np.float64)[order]
    n = len(s)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        width = max(1, min(max_batch, int(max_tokens // s[j - 1]) if max_tokens else max_batch))
        i = np.arange(max(0, j - width), j)
        cost = best[i] + s[j - 1] * (j - i) + batch_cost
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = int(cut[j])
    return batches[::-1]
