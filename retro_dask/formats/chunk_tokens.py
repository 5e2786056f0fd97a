"""The tokens of database chunks and of their continuations, read from the corpora through chunks.zarr."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..plan.chunks import continuation_rows
from .indexed_dataset import open_dataset


def neighbor_tokens(neighbors: np.ndarray, chunk_table: Callable[[np.ndarray], np.ndarray], n_chunks: int,
                    retrieved: int, prefixes: Sequence[str], chunk_length: int, pad: int):
    """For neighbour rows ``[..., K]`` of chunks.zarr: the rows of each neighbour and its continuations
    ``[..., K, retrieved]`` (-1 past its document, or where the neighbour is missing) and their tokens
    ``[..., K, retrieved * chunk_length]``, padded with ``pad``.

    ``chunk_table(ids)`` gives the chunks.zarr rows of sorted unique ids.
    """
    rows = continuation_rows(neighbors, chunk_table, n_chunks, retrieved)
    tokens = np.full(rows.shape + (chunk_length,), pad, dtype=np.int64)
    valid = rows >= 0
    if valid.any():
        ids = np.unique(rows[valid])
        by_id = {int(r): t for r, t in zip(ids, chunk_table(ids))}
        for idx in zip(*np.nonzero(valid)):
            d, doc, s, e, _ = by_id[int(rows[idx])]
            tokens[idx][: e - s] = open_dataset(prefixes[int(d)]).get(int(doc), int(s), int(e - s))
    return rows, tokens.reshape(rows.shape[:-1] + (-1,))
