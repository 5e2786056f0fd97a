"""query-neighbors: the retrieval neighbours of every chunk of the pretraining samples.

For each split (train, valid, test), reads the sample maps (``samples.py``),
cuts each sample's first ``seq_length`` tokens into ``seq_length / chunk_length``
chunks, embeds them with the embed stage's ``Embedder``, searches the index
(loaded once per worker, memory-mapped), drops neighbours that come from any
document of the sample's own dataset that the sample spans (vectorized), and
writes the first ``num_neighbors_save`` per chunk, -1 padded, to
``W/query/<split>/neighbors.zarr`` (row = sample * chunks_per_sample + chunk),
then ``meta.json``.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrays
from .config import EmbedConfig
from .db import doc_key, lookup_documents, release_dataset_pages
from .embed import chunk_texts, get_embedder
from .errors import InputError
from .faiss_util import faiss
from .index import index_tag, load_index
from .index_plan import default_nprobe
from .plan import SPLIT_NAMES
from .runner import block_record, block_task_threads
from .samples import Samples, SplitPlan, prepare_samples, write_query_meta
from .tokenizer import GPTTokenizerSpec
from .workdir import (
    Ledger,
    added_index_path,
    doc_keys_path,
    doc_starts_path,
    mark_stage_done,
    neighbors_path,
    query_meta_path,
    read_json,
    stage_done,
)


@dataclass(frozen=True)
class QueryJob:
    """What a query block task needs besides its block: values only."""

    workdir: str
    split: str
    tag: str
    embed: EmbedConfig
    gpt: GPTTokenizerSpec
    k_query: int
    k_save: int
    nprobe: int
    ef_search: int
    rows_per_block: int
    samples_hash: str


@functools.lru_cache(maxsize=8)
def open_samples(workdir: str, split: str, samples_hash: str) -> Samples:
    return Samples(workdir, split)


@functools.lru_cache(maxsize=2)
def document_lookup(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """The row -> document table of the database, memory-mapped once per worker."""
    return (np.load(doc_starts_path(workdir), mmap_mode="r", allow_pickle=False),
            np.load(doc_keys_path(workdir), mmap_mode="r", allow_pickle=False))


def searcher(workdir: str, tag: str, nprobe: int, ef_search: int, k: int = 0):
    """This worker's search index with the query settings: on its GPU where it fits, else memory-mapped."""
    path = added_index_path(workdir, tag)
    index = None
    if nprobe <= GPU_MAX_K and k <= GPU_MAX_K:
        index = gpu_index(str(path), os.stat(path).st_mtime_ns)
    index = index or load_index(path, mmap=True)
    ps = faiss().GpuParameterSpace() if is_gpu_index(index) else faiss().ParameterSpace()
    ps.initialize(index)
    names = {ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())}
    if "nprobe" in names:
        ps.set_index_parameter(index, "nprobe", nprobe)
    if "quantizer_efSearch" in names:
        ps.set_index_parameter(index, "quantizer_efSearch", ef_search)
    if "efSearch" in names:
        ps.set_index_parameter(index, "efSearch", ef_search)
    return index


def is_gpu_index(index) -> bool:
    # With the cosine metric a GPU clone is a CPU IndexPreTransform around a GpuIndexIVF*.
    from .index import index_chain

    return any("Gpu" in type(x).__name__ for x in index_chain(index))


_GPU_RESOURCES: dict[tuple[str, int], object] = {}
GPU_MAX_K = 2048  # Faiss's GPU indexes refuse k or nprobe above this
# Keep this share of the GPU's free memory for BERT and the search's own buffers.
GPU_INDEX_SHARE = 0.5


@functools.lru_cache(maxsize=2)
def gpu_index(path: str, mtime_ns: int):
    """The index cloned to this worker's GPU, or None (no faiss-gpu, no GPU, too big, or unsupported).

    On-disk inverted lists stay on the CPU: they are the case of an index larger than memory.
    """
    from .index import use_gpu_here

    if path.endswith(".faissindex") and os.path.exists(path[: -len(".faissindex")] + ".ivfdata"):
        return None
    try:
        if not use_gpu_here():
            return None
        f = faiss()
        import torch

        free_bytes = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        if os.path.getsize(path) > GPU_INDEX_SHARE * free_bytes:
            return None
        resources = f.StandardGpuResources()
        index = f.index_cpu_to_gpu(resources, 0, f.read_index(path))
        _GPU_RESOURCES[(path, mtime_ns)] = resources  # must live as long as the index
        return index
    except (RuntimeError, AttributeError, ImportError):
        return None


def filter_neighbors(ids: np.ndarray, neighbor_keys: np.ndarray, row_sample: np.ndarray,
                     sample_of_key: np.ndarray, key_of_sample: np.ndarray, k_save: int) -> np.ndarray:
    """Drop neighbours from the sample's own documents; keep the first ``k_save``, -1 padded.

    ``ids`` / ``neighbor_keys``: ``[rows, k]`` neighbour ids and their document
    keys; ``row_sample``: the (block-local) sample of each row;
    ``sample_of_key`` / ``key_of_sample``: pairs (sample, document key) of every
    document each sample spans. One vectorized membership test, no row loop.
    """
    all_keys = np.concatenate([key_of_sample, neighbor_keys.ravel()])
    uniq, inverse = np.unique(all_keys, return_inverse=True)
    u = np.int64(len(uniq))
    own = sample_of_key.astype(np.int64) * u + inverse[: len(key_of_sample)]
    theirs = row_sample.astype(np.int64)[:, None] * u + inverse[len(key_of_sample):].reshape(neighbor_keys.shape)
    keep = (ids >= 0) & ~np.isin(theirs, own)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k_save]
    kept = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
    if kept.shape[1] < k_save:
        kept = np.pad(kept, ((0, 0), (0, k_save - kept.shape[1])), constant_values=-1)
    return kept.astype(np.int64)


def sample_chunks(samples: Samples, sample_ids: range) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Chunk token arrays of some samples, and (sample, document key) pairs they span."""
    cps, cl = samples.chunks_per_sample, samples.chunk_length
    chunk_tokens: list[np.ndarray] = []
    pair_sample, pair_key = [], []
    for local, s in enumerate(sample_ids):
        tokens = samples.tokens(s)[: cps * cl]
        chunk_tokens.extend(tokens.reshape(cps, cl))
        k, docs = samples.documents(s)
        keys = np.unique(doc_key(k, docs))
        pair_sample.append(np.full(len(keys), local, np.int64))
        pair_key.append(keys)
    return chunk_tokens, np.concatenate(pair_sample), np.concatenate(pair_key)


def compute_neighbors(job: QueryJob, block: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One block of neighbors.zarr and the block's timings."""
    t0 = time.perf_counter()
    samples = open_samples(job.workdir, job.split, job.samples_hash)
    cps = samples.chunks_per_sample
    n_rows = len(samples) * cps
    lo, hi = block * job.rows_per_block, min((block + 1) * job.rows_per_block, n_rows)
    sample_ids = range(lo // cps, hi // cps)
    chunk_tokens, pair_sample, pair_key = sample_chunks(samples, sample_ids)
    embedder = get_embedder(job.embed)
    texts = chunk_texts(job.gpt, chunk_tokens)
    release_dataset_pages(samples.prefixes)
    ids = embedder.tokenizer.encode_for_model(texts, job.embed.max_chunk_length, num_threads=1)
    x = embedder.embed_ids(ids)
    t_embed = time.perf_counter()
    index = searcher(job.workdir, job.tag, job.nprobe, job.ef_search, job.k_query)
    faiss().omp_set_num_threads(block_task_threads())
    k = min(job.k_query, max(int(index.ntotal), 1))
    _, found = index.search(x, k)
    t_search = time.perf_counter()
    first_row, keys = document_lookup(job.workdir)
    neighbor_keys = lookup_documents(first_row, keys, found)
    row_sample = np.repeat(np.arange(len(sample_ids)), cps)
    kept = filter_neighbors(found, neighbor_keys, row_sample, pair_sample, pair_key, job.k_save)
    t_filter = time.perf_counter()
    return kept, dict(embed_seconds=round(t_embed - t0, 4), search_seconds=round(t_search - t_embed, 4),
                      filter_seconds=round(t_filter - t_search, 4), n_found_short=int((kept[:, -1] < 0).sum()))


def query_block_task(job: QueryJob, block: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    kept, timings = compute_neighbors(job, block)
    record = block_record(len(kept), t0, **timings)
    return arrays.write_block(job.workdir, f"query-{job.split}", neighbors_path(job.workdir, job.split), block,
                              kept, record)


def query_rows_per_block(config) -> int:
    """Rows of neighbors.zarr per block: whole samples, about --block-size rows."""
    cps = config.chunks_per_sample
    return max(cps, (config.chunk.block_size // cps) * cps)


def query_job(workdir: str, config, split: str, tag: str, nprobe: int, samples_hash: str) -> QueryJob:
    from .db import gpt_spec

    return QueryJob(workdir, split, tag, config.embed, gpt_spec(config), config.query.num_neighbors_query,
                    config.query.num_neighbors_save, nprobe, config.query.ef_search, query_rows_per_block(config),
                    samples_hash)


def prepare_split(runner, config, split: str, tag: str, nprobe: int, log=print):
    """The split's samples and output array; its BlockStage, or None if it is already done."""
    import dask

    from .runner import BlockStage

    w = runner.workdir
    plan: SplitPlan = prepare_samples(w, config, split)
    meta = plan.to_dict()
    n_rows = plan.n_samples * plan.chunks_per_sample
    rows_per_block = query_rows_per_block(config)
    stage = f"query-{split}"
    done = stage_done(w, stage)
    try:
        old_meta = read_json(query_meta_path(w, split))
    except (OSError, ValueError):
        old_meta = None
    if old_meta is not None and old_meta.get("hash") != meta["hash"]:
        Ledger(w, stage).clear()
    if done and done.get("hash") == meta["hash"] and old_meta and old_meta.get("hash") == meta["hash"]:
        log(f"[{stage}] {plan.n_samples} samples already done: skipped")
        return plan, None
    arrays.create(neighbors_path(w, split), (n_rows, config.query.num_neighbors_save), np.int64,
                  rows_per_block, fill_value=-1)
    job = query_job(w, config, split, tag, nprobe, meta["hash"])
    n_blk = -(-n_rows // rows_per_block) if n_rows else 0
    return plan, BlockStage(stage, n_blk, lambda b: dask.delayed(query_block_task, pure=False)(job, b),
                            f"query-neighbors: {split}")


def split_stats(runner, plan: SplitPlan, result) -> dict[str, Any]:
    n_rows = plan.n_samples * plan.chunks_per_sample
    return runner.write_stats(
        f"query-{plan.split}", result, result.seconds, split=plan.split, n_samples=plan.n_samples,
        n_query_chunks=n_rows, chunks_per_s=round(result.total("n_rows") / max(result.seconds, 1e-9), 2),
        embed_seconds_total=round(result.total("embed_seconds"), 3),
        search_seconds_total=round(result.total("search_seconds"), 3),
        filter_seconds_total=round(result.total("filter_seconds"), 3),
        rows_with_fewer_neighbors=int(result.total("n_found_short")),
    )


def query_nprobe(config, workdir: str) -> int:
    if config.query.nprobe:
        return int(config.query.nprobe)
    info = stage_done(workdir, "index-train") or {}
    return default_nprobe(int(info.get("nlist", 0)))


def query_all_splits(runner, config, log=print) -> dict[str, Any]:
    w = runner.workdir
    t0 = time.perf_counter()
    if not stage_done(w, "index-add"):
        raise InputError(f"{w} has no finished index: run --tasks index-add (or index-build) first")
    tag = index_tag(w)
    nprobe = query_nprobe(config, w)
    prepared = {split: prepare_split(runner, config, split, tag, nprobe, log=log) for split in SPLIT_NAMES}
    specs = [spec for _, spec in prepared.values() if spec is not None]
    # All splits' blocks in one stream, so no worker idles at the end of a split.
    results = runner.run_stages(specs, desc="query-neighbors", unit="chunks")
    per_split: dict[str, Any] = {}
    for split, (plan, spec) in prepared.items():
        if spec is None:
            per_split[split] = {"split": split, "n_samples": plan.n_samples, "skipped": True,
                                "n_query_chunks": plan.n_samples * plan.chunks_per_sample}
            continue
        write_query_meta(w, plan)
        mark_stage_done(w, spec.stage, {"hash": plan.to_dict()["hash"], "n_samples": plan.n_samples})
        per_split[split] = split_stats(runner, plan, results[spec.stage])
    total = sum(s.get("n_query_chunks", 0) for s in per_split.values())
    return runner.write_stats("query-neighbors", None, time.perf_counter() - t0, nprobe=nprobe,
                              n_query_chunks=total, splits=per_split,
                              chunks_per_s=round(total / max(time.perf_counter() - t0, 1e-9), 2),
                              worker_peak_rss_mb=_merge_peaks(results.values(), "rss_mb"),
                              worker_rss_anon_mb=_merge_peaks(results.values(), "rss_anon_mb"),
                              worker_rss_file_mb=_merge_peaks(results.values(), "rss_file_mb"))


def _merge_peaks(results, key: str) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for r in results:
        for k, v in r.worker_peak_rss(key).items():
            peaks[k] = max(peaks.get(k, 0.0), v)
    return {k: round(v, 1) for k, v in sorted(peaks.items())}
