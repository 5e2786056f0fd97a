"""query-neighbors: the retrieval neighbours of every chunk of the pretraining samples.

For each split (train, valid, test) the sample maps are computed and cached
(``formats/sample_maps.py``). :func:`sample_chunk_tokens` is the lazy array of
the samples' chunks (int64 ``[n_samples * chunks_per_sample, chunk_length]``,
each sample's first ``seq_length`` tokens cut into chunks); :func:`neighbors`
maps its blocks (whole samples) to their neighbours: detokenize, embed with the
embedder of the embed stage, search the index (loaded once per worker,
memory-mapped), drop neighbours from any document of the sample's own dataset
that the sample spans (vectorized), keep the first ``num_neighbors_save``, -1
padded. The stage stores it into ``W/query/<split>/neighbors.zarr`` (row =
sample * chunks_per_sample + chunk), all splits in one stream of tasks, then
writes ``meta.json``.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import BuildConfig, EmbedConfig
from ..engine import figures
from ..engine.executor import Executor, StoreJob
from ..engine.process_env import block_task_threads
from ..engine.targets import ZarrTarget
from ..errors import InputError
from ..formats.faiss_index import faiss, index_chain, load_index
from ..formats.indexed_dataset import release_dataset_pages
from ..formats.ledger import Ledger
from ..formats.sample_maps import Samples, prepare_samples, write_query_meta
from ..formats.workdir import (
    added_index_path,
    doc_keys_path,
    doc_starts_path,
    neighbors_path,
    query_meta_path,
    read_json,
    tune_dir,
)
from ..plan.chunks import SPLIT_NAMES, doc_key, lookup_documents
from ..plan.index import default_nprobe
from ..text.chunk_texts import chunk_texts
from ..text.embedder import get_embedder
from ..text.gpt import GPTTokenizerSpec
from .index import index_complete, trained, use_gpu_here


@dataclass(frozen=True)
class QueryJob:
    """What computing a split's neighbours needs besides the rows: values only."""

    workdir: str
    split: str
    tag: str
    embed: EmbedConfig
    gpt: GPTTokenizerSpec
    k_query: int
    k_save: int
    nprobe: int
    ef_search: int
    samples_hash: str
    reuse_tune: bool = False  # take the tune's embeddings of its query chunks instead of computing them again

    @property
    def fingerprint(self) -> str:
        """What the neighbours are computed from, beyond config.json: the samples, the index, the search."""
        index_sha = Ledger(self.workdir, "index-train").record(0)["sha256"]
        return f"{self.samples_hash}:{index_sha}:{self.nprobe}:{self.ef_search}"


# The splits whose chunks tune measures recall on.
TUNE_SPLITS = ("train", "valid")


@functools.lru_cache(maxsize=2)
def _tune_embeddings(folder: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(os.path.join(folder, "picks.npy"), allow_pickle=False),
            np.load(os.path.join(folder, "embeddings.npy"), allow_pickle=False))


def tune_embeddings(workdir: str, split: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``lo:hi`` of ``split`` that the tune embedded (sorted, relative to ``lo``), and their embeddings."""
    if split not in TUNE_SPLITS:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    folder = str(tune_dir(workdir))
    picks, emb = _tune_embeddings(folder, os.stat(os.path.join(folder, "embeddings.npy")).st_mtime_ns)
    sel = (picks[:, 0] == TUNE_SPLITS.index(split)) & (picks[:, 1] >= lo) & (picks[:, 1] < hi)
    return picks[sel, 1] - lo, emb[sel]


@functools.lru_cache(maxsize=8)
def open_samples(workdir: str, split: str, samples_hash: str) -> Samples:
    return Samples(workdir, split)


@functools.lru_cache(maxsize=2)
def document_lookup(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """The row -> document table of the database, memory-mapped once per worker."""
    return (np.load(doc_starts_path(workdir), mmap_mode="r", allow_pickle=False),
            np.load(doc_keys_path(workdir), mmap_mode="r", allow_pickle=False))


# ---------------------------------------------------------------- the search index of a worker

_GPU_RESOURCES: dict[tuple[str, int], object] = {}
GPU_MAX_K = 2048  # Faiss's GPU indexes refuse k or nprobe above this
# Keep this share of the GPU's free memory for BERT and the search's own buffers.
GPU_INDEX_SHARE = 0.5


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
    return any("Gpu" in type(x).__name__ for x in index_chain(index))


@functools.lru_cache(maxsize=2)
def gpu_index(path: str, mtime_ns: int):
    """The index cloned to this worker's GPU, or None (no faiss-gpu, no GPU, too big, or on-disk lists)."""
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


# ---------------------------------------------------------------- one block


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


def sample_documents(samples: Samples, sample_ids: range) -> tuple[np.ndarray, np.ndarray]:
    """(sample, document key) pairs of every document each sample spans (sample numbers block-local)."""
    pair_sample, pair_key = [], []
    for local, s in enumerate(sample_ids):
        k, docs = samples.documents(s)
        keys = np.unique(doc_key(k, docs))
        pair_sample.append(np.full(len(keys), local, np.int64))
        pair_key.append(keys)
    return np.concatenate(pair_sample), np.concatenate(pair_key)


def _sample_tokens(workdir: str, split: str, samples_hash: str, offset: int, block_info=None) -> np.ndarray:
    (lo, hi), _ = block_info[None]["array-location"]
    samples = open_samples(workdir, split, samples_hash)
    cps, cl = samples.chunks_per_sample, samples.chunk_length
    first, last = (offset + lo) // cps, (offset + hi) // cps
    out = np.stack([samples.tokens(s)[: cps * cl].reshape(cps, cl) for s in range(first, last)]) if last > first \
        else np.zeros((0, cps, cl), np.int64)
    release_dataset_pages(samples.prefixes)
    return out.reshape(-1, cl)


def sample_chunk_tokens(workdir: str, split: str, samples_hash: str, lo: int, hi: int,
                        chunks: tuple[int, ...] | None = None):
    """Tokens of the sample chunks of rows ``lo:hi`` (whole samples) as a lazy Dask array."""
    import dask.array as da
    from dask.base import tokenize

    cl = open_samples(workdir, split, samples_hash).chunk_length
    return da.map_blocks(_sample_tokens, workdir, split, samples_hash, lo, chunks=(tuple(chunks or (hi - lo,)), (cl,)),
                         dtype=np.int64, name=f"sample-chunks-{split}-{tokenize(workdir, samples_hash, lo, hi, chunks)}",
                         meta=np.empty((0, 0), np.int64))


def neighbors_of_block(tokens: np.ndarray, job: QueryJob, offset: int, block_info=None) -> np.ndarray:
    """The saved neighbours of a block of sample chunks (whole samples, rows from ``offset`` + its location)."""
    t0 = time.perf_counter()
    (lo, hi), _ = block_info[0]["array-location"]
    samples = open_samples(job.workdir, job.split, job.samples_hash)
    cps = samples.chunks_per_sample
    sample_ids = range((offset + lo) // cps, (offset + hi) // cps)
    pair_sample, pair_key = sample_documents(samples, sample_ids)
    embedder = get_embedder(job.embed)
    reused, x_reused = (tune_embeddings(job.workdir, job.split, offset + lo, offset + hi) if job.reuse_tune
                        else (np.zeros(0, np.int64), None))
    rest = np.setdiff1d(np.arange(len(tokens)), reused)
    texts = chunk_texts(job.gpt, list(tokens[rest]))
    ids = embedder.tokenizer.encode_for_model(texts, job.embed.max_chunk_length, num_threads=1)
    x = np.empty((len(tokens), embedder.dim), np.float32)
    x[rest] = embedder.embed_ids(ids)
    if len(reused):
        x[reused] = x_reused
    t_embed = time.perf_counter()
    index = searcher(job.workdir, job.tag, job.nprobe, job.ef_search, job.k_query)
    faiss().omp_set_num_threads(block_task_threads())
    _, found = index.search(x, min(job.k_query, max(int(index.ntotal), 1)))
    t_search = time.perf_counter()
    first_row, keys = document_lookup(job.workdir)
    kept = filter_neighbors(found, lookup_documents(first_row, keys, found), np.repeat(np.arange(len(sample_ids)), cps),
                            pair_sample, pair_key, job.k_save)
    figures.add(f"query-{job.split}", n_rows=len(kept), n_reused=len(reused), embed_seconds=t_embed - t0,
                search_seconds=t_search - t_embed,
                filter_seconds=time.perf_counter() - t_search, n_found_short=int((kept[:, -1] < 0).sum()))
    return kept


def neighbors(tokens, job: QueryJob, offset: int = 0):
    """The lazy saved neighbours of a lazy array of sample-chunk tokens whose first row is row ``offset``."""
    from dask.base import tokenize

    return tokens.map_blocks(neighbors_of_block, job, offset, chunks=(tokens.chunks[0], (job.k_save,)), dtype=np.int64,
                             name=f"query-{job.split}-{tokenize(tokens.name, job, offset)}",
                             meta=np.empty((0, 0), np.int64))


# ---------------------------------------------------------------- the stage


def query_rows_per_block(config: BuildConfig) -> int:
    """Rows of neighbors.zarr per block: whole samples, about --block-size rows."""
    cps = config.chunks_per_sample
    return max(cps, (config.chunk.block_size // cps) * cps)


def search_settings(config: BuildConfig, workdir: str) -> tuple[int, int]:
    """nprobe and efSearch of the search: the flags, or what tune chose for ``--query-nprobe auto``."""
    q = config.query
    if q.nprobe == "auto":
        rec = Ledger(workdir, "tune").record(0)
        if rec is None:
            raise InputError(f"{workdir}: --query-nprobe auto needs the tune's choice: run --tasks tune "
                             "(query-neighbors runs it when it is missing)")
        return int(rec["nprobe"]), int(rec["ef_search"])
    if q.nprobe is None:  # workdirs made before "auto": an eighth of the lists
        return default_nprobe(int(trained(workdir).get("nlist", 0))), q.ef_search
    return int(q.nprobe), q.ef_search


def split_job(ex: Executor, config: BuildConfig, split: str, settings: tuple[int, int]):
    """The split's samples plan and the StoreJob of its neighbours."""
    w = ex.workdir
    plan = prepare_samples(w, config, split)
    samples_hash = plan.to_dict()["hash"]
    n_rows = plan.n_samples * plan.chunks_per_sample
    nprobe, ef_search = settings
    job = QueryJob(w, split, trained(w)["tag"], config.embed, config.chunk.gpt_spec(),
                   config.query.num_neighbors_query, config.query.num_neighbors_save, nprobe, ef_search,
                   samples_hash, reuse_tune=config.query.nprobe == "auto")
    target = ZarrTarget.create(w, f"query-{split}", neighbors_path(w, split), (n_rows, config.query.num_neighbors_save),
                               np.int64, query_rows_per_block(config), fill_value=-1)
    return plan, StoreJob(f"query-{split}", target,
                          lambda lo, hi: neighbors(sample_chunk_tokens(w, split, samples_hash, lo, hi), job, lo),
                          fingerprint=job.fingerprint)


def query_all_splits(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    w = ex.workdir
    t0 = time.perf_counter()
    if not index_complete(w):
        raise InputError(f"{w} has no finished index: run --tasks index-add (or index-build) first")
    nprobe, ef_search = search_settings(config, w)
    jobs = {split: split_job(ex, config, split, (nprobe, ef_search)) for split in SPLIT_NAMES}
    runs = ex.store([job for _, job in jobs.values()], "query-neighbors", unit="chunks")
    load = {k: v for k, v in {"scheduler_tasks_max": ex.take_max_scheduler_tasks()}.items() if v is not None}
    per_split: dict[str, Any] = {}
    for split, (plan, job) in jobs.items():
        write_query_meta(w, plan)
        run = runs[job.stage]
        sums, memory = ex.collect(job.stage)
        per_split[split] = ex.write_stats(
            job.stage, run, run.seconds, (sums, memory), split=split, n_samples=plan.n_samples,
            n_query_chunks=job.target.shape[0], chunks_per_s=round(run.rows / max(run.seconds, 1e-9), 2),
            rows_with_fewer_neighbors=int(sums.get("n_found_short", 0)), **load)
    total = sum(s["n_query_chunks"] for s in per_split.values())
    peaks: dict[str, dict[str, float]] = {}
    for s in per_split.values():
        for label in ("worker_peak_rss_mb", "worker_rss_anon_mb", "worker_rss_file_mb"):
            for who, v in s.get(label, {}).items():
                peaks.setdefault(label, {})[who] = max(peaks.get(label, {}).get(who, 0.0), v)
    seconds = time.perf_counter() - t0
    return ex.write_stats("query-neighbors", None, seconds, nprobe=nprobe, ef_search=ef_search,
                          n_query_chunks=total, splits=per_split,
                          chunks_per_s=round(total / max(seconds, 1e-9), 2), **peaks, **load)


def query_complete(workdir: str, split: str) -> bool:
    """Whether the split's neighbours are built: meta.json written and every block recorded."""
    try:
        meta = read_json(query_meta_path(workdir, split))
    except (OSError, ValueError):
        return False
    ledger = Ledger(workdir, f"query-{split}")
    fingerprint = ledger.stored_fingerprint()
    if not fingerprint or not fingerprint.startswith(f"{meta.get('hash')}:"):
        return False
    cps = meta["seq_length"] // meta["chunk_length"]
    from ..formats import zarr_blocks

    n_blocks = zarr_blocks.open_format(neighbors_path(workdir, split)).n_blocks if meta["n_samples"] * cps else 0
    return Ledger(workdir, f"query-{split}", fingerprint).complete(n_blocks)
