"""Pure planning arithmetic for the chunk database.

Everything here is computed from document sizes, counts and settings alone: no
token is read, and nothing here imports Zarr, Faiss or torch. The stages turn
these plans into Dask tasks; the tests check them against brute force.

Vocabulary: a *candidate* chunk is one cut from the document sizes alone
(``ceil(size / chunk_length)`` per document, the last one possibly short). The
workers later trim a trailing end-of-document token and drop candidates whose
text has no BERT token; what survives are the *chunks* of ``chunks.zarr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")

# Documents are scanned in windows of this many so that planning a corpus of
# any size holds a bounded amount of sizes in memory at once.
SIZE_WINDOW = 1 << 16


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """Parse Megatron's ``"98,2,0"`` (or ``"98/2/0"``) into three non-negative weights."""
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip() != ""]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"--split {split!r}: every part must be a number, as in 98,2,0"
            ) from None
    else:
        values = [float(v) for v in split]
    if not 1 <= len(values) <= 3:
        raise ValueError(f"--split {split!r}: give one to three weights (train,valid,test), as in 98,2,0")
    values += [0.0] * (3 - len(values))
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"--split {split!r}: weights must be non-negative numbers with a positive sum")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_document_ranges(n_docs: int, split: Sequence[float]) -> list[tuple[int, int]]:
    """Document ranges ``[start, end)`` of the train, valid and test splits.

    The one rule used both for the retrieval database and for the pretraining
    samples (Megatron rounds one way in its database and another in its GPT
    dataset). It is the GPT dataset's rule: each boundary is the rounded
    cumulative share, and any rounding excess is taken off the last boundaries.
    """
    weights = np.asarray(split, dtype=np.float64)
    weights = weights / weights.sum()
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(n_docs))))
    excess = bounds[-1] - n_docs
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    bounds = [min(max(b, 0), n_docs) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


def candidate_counts(sizes: np.ndarray, chunk_length: int) -> np.ndarray:
    """Candidate chunks per document: ``ceil(size / chunk_length)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return (sizes + (chunk_length - 1)) // chunk_length


def count_tokens(sizes: Sequence[int] | np.ndarray, doc_start: int, doc_end: int) -> int:
    """Tokens of documents ``doc_start:doc_end``, summed a window of ``SIZE_WINDOW`` sizes at a time."""
    return sum(int(np.asarray(sizes[w0 : min(w0 + SIZE_WINDOW, doc_end)], np.int64).sum())
               for w0 in range(doc_start, doc_end, SIZE_WINDOW))


@dataclass(frozen=True)
class BlockStart:
    """Where a block of candidate chunks starts: a dataset, a document, a chunk of it."""

    dataset: int
    document: int
    chunk: int


@dataclass(frozen=True)
class CandidatePlan:
    """The candidate blocks of the whole database, in corpus order."""

    block_size: int
    n_candidates: int
    starts: tuple[BlockStart, ...]
    candidates_per_dataset: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.starts)

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_candidates)


def plan_candidate_blocks(
    datasets: Sequence[tuple[np.ndarray, int, int]],
    chunk_length: int,
    block_size: int,
) -> CandidatePlan:
    """Cut the candidate chunks of several datasets into blocks of ``block_size``.

    ``datasets`` holds, per dataset, ``(sizes, doc_start, doc_end)``: the document
    sizes (a memory map is fine: they are scanned in windows) and the document
    range that enters the database. The plan holds one ``BlockStart`` per block,
    so its memory is proportional to the number of blocks, not of documents.
    """
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    starts: list[BlockStart] = []
    per_dataset: list[int] = []
    total = 0  # candidates before the current window
    for d, (sizes, doc_start, doc_end) in enumerate(datasets):
        first_total = total
        for w0 in range(doc_start, doc_end, SIZE_WINDOW):
            w1 = min(w0 + SIZE_WINDOW, doc_end)
            counts = candidate_counts(sizes[w0:w1], chunk_length)
            ends = np.cumsum(counts) + total  # global candidate index after each doc
            begins = ends - counts
            # Block starts falling in this window: multiples of block_size in [total, ends[-1]).
            window_end = int(ends[-1]) if len(ends) else total
            first_block = -(-total // block_size)
            for b_start in range(first_block * block_size, window_end, block_size):
                j = int(np.searchsorted(ends, b_start, side="right"))
                starts.append(BlockStart(d, w0 + j, int(b_start - begins[j])))
            total = window_end
        per_dataset.append(total - first_total)
    return CandidatePlan(block_size, total, tuple(starts), tuple(per_dataset))


def candidate_block(
    sizes_of: Sequence[np.ndarray],
    doc_ranges: Sequence[tuple[int, int]],
    start: BlockStart,
    count: int,
    chunk_length: int,
) -> np.ndarray:
    """The ``count`` candidate chunks from ``start`` on, as int64 ``[count, 4]``.

    Columns: dataset_idx, document_idx, chunk_start, chunk_end (exclusive),
    before any end-of-document trimming. Walks forward through documents and
    datasets; reads only the sizes it needs.
    """
    out = np.empty((count, 4), dtype=np.int64)
    filled = 0
    dataset, document, chunk = start.dataset, start.document, start.chunk
    while filled < count:
        if dataset >= len(sizes_of):
            raise ValueError(f"candidate block runs past the last dataset ({filled} of {count} filled)")
        doc_end = doc_ranges[dataset][1]
        if document >= doc_end:
            dataset += 1
            if dataset < len(doc_ranges):
                document, chunk = doc_ranges[dataset][0], 0
            continue
        # Enough documents to fill the rest even if every one has one chunk.
        w1 = min(doc_end, document + (count - filled) + 1)
        sizes = np.asarray(sizes_of[dataset][document:w1], dtype=np.int64)
        counts = candidate_counts(sizes, chunk_length)
        counts[0] -= chunk
        take_docs = np.repeat(np.arange(document, w1, dtype=np.int64), counts)
        first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
        chunk_no = np.arange(len(take_docs), dtype=np.int64) - first_chunk
        chunk_no[: counts[0]] += chunk
        n = min(len(take_docs), count - filled)
        docs = take_docs[:n]
        begin = chunk_no[:n] * chunk_length
        end = np.minimum(begin + chunk_length, sizes[docs - document])
        out[filled : filled + n, 0] = dataset
        out[filled : filled + n, 1] = docs
        out[filled : filled + n, 2] = begin
        out[filled : filled + n, 3] = end
        filled += n
        if n < len(take_docs):
            break
        document, chunk = w1, 0
    return out


@dataclass(frozen=True)
class CompactionSlice:
    """Rows ``[start, stop)`` of candidate block ``block``'s valid chunks."""

    block: int
    start: int
    stop: int


def plan_compaction(valid_per_block: Sequence[int], block_size: int) -> list[list[CompactionSlice]]:
    """Which valid candidates fill each block of ``chunks.zarr``.

    Output block ``j`` holds the valid candidates of rank ``[j*B, (j+1)*B)`` in
    corpus order; this returns, per output block, the slices of the candidate
    blocks' valid rows that make it up.
    """
    valid = np.asarray(valid_per_block, dtype=np.int64)
    ends = np.cumsum(valid)
    n_valid = int(ends[-1]) if len(ends) else 0
    begins = ends - valid
    plan: list[list[CompactionSlice]] = []
    for out_start in range(0, n_valid, block_size):
        out_stop = min(out_start + block_size, n_valid)
        first = int(np.searchsorted(ends, out_start, side="right"))
        slices = []
        b = first
        while b < len(valid) and begins[b] < out_stop:
            lo = max(out_start, int(begins[b])) - int(begins[b])
            hi = min(out_stop, int(ends[b])) - int(begins[b])
            if hi > lo:
                slices.append(CompactionSlice(b, lo, hi))
            b += 1
        plan.append(slices)
    return plan


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` across datasets by ``weights``, never above ``caps``.

    Largest-remainder rounding; what a capped dataset cannot take goes to the
    others in proportion, so the result sums to ``min(total, sum(caps))``.
    """
    caps = [int(c) for c in caps]
    total = min(int(total), sum(caps))
    share = [0] * len(caps)
    open_ = [i for i in range(len(caps)) if caps[i] > 0 and weights[i] > 0]
    if not open_:
        open_ = [i for i in range(len(caps)) if caps[i] > 0]
    left = total
    while left > 0 and open_:
        w = np.array([max(float(weights[i]), 1e-12) for i in open_])
        exact = w / w.sum() * left
        base = np.floor(exact).astype(np.int64)
        order = np.argsort(-(exact - base), kind="stable")
        base[order[: left - int(base.sum())]] += 1
        for i, add in zip(open_, base):
            take = min(int(add), caps[i] - share[i])
            share[i] += take
            left -= take
        open_ = [i for i in open_ if share[i] < caps[i]]
    return share


def sample_rows(n_rows: int, n_sample: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform sample of ``n_sample`` distinct rows of ``range(n_rows)``, sorted.

    Memory is O(n_sample), not O(n_rows). Below a quarter of the rows the
    distinct values of uniform draws (a uniform subset, given their number)
    are collected until there are enough, and a uniform subset of them kept;
    numpy's own sampler without replacement permutes the whole range once the
    sample is over 1/20 of it (26 MB for 3.3M rows in the driver).
    """
    if n_sample >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    if n_sample * 4 >= n_rows:
        return np.sort(rng.permutation(n_rows)[:n_sample].astype(np.int64))
    keep = np.zeros(0, np.int64)
    while len(keep) < n_sample:
        draw = rng.integers(0, n_rows, size=(n_sample - len(keep)) * 5 // 4 + 16, dtype=np.int64)
        keep = np.union1d(keep, draw)
    if len(keep) > n_sample:
        keep = np.sort(rng.choice(keep, size=n_sample, replace=False))
    return keep


def sample_row_blocks(n_rows: int, n_sample: int, rng: np.random.Generator,
                      block_size: int) -> Iterator[np.ndarray]:
    """A uniform sample of ``n_sample`` distinct rows of ``range(n_rows)``, in order, a block at a time.

    How many rows each block of ``block_size`` rows gives is one multivariate
    hypergeometric draw (the counts of a uniform subset); each block's rows are
    then a uniform subset of that block. Together that is a uniform subset of
    the whole range, and memory is O(block_size + number of blocks), not O(n_sample).
    Yields the sorted rows of each block (empty blocks included).
    """
    n_rows, n_sample = int(n_rows), min(int(n_sample), int(n_rows))
    if n_rows == 0:
        return
    sizes = np.diff(np.minimum(np.arange(0, n_rows + block_size, block_size), n_rows))
    counts = rng.multivariate_hypergeometric(sizes, n_sample, method="marginals")
    for b, (size, count) in enumerate(zip(sizes.tolist(), counts.tolist())):
        yield b * block_size + sample_rows(size, count, rng)


def rebatch(parts: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The concatenation of ``parts`` cut into arrays of ``size`` items (the last one shorter)."""
    held: list[np.ndarray] = []
    n_held = 0
    for part in parts:
        held.append(part)
        n_held += len(part)
        while n_held >= size:
            joined = np.concatenate(held)
            yield joined[:size]
            held, n_held = [joined[size:]], n_held - size
    if n_held:
        yield np.concatenate(held)


DOC_KEY_SHIFT = 40  # document_idx < 2**40 per dataset; dataset_idx above it


def doc_key(dataset_idx, document_idx):
    """One int64 per (dataset, document): how the neighbour filter compares documents."""
    return (np.asarray(dataset_idx, dtype=np.int64) << DOC_KEY_SHIFT) | np.asarray(document_idx, dtype=np.int64)


def lookup_documents(first_row: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Document key of each chunks.zarr row, from the first row and key of every document (``-1`` rows give ``-1``)."""
    rows = np.asarray(rows, dtype=np.int64)
    pos = np.searchsorted(first_row, rows, side="right") - 1
    out = np.asarray(keys)[np.clip(pos, 0, None)]
    return np.where(rows < 0, -1, out)


def continuation_rows(rows: np.ndarray, chunk_table, n_chunks: int, r: int) -> np.ndarray:
    """``[..., r]`` rows: each neighbour row and the next ``r - 1`` rows of the same document.

    ``chunk_table(ids)`` returns chunks.zarr rows (dataset, document, ...) for
    sorted unique ids. -1 wherever the neighbour is missing or the document ended.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cand = rows[..., None] + np.arange(r, dtype=np.int64)
    ok = (rows[..., None] >= 0) & (cand < n_chunks)
    needed = np.unique(cand[ok])
    if len(needed):
        table = chunk_table(needed)
        key = doc_key(table[:, 0], table[:, 1])
        pos = np.searchsorted(needed, np.where(ok, cand, needed[0]))
        keys = np.where(ok, key[pos], -1)
        same = keys == keys[..., :1]
        # Once a continuation leaves the document, every later one is padding too.
        ok &= np.cumprod(same, axis=-1).astype(bool)
    return np.where(ok, cand, -1)
