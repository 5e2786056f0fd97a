"""db-build: the chunk database of the retrieval corpus.

Reads the Megatron indexed datasets of the blend and writes, in the workdir:

- ``db/candidates.zarr``: the length pass (``db_candidates.py``), stored from
  its lazy array;
- ``db/chunks.zarr``: the valid candidates in corpus order, int64
  ``[n_chunks, 5]``: dataset_idx, document_idx, chunk_start, chunk_end,
  bert_length. Its lazy array (:func:`compacted`) selects the valid rows of
  the candidate blocks each block of --block-size rows needs, so its rows are
  exactly the rows of chunks.zarr;
- ``db/doc_first_row.npy`` / ``db/doc_key.npy``: the first row of each document
  with chunks, for the neighbour filter's row -> document lookup;
- ``db/sampled.zarr``: the seeded, uniform index-training sample; and
  ``db/infos.json``.

Every step records its blocks in the ledger: a rerun skips what is done.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import BuildConfig
from ..engine.executor import Executor, StoreJob
from ..engine.targets import ZarrTarget
from ..errors import InputError
from ..formats import zarr_blocks
from ..formats.ledger import Ledger, file_sizes
from ..formats.workdir import (
    atomic_path,
    atomic_write_json,
    candidates_path,
    chunks_path,
    doc_keys_path,
    doc_starts_path,
    infos_path,
    sampled_path,
)
from ..plan.blocks import n_blocks
from ..plan.chunks import CompactionSlice, apportion, doc_key, plan_compaction, rebatch, sample_row_blocks
from .db_candidates import block_counts, candidate_job, candidates, dataset_facts, plan_candidates, valid_mask

# Compaction and document-index blocks take ~1 ms: a task takes up to this many (RESULTS.md, note 22).
# 32, not more: a task's memory grows with its span, and at 32 it is the same from ~300 blocks on (note 33).
CHEAP_BLOCK_SPAN = 32


def _compact(rows: np.ndarray, slices: tuple[tuple[int, int, int], ...], cand_block_rows: int, first_block: int):
    """The valid candidates that ``slices`` (candidate block, start, stop in its valid rows) name, in order."""
    out = np.empty((sum(stop - start for _, start, stop in slices), 5), np.int64)
    at = 0
    for block, start, stop in slices:
        part = rows[(block - first_block) * cand_block_rows : (block - first_block + 1) * cand_block_rows]
        out[at : at + stop - start] = part[valid_mask(part)][start:stop]
        at += stop - start
    return out


def compacted(cand_path, plan: Sequence[Sequence[CompactionSlice]], block_rows: int, lo: int, hi: int):
    """Rows ``lo:hi`` of chunks.zarr (whole blocks) as a lazy array over the stored candidates."""
    from dask.base import tokenize

    slices = tuple((s.block, s.start, s.stop) for j in range(lo // block_rows, -(-hi // block_rows)) for s in plan[j])
    cand_rows = zarr_blocks.open_format(cand_path).block_rows
    first, last = slices[0][0], slices[-1][0] + 1
    source = zarr_blocks.lazy_rows(cand_path, first * cand_rows, last * cand_rows,
                                   (min(last * cand_rows, zarr_blocks.open_format(cand_path).shape[0]) - first * cand_rows,))
    return source.map_blocks(_compact, slices, cand_rows, first, chunks=((hi - lo,), (5,)), dtype=np.int64,
                             name=f"db-chunks-{tokenize(str(cand_path), slices, lo, hi)}",
                             meta=np.empty((0, 0), np.int64))


def _doc_starts(path: str, block: int, n: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of blocks ``block .. block + n - 1`` of chunks.zarr where a new document starts, and their keys."""
    lo = block * block_rows
    rows = zarr_blocks.read_rows(path, lo - 1, lo + n * block_rows)[:, :2]
    keys = doc_key(rows[:, 0], rows[:, 1])
    if lo == 0:
        new = np.ones(len(keys), bool)
        new[1:] = keys[1:] != keys[:-1]
        return np.flatnonzero(new).astype(np.int64), keys[new]
    new = keys[1:] != keys[:-1]
    return (lo + np.flatnonzero(new)).astype(np.int64), keys[1:][new]


def write_doc_index(ex: Executor, n_chunks: int, block_rows: int) -> None:
    """Write db/doc_first_row.npy and db/doc_key.npy from chunks.zarr, streamed in order from the workers'
    scans (memory: the windows in flight), then record them."""
    import dask
    import dask.base

    w = ex.workdir
    ledger = Ledger(w, "db-docs")
    if ledger.done_blocks(1):
        return
    path = str(chunks_path(w))
    n_blk = n_blocks(n_chunks, block_rows)
    token = dask.base.tokenize(path, os.stat(os.path.join(path, "zarr.json")).st_mtime_ns, n_chunks, block_rows)
    tasks = (dask.delayed(_doc_starts, pure=True)(path, b, min(CHEAP_BLOCK_SPAN, n_blk - b), block_rows,
                                                  dask_key_name=f"db-docs-{token}-{b}")
             for b in range(0, n_blk, CHEAP_BLOCK_SPAN))
    with atomic_path(doc_starts_path(w)) as rows_tmp, atomic_path(doc_keys_path(w)) as keys_tmp:
        raw_rows, raw_keys = rows_tmp.with_suffix(".raw"), keys_tmp.with_suffix(".raw")
        total = 0
        with open(raw_rows, "wb") as fr, open(raw_keys, "wb") as fk:
            for rows, keys in ex.gather(tasks):
                fr.write(np.ascontiguousarray(rows, np.int64).tobytes())
                fk.write(np.ascontiguousarray(keys, np.int64).tobytes())
                total += len(rows)
        for raw, out in ((raw_rows, rows_tmp), (raw_keys, keys_tmp)):
            raw_to_npy(raw, out, np.int64, total)
            raw.unlink()
    from .index import file_sha256

    files = [doc_starts_path(w), doc_keys_path(w)]
    ex.record("db-docs", [{"block": 0, "rows": [0, 1], "files": file_sizes(w, files),
                           "sha256": {os.path.relpath(p, w): file_sha256(p) for p in files}}])


def raw_to_npy(raw, out, dtype, n: int) -> None:
    """Prefix a raw little-endian array file with an ``.npy`` header (streaming copy)."""
    import shutil

    from numpy.lib import format as npy

    with open(out, "wb") as f, open(raw, "rb") as src:
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})
        shutil.copyfileobj(src, f, 1 << 20)


def train_sample(config: BuildConfig, n_chunks_per_dataset: Sequence[int],
                 ntrain: int) -> tuple[list[int], Iterator[np.ndarray]]:
    """The index-training sample: rows per dataset, and the sorted chunks.zarr rows a block at a time.

    ``ntrain`` is split across datasets by blend ratio (capped by each one's
    chunks); within a dataset the rows are a seeded uniform sample, drawn a
    block of rows at a time so that no process holds the whole sample.
    """
    share = apportion(ntrain, config.chunk.data.ratios, n_chunks_per_dataset)
    offsets = np.concatenate([[0], np.cumsum(n_chunks_per_dataset)]).astype(np.int64)
    B = config.chunk.block_size

    def rows() -> Iterator[np.ndarray]:
        for d, k in enumerate(share):
            rng = np.random.default_rng([config.chunk.seed, d])
            for part in sample_row_blocks(int(n_chunks_per_dataset[d]), int(k), rng, B):
                yield offsets[d] + part

    return share, rows()


def write_sample(ex: Executor, config: BuildConfig, valid_per_dataset: Sequence[int], ntrain: int) -> list[int]:
    """Write db/sampled.zarr a block at a time (the draw is sequential: it runs here), skipping recorded blocks."""
    w = ex.workdir
    share, blocks = train_sample(config, valid_per_dataset, ntrain)
    n_sampled = sum(share)
    B = config.chunk.block_size
    target = ZarrTarget.create(w, "db-sampled", sampled_path(w), (n_sampled,), np.int64, B)
    fingerprint = f"n={n_sampled}"
    done = Ledger(w, "db-sampled", fingerprint).done_blocks(target.n_blocks, target.rows)
    for b, rows in enumerate(rebatch(blocks, B)):
        if b not in done:
            target.write_block(b, rows)
            ex.record("db-sampled", [target.record(b)], fingerprint)
    return share


def db_jobs(ex: Executor, config: BuildConfig) -> tuple[list, Any, StoreJob]:
    """The length pass's plan and its StoreJob (for the build and for verify)."""
    w = ex.workdir
    facts = dataset_facts(config)
    plan = plan_candidates(config, facts)
    if plan.n_candidates == 0:
        raise InputError(
            "the training split of --data-path has no tokens to chunk: check the prefixes "
            f"({', '.join(config.chunk.data.prefixes)}) and --split"
        )
    job = candidate_job(config, facts)
    target = ZarrTarget.create(w, "db-candidates", candidates_path(w), (plan.n_candidates, 5), np.int64,
                               plan.block_size)
    return facts, plan, StoreJob("db-candidates", target, lambda lo, hi: candidates(job, plan, lo, hi), span=16)


def candidate_counts(ex: Executor, n_candidates: int, n_datasets: int) -> np.ndarray:
    """``[n_candidate_blocks, 1 + 3 * n_datasets]``: valid candidates per block, then valid / invalid / empty
    per dataset, counted from candidates.zarr by the workers, a span of blocks per task."""
    path = candidates_path(ex.workdir)
    span = CHEAP_BLOCK_SPAN * zarr_blocks.open_format(path).block_rows
    parts = list(ex.gather(block_counts(path, lo, min(lo + span, n_candidates), n_datasets)
                           for lo in range(0, n_candidates, span)))
    return np.concatenate(parts) if parts else np.zeros((0, 1 + 3 * n_datasets), np.int64)


def chunks_job(ex: Executor, config: BuildConfig, counts: np.ndarray) -> StoreJob:
    w = ex.workdir
    B = config.chunk.block_size
    n_chunks = int(counts[:, 0].sum())
    plan = plan_compaction(counts[:, 0], B)
    target = ZarrTarget.create(w, "db-chunks", chunks_path(w), (n_chunks, 5), np.int64, B)
    cand = str(candidates_path(w))
    return StoreJob("db-chunks", target, lambda lo, hi: compacted(cand, plan, B, lo, hi), span=CHEAP_BLOCK_SPAN)


def build_db(ex: Executor, config: BuildConfig, index_ntrain: Callable[[int], int], log=print) -> dict[str, Any]:
    """Run db-build; resumes from finished blocks. ``index_ntrain(n_chunks)`` sizes the training sample."""
    t0 = time.perf_counter()
    facts, plan, cand_job = db_jobs(ex, config)
    cand = ex.store([cand_job], "db-build: BERT lengths", unit="candidates")[cand_job.stage]
    n_ds = len(facts)
    counts = candidate_counts(ex, plan.n_candidates, n_ds)
    valid, invalid = counts[:, 1 : 1 + n_ds].sum(0), counts[:, 1 + n_ds : 1 + 2 * n_ds].sum(0)
    n_chunks = int(valid.sum())
    if n_chunks == 0:
        raise InputError("no chunk of the training split has any BERT token: check the corpus and --bert-model")
    job = chunks_job(ex, config, counts)
    chunk_run = ex.store([job], "db-build: chunks", unit="chunks")[job.stage]
    write_doc_index(ex, n_chunks, config.chunk.block_size)
    sampled_per_dataset = write_sample(ex, config, valid.tolist(), int(index_ntrain(n_chunks)))
    infos = [{
        "ratio": f.ratio,
        "prefix": f.prefix,
        "n_docs": f.n_docs,
        "n_docs_train": f.train[1] - f.train[0],
        "n_chunks": int(valid[d] + invalid[d]),
        "n_chunks_train": int(valid[d]),
        "n_chunks_invalid": int(invalid[d]),
        "n_chunks_sampled": sampled_per_dataset[d],
    } for d, f in enumerate(facts)]
    atomic_write_json(infos_path(ex.workdir), infos)
    return ex.write_stats(
        "db-build", cand, time.perf_counter() - t0, ex.collect("db-candidates", "db-chunks"),
        n_candidates=plan.n_candidates, n_chunks=n_chunks, n_chunks_invalid=int(invalid.sum()),
        n_sampled=sum(sampled_per_dataset), chunks_per_s=round(cand.rows / max(cand.seconds, 1e-9), 1),
        compaction_seconds=round(chunk_run.seconds, 3),
    )


def db_complete(workdir: str) -> bool:
    """Whether db-build finished: every block of chunks.zarr and sampled.zarr recorded, the document index too."""
    try:
        n_chunk_blocks = zarr_blocks.open_format(chunks_path(workdir)).n_blocks
        fmt = zarr_blocks.open_format(sampled_path(workdir))
    except (OSError, ValueError, FileNotFoundError):
        return False
    return (infos_path(workdir).exists() and Ledger(workdir, "db-chunks").complete(n_chunk_blocks)
            and Ledger(workdir, "db-docs").complete(1)
            and Ledger(workdir, "db-sampled", f"n={fmt.shape[0]}").complete(fmt.n_blocks))
