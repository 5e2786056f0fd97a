"""Megatron's pooling of BERT's last hidden states: the mean over a chunk's WordPiece tokens.

A row of ``length`` real tokens is ``[CLS] w_1 ... w_k [SEP]`` then padding;
its embedding is the mean of the hidden states at positions 1 .. length-2
([CLS] and [SEP] left out), in float32; a row with no WordPiece token (an
empty chunk) pools to zeros.
"""

from __future__ import annotations

import numpy as np


def pool_weights(lengths: np.ndarray, width: int) -> np.ndarray:
    """float32 ``[rows, width]``: 1 at the WordPiece positions of each row, 0 at [CLS], [SEP] and padding."""
    positions = np.arange(width)
    return ((positions >= 1) & (positions < np.asarray(lengths)[:, None] - 1)).astype(np.float32)


def mean_pool(hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The pooled float32 embeddings ``[rows, d]`` of hidden states ``[rows, width, d]``."""
    weights = pool_weights(lengths, hidden.shape[1])
    summed = np.matmul(weights[:, None, :], hidden.astype(np.float32, copy=False))[:, 0]
    return summed / np.maximum(weights.sum(1, keepdims=True), 1.0)
