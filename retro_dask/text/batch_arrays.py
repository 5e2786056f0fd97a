"""A padded batch of BERT's in numpy: its inputs, and Megatron's pooling of its last hidden states.

:func:`pad_batch` right-pads ``[CLS] ... [SEP]`` id lists into token ids and an
attention mask. :func:`mean_pool` takes the mean over a chunk's WordPiece
tokens: a row of ``length`` real tokens is ``[CLS] w_1 ... w_k [SEP]`` then padding;
its embedding is the mean of the hidden states at positions 1 .. length-2
([CLS] and [SEP] left out), in float32; a row with no WordPiece token (an
empty chunk) pools to zeros.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``[rows, longest]`` token ids (right-padded with ``pad_id``) and attention mask of id lists."""
    width = max(len(x) for x in ids)
    batch = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for r, x in enumerate(ids):
        batch[r, : len(x)], mask[r, : len(x)] = x, 1
    return batch, mask


def pool_weights(lengths: np.ndarray, width: int) -> np.ndarray:
    """float32 ``[rows, width]``: 1 at the WordPiece positions of each row, 0 at [CLS], [SEP] and padding."""
    positions = np.arange(width)
    return ((positions >= 1) & (positions < np.asarray(lengths)[:, None] - 1)).astype(np.float32)


def mean_pool(hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The pooled float32 embeddings ``[rows, d]`` of hidden states ``[rows, width, d]``."""
    weights = pool_weights(lengths, hidden.shape[1])
    summed = np.matmul(weights[:, None, :], hidden.astype(np.float32, copy=False))[:, 0]
    return summed / np.maximum(weights.sum(1, keepdims=True), 1.0)
