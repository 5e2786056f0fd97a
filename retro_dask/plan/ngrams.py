"""Token n-gram overlap between a chunk and its neighbours: the RETRO paper's leakage measure.

The overlap of a chunk with a neighbour is the share of the chunk's GPT-2
13-grams that also occur in the neighbour's tokens (chunk and continuation),
n-grams holding the padding token left out on both sides. RETRO reports
evaluation results as a function of it; a chunk whose neighbours hold most of
its 13-grams is largely copied from the retrieval database.
"""

from __future__ import annotations

import numpy as np

NGRAM = 13
_MULT = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant: a multiplicative hash of token runs


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM, pad: int | None = None) -> np.ndarray:
    """``[..., L - n + 1]`` uint64 hashes of the n-grams along the last axis, 0 where an n-gram holds ``pad``.

    A polynomial hash over the tokens: equal n-grams have equal hashes, and two
    different ones collide with probability about 2**-64.
    """
    tokens = np.asarray(tokens)
    if tokens.shape[-1] < n:
        return np.zeros(tokens.shape[:-1] + (0,), np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64) + np.uint64(1), n, axis=-1)
    h = np.zeros(windows.shape[:-1], np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _MULT + windows[..., i]
    h[h == 0] = 1  # 0 marks "no n-gram"
    if pad is not None:
        has_pad = np.lib.stride_tricks.sliding_window_view(tokens == pad, n, axis=-1).any(-1)
        h[has_pad] = 0
    return h


def overlap_shares(chunks: np.ndarray, neighbors: np.ndarray, pad: int, n: int = NGRAM) -> np.ndarray:
    """``[rows, K]`` float32: the share of each chunk's n-grams found in each of its neighbours.

    ``chunks``: int ``[rows, L]`` tokens; ``neighbors``: int ``[rows, K, M]``
    tokens of each neighbour (chunk and continuation, padded with ``pad``). A
    chunk without an n-gram (all padding) has overlap 0; so does a neighbour
    that is all padding (a missing one).
    """
    rows, k = neighbors.shape[:2]
    mine = ngram_hashes(chunks, n, pad)                       # [rows, G]
    theirs = ngram_hashes(neighbors, n, pad)                  # [rows, K, H]
    out = np.zeros((rows, k), np.float32)
    if mine.shape[-1] == 0 or theirs.shape[-1] == 0:
        return out
    counts = (mine != 0).sum(-1)
    # One sorted search per row for all its neighbours: tag each hash with the neighbour it came from.
    for r in np.flatnonzero(counts):
        grams = mine[r][mine[r] != 0]
        table = np.sort(theirs[r], axis=-1)                   # [K, H]
        pos = np.stack([np.searchsorted(t, grams) for t in table])
        found = np.take_along_axis(table, np.minimum(pos, table.shape[-1] - 1), axis=-1) == grams
        out[r] = found.sum(-1) / len(grams)
    return out
