"""db-build's length pass: every candidate chunk, its end trimmed and its BERT length measured.

A *candidate* is a chunk cut from the document sizes alone (``plan/chunks.py``);
the lazy array of candidates (int64 ``[n_candidates, 5]``: dataset_idx,
document_idx, chunk_start, chunk_end, bert_length) computes a range of them
from the ``.idx`` sizes and the block plan's starts, then reads their tokens,
trims a trailing end-of-document token and counts WordPiece tokens. It is
stored into ``db/candidates.zarr``, an intermediate in blocks of
``CANDIDATE_BLOCK_FACTOR`` x --block-size rows. :func:`block_counts` then counts
each block's valid, invalid (no BERT token) and empty candidates per dataset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import BuildConfig
from ..engine import figures
from ..formats import zarr_blocks
from ..formats.indexed_dataset import open_dataset, release_dataset_pages
from ..plan.chunks import BlockStart, CandidatePlan, candidate_block, plan_candidate_blocks, split_document_ranges
from ..text.bert import BertTokenizerSpec, get_bert_tokenizer
from ..text.chunk_texts import chunk_texts_of_rows
from ..text.gpt import GPTTokenizerSpec, get_gpt_tokenizer

# A block of the length pass is this many --block-size blocks: what every block costs besides its
# chunks (a file, a ledger record, a share of a task) is paid 4x less often (RESULTS.md, note 22).
CANDIDATE_BLOCK_FACTOR = 4


@dataclass(frozen=True)
class DatasetFacts:
    prefix: str
    ratio: float
    n_docs: int
    splits: tuple[tuple[int, int], ...]  # document ranges of train, valid, test

    @property
    def train(self) -> tuple[int, int]:
        return self.splits[0]


def dataset_facts(config: BuildConfig) -> list[DatasetFacts]:
    """Open every dataset of the blend (validating it) and split its documents."""
    facts = []
    for ratio, prefix in zip(config.chunk.data.ratios, config.chunk.data.prefixes):
        ds = open_dataset(prefix)
        facts.append(DatasetFacts(prefix, ratio, len(ds), tuple(split_document_ranges(len(ds), config.chunk.split))))
    return facts


def plan_candidates(config: BuildConfig, facts: Sequence[DatasetFacts], block_size: int | None = None) -> CandidatePlan:
    """The candidate blocks: of the length pass (``CANDIDATE_BLOCK_FACTOR`` x --block-size) unless ``block_size``."""
    return plan_candidate_blocks(
        [(open_dataset(f.prefix).scanned_sizes(), f.train[0], f.train[1]) for f in facts],
        config.chunk.chunk_length,
        block_size or CANDIDATE_BLOCK_FACTOR * config.chunk.block_size,
    )


@dataclass(frozen=True)
class CandidateJob:
    """What computing candidates needs besides their rows: values only."""

    prefixes: tuple[str, ...]
    train_ranges: tuple[tuple[int, int], ...]
    chunk_length: int
    gpt: GPTTokenizerSpec
    bert: BertTokenizerSpec


def candidate_job(config: BuildConfig, facts: Sequence[DatasetFacts]) -> CandidateJob:
    return CandidateJob(tuple(f.prefix for f in facts), tuple(f.train for f in facts), config.chunk.chunk_length,
                        config.chunk.gpt_spec(), config.embed.bert_spec())


def trim_and_measure(job: CandidateJob, cand: np.ndarray) -> np.ndarray:
    """Trim trailing end-of-document tokens and add each candidate's BERT length.

    Returns int64 ``[n, 5]``; an end-of-document-only candidate becomes empty
    (end == start, length 0); a candidate whose text has no BERT token keeps its
    end and gets length 0.
    """
    out = np.zeros((len(cand), 5), dtype=np.int64)
    out[:, :4] = cand
    texts = chunk_texts_of_rows(get_gpt_tokenizer(job.gpt), job.prefixes, out, trim_eod=True)
    release_dataset_pages(job.prefixes)
    nonempty = out[:, 3] > out[:, 2]
    lengths = get_bert_tokenizer(job.bert).lengths(texts, num_threads=1)
    out[:, 4] = np.where(nonempty, lengths, 0)
    return out


def measured_candidates(starts: np.ndarray, job: CandidateJob, block_rows: int, block_info=None) -> np.ndarray:
    """One Dask chunk of candidates: boundaries from sizes, trimmed and measured, a block (of ``block_rows``,
    starting at ``starts``) at a time so that one block's texts are in memory, whatever the chunk."""
    t0 = time.perf_counter()
    (lo, hi), _ = block_info[None]["array-location"]
    sizes_of = [open_dataset(p).sizes for p in job.prefixes]
    out = np.empty((hi - lo, 5), np.int64)
    for k, start in enumerate(starts.tolist()):
        a, b = k * block_rows, min((k + 1) * block_rows, hi - lo)
        cand = candidate_block(sizes_of, job.train_ranges, BlockStart(*start), b - a, job.chunk_length)
        out[a:b] = trim_and_measure(job, cand)
    figures.add("db-candidates", n_rows=len(out), seconds=time.perf_counter() - t0)
    return out


def candidates(job: CandidateJob, plan: CandidatePlan, lo: int, hi: int, chunks: tuple[int, ...] | None = None):
    """Candidates ``lo:hi`` as a lazy Dask array (``chunks``: rows per Dask chunk, whole blocks of the plan)."""
    import dask.array as da
    from dask.base import tokenize

    bs = plan.block_size
    chunks = tuple(chunks or (hi - lo,))
    starts = np.array([(s.dataset, s.document, s.chunk) for s in plan.starts[lo // bs : -(-hi // bs)]], np.int64)
    token = tokenize(job, bs, lo, hi, chunks, starts)
    starts_da = da.from_array(starts, chunks=(tuple(-(-c // bs) for c in chunks), (3,)), name=f"db-block-starts-{token}")
    return da.map_blocks(measured_candidates, starts_da, job, bs, chunks=(chunks, (5,)), dtype=np.int64,
                         name=f"db-candidates-{token}", meta=np.empty((0, 0), np.int64))


def valid_mask(rows: np.ndarray) -> np.ndarray:
    """Candidates that become chunks: not empty, at least one BERT token."""
    return (rows[:, 3] > rows[:, 2]) & (rows[:, 4] > 0)


def _block_counts(rows: np.ndarray, n_datasets: int, block_rows: int) -> np.ndarray:
    out = []
    for b in range(0, len(rows), block_rows):
        part = rows[b : b + block_rows]
        nonempty = part[:, 3] > part[:, 2]
        valid = valid_mask(part)
        per = [np.bincount(part[m, 0], minlength=n_datasets) for m in (valid, nonempty & ~valid, ~nonempty)]
        out.append(np.concatenate([[valid.sum()], *per]))
    return np.asarray(out, np.int64).reshape(-1, 1 + 3 * n_datasets)


def _span_counts(path: str, lo: int, hi: int, n_datasets: int) -> np.ndarray:
    block_rows = zarr_blocks.open_format(path).block_rows
    return np.concatenate([_block_counts(zarr_blocks.read_rows(path, b, min(b + block_rows, hi)), n_datasets, block_rows)
                           for b in range(lo, hi, block_rows)])


def block_counts(path, lo: int, hi: int, n_datasets: int):
    """Per candidate block of rows ``lo:hi`` (whole blocks): valid candidates, then valid / invalid / empty per
    dataset, as one task that reads a block at a time (its memory is one block's, whatever the span)."""
    import dask

    block_rows = zarr_blocks.open_format(path).block_rows
    return dask.delayed(_span_counts, pure=True)(str(path), lo, hi, n_datasets,
                                                 dask_key_name=f"db-counts-{lo}-{hi}-{block_rows}")
