"""Pretraining samples: Megatron's GPT dataset index maps, as pure functions.

For each split (train, valid, test) and each dataset of the blend, the split's
documents (the same document split as the database: ``plan.split_document_ranges``)
are shuffled once per epoch with the seed and concatenated; samples of
``seq_length + 1`` tokens are cut from that stream, the last token of a sample
being the first of the next; the sample order is shuffled. A blend interleaves
the datasets' samples in proportion to their weights.

The maps (``doc_idx``, ``sample_idx``, ``shuffle_idx`` per dataset; the blend's
``dataset_index``, ``dataset_sample_index``) are computed here from sizes and
settings alone; ``formats/sample_maps.py`` caches them as ``.npy`` under
``W/query/<split>/samples/`` and reads samples through them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .chunks import SPLIT_NAMES, count_tokens, split_document_ranges

# ---------------------------------------------------------------- pure maps


def epoch_samples(n_tokens: int, seq_length: int) -> int:
    """Samples one pass over ``n_tokens`` yields (each needs ``seq_length + 1`` tokens)."""
    return max(0, (int(n_tokens) - 1) // seq_length)


def build_doc_idx(n_docs: int, n_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Document order: a fresh shuffle of ``range(n_docs)`` per epoch, concatenated."""
    if n_docs == 0 or n_epochs == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([rng.permutation(n_docs) for _ in range(n_epochs)]).astype(np.int64)


def build_sample_idx(sizes_in_order: np.ndarray, n_samples: int, seq_length: int) -> np.ndarray:
    """``[n_samples + 1, 2]``: (position in doc_idx, token offset) where each sample starts.

    Sample i spans tokens ``[i * seq_length, i * seq_length + seq_length]`` of
    the concatenated stream (inclusive: ``seq_length + 1`` tokens), so row
    ``i + 1`` is also where sample i ends.
    """
    cum = np.cumsum(np.asarray(sizes_in_order, dtype=np.int64))
    starts = np.arange(n_samples + 1, dtype=np.int64) * seq_length
    if len(cum) == 0 or (n_samples and cum[-1] <= starts[-1]):
        raise ValueError(f"{int(cum[-1]) if len(cum) else 0} tokens cannot hold {n_samples} samples of {seq_length + 1}")
    pos = np.searchsorted(cum, starts, side="right")
    before = np.where(pos > 0, cum[np.maximum(pos - 1, 0)], 0)
    return np.stack([pos, starts - before], axis=1).astype(np.int64)


def build_blend(n_samples: int, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each sample, and that dataset's sample number.

    Dataset k's j-th sample is due at time ``(j + 0.5) / w_k``; samples are
    taken in order of due time (ties to the lower dataset). At any time t a
    dataset has served ``w_k t`` samples to within 0.5, so every prefix of n
    samples holds ``w_k n`` of dataset k to within ``0.5 + K w_k / 2`` (K
    datasets): Megatron's greedy blending, but vectorized.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, which, number = [], [], []
    for k, wk in enumerate(w):
        if wk <= 0:
            continue
        m = int(np.ceil(n_samples * wk)) + 1
        j = np.arange(m, dtype=np.int64)
        times.append((j + 0.5) / wk)
        which.append(np.full(m, k, dtype=np.int64))
        number.append(j)
    t, k, j = np.concatenate(times), np.concatenate(which), np.concatenate(number)
    order = np.lexsort((k, t))[:n_samples]
    return k[order], j[order]


def per_dataset_counts(dataset_index: np.ndarray, n_datasets: int) -> np.ndarray:
    return np.bincount(dataset_index, minlength=n_datasets).astype(np.int64)


@dataclass(frozen=True)
class SplitPlan:
    """What identifies one split's samples (written to ``meta.json``)."""

    split: str
    n_samples: int
    seq_length: int
    chunk_length: int
    seed: int
    weights: tuple[float, ...]
    prefixes: tuple[str, ...]
    doc_ranges: tuple[tuple[int, int], ...]
    split_weights: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "split": self.split, "n_samples": self.n_samples, "seq_length": self.seq_length,
            "chunk_length": self.chunk_length, "seed": self.seed,
            "data_blend": [[w, p] for w, p in zip(self.weights, self.prefixes)],
            "split_weights": list(self.split_weights), "doc_ranges": [list(r) for r in self.doc_ranges],
        }
        d["hash"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
        return d

    @property
    def chunks_per_sample(self) -> int:
        return self.seq_length // self.chunk_length


def split_plan(config, split: str, sizes_of: Sequence[np.ndarray]) -> SplitPlan:
    """The samples of ``split``: how many (``--<split>-samples``, default one epoch) and from where."""
    s = SPLIT_NAMES.index(split)
    ranges = tuple(split_document_ranges(len(sizes), config.chunk.split)[s] for sizes in sizes_of)
    L = config.query.seq_length
    wanted = config.query.samples(split)
    if wanted is None:
        wanted = sum(epoch_samples(count_tokens(sz, a, b), L) for sz, (a, b) in zip(sizes_of, ranges))
    return SplitPlan(split, int(wanted), L, config.chunk.chunk_length, config.chunk.seed,
                     tuple(config.chunk.data.ratios), tuple(config.chunk.data.prefixes), ranges,
                     tuple(config.chunk.split))


def build_split_maps(plan: SplitPlan, sizes_of: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every index map of one split, computed from sizes alone."""
    maps: dict[str, np.ndarray] = {}
    dataset_index, dataset_sample = build_blend(plan.n_samples, plan.weights)
    maps["dataset_index"], maps["dataset_sample_index"] = dataset_index, dataset_sample
    counts = per_dataset_counts(dataset_index, len(plan.weights))
    for k, (sizes, (a, b)) in enumerate(zip(sizes_of, plan.doc_ranges)):
        n_k = int(counts[k])
        rng = np.random.default_rng([plan.seed, SPLIT_NAMES.index(plan.split), k])
        split_sizes = np.asarray(sizes[a:b], dtype=np.int64)
        tokens = int(split_sizes.sum())
        if n_k and tokens < plan.seq_length + 1:
            raise InputError(f"the {plan.split} split of {plan.prefixes[k]} has {tokens} tokens, too few for one sample "
                             f"of {plan.seq_length + 1} tokens")
        n_epochs = 0 if n_k == 0 else int(np.ceil((n_k * plan.seq_length + 1) / tokens))
        local = build_doc_idx(b - a, n_epochs, rng)
        maps[f"doc_idx_{k}"] = local + a
        maps[f"sample_idx_{k}"] = (build_sample_idx(split_sizes[local], n_k, plan.seq_length)
                                   if n_k else np.zeros((1, 2), np.int64))
        maps[f"shuffle_idx_{k}"] = rng.permutation(n_k).astype(np.int64)
    return maps


def check_splits_can_fill(config, facts, sizes_of: Sequence) -> None:
    """Refuse a split whose documents cannot fill one sample although samples are wanted.

    ``facts``: per dataset, its prefix and the document ranges of its splits;
    ``sizes_of``: its document sizes (scanned in windows).
    """
    L = config.query.seq_length
    for s, split in enumerate(SPLIT_NAMES):
        asked = config.query.samples(split)
        if asked == 0 or (asked is None and config.chunk.split[s] == 0):
            continue
        for f, sizes in zip(facts, sizes_of):
            a, b = f.splits[s]
            tokens = count_tokens(sizes, a, b)
            if tokens < L + 1 and (asked or b > a or config.chunk.split[s] > 0):
                raise InputError(
                    f"the {split} split of {f.prefix} has {b - a} documents and {tokens} tokens, which cannot fill "
                    f"even one sample of --seq-length {L} + 1 tokens: lower --seq-length, give {split} more weight "
                    f"in --split (now {','.join(f'{x:g}' for x in config.chunk.split)}), or set --{split}-samples 0"
                )
