"""index-train and index-add: a Faiss index encoded block-parallel and merged by a Dask reduction.

index-train reads the embeddings of the rows in ``db/sampled.zarr``, trains the
planned index (``plan/index.py``) in one task with every core of its worker
(and the GPU for clustering when faiss-gpu and a CUDA device are there), and
writes ``W/index/<tag>/trained.faissindex``.

index-add is two Dask expressions:

1. ``map_blocks`` of the embeddings encoding each span of rows against the
   trained index (``sa_encode``: list number and code), stored by the executor
   into a *partial* per span (:class:`PartialsTarget`: the span's entries
   grouped by inverted list, ids = chunks.zarr rows) under
   ``W/index/<tag>/partials/``, recorded in the ledger, so a rerun resumes;
2. ``dask.array.reduction`` over the partials in row order: ``combine`` merges
   up to ``FAN_IN`` partials into one on disk, ``aggregate`` writes the lists,
   a slice at a time, straight into the final index file in Faiss's own layout
   (``formats/inverted_lists.py``): ``added.faissindex``, or with
   ``--index-on-disk`` on-disk inverted lists (``added.ivfdata`` beside it).

Every list holds its entries in row order, so the result is the index a
single-process ``add`` of all embeddings in row order makes (byte for byte,
for the in-memory file), and no process ever holds the whole index. Indexes
without inverted lists whose codes can be appended (``Flat``, ``PQ``, ``SQ8``)
take the same path with one list.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig
from ..engine import faults, figures
from ..engine.executor import Executor, StoreJob
from ..engine.process_env import block_task_threads, process_memory, task_identity
from ..engine.targets import rows_of
from ..errors import InputError
from ..formats import zarr_blocks
from ..formats.faiss_index import faiss, has_gpu, index_chain, ivf_of, load_index, read_index_file, write_index_atomic
from ..formats.inverted_lists import (
    IndexLayout,
    ListSlices,
    Partial,
    array_lists_header,
    fill_lists,
    ondisk_lists,
    partial_files,
    serialized_head,
    set_ntotal,
    split_codes,
)
from ..formats.ledger import Ledger, file_sizes
from ..formats.workdir import (
    added_index_path,
    added_ivfdata_path,
    atomic_path,
    embeddings_path,
    index_dir,
    index_partials_dir,
    sampled_path,
    trained_index_path,
)
from ..plan import index as index_plan
from ..plan.blocks import n_blocks
from ..text.embedder import default_device, embedding_dim
from .embed import embed_complete


def plan_for(config: BuildConfig, n_chunks: int) -> index_plan.IndexPlan:
    c = config.index
    return index_plan.plan_index(c.index_str, c.metric, n_chunks, embedding_dim(config.embed.bert_model), c.memory,
                                 c.ntrain)


def check_supported(index, factory: str) -> None:
    """index-add merges inverted lists or appends flat codes; refuse anything else."""
    if ivf_of(index) is not None or isinstance(index_chain(index)[-1], faiss().IndexFlatCodes):
        return
    raise InputError(
        f"index {factory!r} ({type(index_chain(index)[-1]).__name__}) cannot be built block by block: index-add "
        "merges inverted lists (IVF indexes) or appends codes (Flat, PQ, SQ). Use an IVF index, e.g. IVF1024,Flat "
        "or OPQ32_128,IVF4096_HNSW32,PQ32, or --index-str auto"
    )


def use_gpu_here() -> bool:
    """faiss-gpu is installed and this process runs on a GPU (see text/embedder.default_device)."""
    return has_gpu() and default_device() == "cuda"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


# ---------------------------------------------------------------- index-train


def trained(workdir: str) -> dict[str, Any]:
    """The record of the trained index (tag, factory, nlist, sha256), or InputError if there is none."""
    rec = Ledger(workdir, "index-train").record(0)
    if not rec:
        raise InputError(f"{workdir} has no trained index: run --tasks index-train first")
    return rec


def gather_rows(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Rows of a 2-D stored array (sorted ids), read one block at a time."""
    fmt = zarr_blocks.open_format(path)
    out = np.empty((len(rows), fmt.shape[1]), dtype=np.float32)
    blocks = rows // fmt.block_rows
    for b in np.unique(blocks):
        sel = np.flatnonzero(blocks == b)
        out[sel] = zarr_blocks.read_block(path, int(b))[rows[sel] - b * fmt.block_rows]
    return out


def train_task(workdir: str, tag: str, factory: str, threads: int) -> dict[str, Any]:
    f = faiss()
    t0 = time.perf_counter()
    faults.before_block(workdir, "index-train", 0)
    x = gather_rows(embeddings_path(workdir), np.asarray(zarr_blocks.read_rows(sampled_path(workdir), 0, 2**62), np.int64))
    t_read = time.perf_counter()
    index = f.index_factory(x.shape[1], factory)
    previous = f.omp_get_max_threads()
    f.omp_set_num_threads(threads)
    used_gpu = False
    ivf = ivf_of(index)
    clustering = None
    try:
        if ivf is not None and use_gpu_here():
            # Clustering (the costly part of training) on every GPU of this worker. Faiss's
            # pointer field holds no Python reference: keep the GPU index alive here.
            clustering = f.index_cpu_to_all_gpus(f.IndexFlatL2(ivf.d))
            ivf.clustering_index = clustering
            used_gpu = True
        index.train(x)
    finally:
        f.omp_set_num_threads(previous)
        if ivf is not None:
            ivf.clustering_index = None
        del clustering
    t_train = time.perf_counter()
    path = trained_index_path(workdir, tag)
    write_index_atomic(index, path)
    return {"n_train": int(len(x)), "read_seconds": round(t_read - t0, 3), "train_seconds": round(t_train - t_read, 3),
            "gpu": used_gpu, "sha256": file_sha256(path), **process_memory(), "worker": task_identity()}


def train_index(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    """index-train: train the planned index on the sampled embeddings (skipped if done)."""
    import dask

    w = ex.workdir
    t0 = time.perf_counter()
    if not embed_complete(w):
        raise InputError(f"{w}: embeddings are not complete; run --tasks embed first")
    n_chunks = zarr_blocks.open_format(embeddings_path(w)).shape[0]
    plan = plan_for(config, n_chunks)
    n_sampled = zarr_blocks.open_format(sampled_path(w)).shape[0]
    problem = index_plan.training_problem(
        index_plan.IndexPlan(plan.factory, plan.core, plan.metric, plan.nlist, n_sampled), n_chunks)
    if problem:
        raise InputError(problem)
    path = trained_index_path(w, plan.tag)
    ledger = Ledger(w, "index-train")
    if ledger.done_blocks(1) and ledger.record(0).get("factory") == plan.factory:
        log(f"[index-train] {plan.factory} already trained: skipped")
        return ex.write_stats("index-train", None, time.perf_counter() - t0, skipped=True, factory=plan.factory,
                              tag=plan.tag)
    threads = os.cpu_count() or 1
    log(f"[index-train] training {plan.factory} on {n_sampled} chunks with {threads} threads")
    result = ex.compute(dask.delayed(train_task, pure=False)(w, plan.tag, plan.factory, threads,
                                                            dask_key_name=f"index-train-{plan.tag}"))
    ex.record("index-train", [{"block": 0, "rows": [0, n_sampled], "files": file_sizes(w, [path]), "tag": plan.tag,
                               "factory": plan.factory, "nlist": plan.nlist, "sha256": result["sha256"]}], fresh=True)
    return ex.write_stats("index-train", None, time.perf_counter() - t0, factory=plan.factory, tag=plan.tag, **result)


# ---------------------------------------------------------------- index-add: encode


@dataclass(frozen=True)
class PartialsTarget:
    """Where index-add's encoded spans land (``da.store`` target): one partial folder per span of rows."""

    workdir: str
    stage: str
    folder: str
    n_rows: int
    span_rows: int
    layout: IndexLayout

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.n_rows, self.span_rows)

    def rows(self, block: int) -> tuple[int, int]:
        lo = block * self.span_rows
        return lo, min(lo + self.span_rows, self.n_rows)

    def partial(self, block: int) -> Path:
        lo, hi = self.rows(block)
        return Path(self.folder) / f"rows-{lo:012d}-{hi:012d}"

    def files(self, block: int) -> list[Path]:
        return partial_files(self.partial(block))

    def record(self, block: int) -> dict[str, Any]:
        return {"block": block, "rows": list(self.rows(block)), "files": file_sizes(self.workdir, self.files(block))}

    def region(self, lo: int, hi: int) -> tuple[slice, ...]:
        return (slice(lo, hi), slice(0, self.layout.sa_code_size))

    def __setitem__(self, key: Any, codes: np.ndarray) -> None:
        lo, hi = rows_of(key)
        block = lo // self.span_rows
        if (lo, hi) != self.rows(block):
            raise ValueError(f"rows {lo}:{hi} are not span {block} of {self.folder}")
        faults.before_block(self.workdir, self.stage, block)
        list_no, body = split_codes(self.layout, codes)
        Partial.from_entries(list_no, np.arange(lo, hi, dtype=np.int64), body).save(self.partial(block))


def encode_rows(x: np.ndarray, trained_path: str, block_rows: int) -> np.ndarray:
    """sa codes (list number then code) of embeddings against the trained index, a block of rows at a time."""
    t0 = time.perf_counter()
    index = load_index(trained_path, search_tables=False)
    faiss().omp_set_num_threads(block_task_threads())
    out = np.empty((len(x), index.sa_code_size()), np.uint8)
    for lo in range(0, len(x), block_rows):
        out[lo : lo + block_rows] = index.sa_encode(np.ascontiguousarray(x[lo : lo + block_rows], dtype=np.float32))
    figures.add("index-encode", n_rows=len(x), encode_seconds=time.perf_counter() - t0)
    return out


def encoded(embeddings, trained_path: str, sha256: str, code_size: int, block_rows: int):
    """The lazy sa codes of a lazy array of embeddings (``map_blocks``, one encode per Dask chunk)."""
    from dask.base import tokenize

    return embeddings.map_blocks(encode_rows, trained_path, block_rows, chunks=(embeddings.chunks[0], (code_size,)),
                                 dtype=np.uint8, name=f"index-encode-{tokenize(embeddings.name, sha256)}",
                                 meta=np.empty((0, 0), np.uint8))


# ---------------------------------------------------------------- index-add: the reduction


def _flat(parts) -> list[str]:
    """The partial folders of a reduction step's input, in row order (nested lists of 1x1 object arrays)."""
    if isinstance(parts, (list, tuple)):
        return [p for part in parts for p in _flat(part)]
    return [str(p) for p in np.asarray(parts, dtype=object).ravel()]


def _as_block(value) -> np.ndarray:
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = value
    return out


def _identity(block, axis=None, keepdims=None):
    return block


def merge_partials(parts, axis=None, keepdims=None, *, workdir: str, stage: str, layout: IndexLayout):
    """Merge partials (in row order) into one on disk, streamed a slice of lists at a time."""
    folders = _flat(parts)
    if len(folders) == 1:
        return _as_block(folders[0])
    first, last = Path(folders[0]).name.split("-"), Path(folders[-1]).name.split("-")
    out = Path(folders[0]).parent / f"rows-{first[1]}-{last[2]}"
    faults.before_block(workdir, stage, int(first[1]))
    with ListSlices([Path(f) for f in folders], layout) as lists:
        lists.write_partial(out)
    return _as_block(str(out))


def assemble(parts, axis=None, keepdims=None, *, workdir: str, tag: str, on_disk: bool):
    """Write the final index from the last partials: the lists streamed into the file, in Faiss's own layout,
    a slice of lists at a time, whatever the index size."""
    faults.before_block(workdir, "index-assemble", 0)
    f = faiss()
    t0 = time.perf_counter()
    folders = [Path(p) for p in _flat(parts)]
    index = read_index_file(trained_index_path(workdir, tag), search_tables=False)
    layout = IndexLayout.of(index)
    ivf = ivf_of(index)
    final, ivfdata = added_index_path(workdir, tag), added_ivfdata_path(workdir, tag)
    with atomic_path(index_dir(workdir, tag) / "assemble") as tmp, ListSlices(folders, layout) as lists:
        tmp.mkdir()
        if ivf is None:
            if on_disk:
                raise InputError("--index-on-disk needs an IVF index (inverted lists live on disk)")
            chain = index_chain(index)
            for folder in folders:
                chain[-1].add_sa_codes(np.ascontiguousarray(Partial.load(folder).codes))
            set_ntotal(index, lists.ntotal)
            f.write_index(index, str(tmp / final.name))
        elif on_disk:
            set_ntotal(index, lists.ntotal)
            lists.write_file(tmp / ivfdata.name)
            invlists = ondisk_lists(lists.sizes, layout, tmp / "sizing.ivfdata", str(ivfdata))
            ivf.replace_invlists(invlists, True)
            invlists.this.disown()
            f.write_index(index, str(tmp / final.name))
        else:
            set_ntotal(index, lists.ntotal)
            head = serialized_head(index, layout)
            if head is None:  # an IVF subclass that stores more after its lists: fill them in memory
                for folder in folders:
                    fill_lists(ivf.invlists, Partial.load(folder, mmap=True))
                f.write_index(index, str(tmp / final.name))
            else:
                lists.write_file(tmp / final.name, head + array_lists_header(lists.sizes, layout))
        ntotal = lists.ntotal
        del index
        if on_disk:
            os.replace(tmp / ivfdata.name, ivfdata)
        os.replace(tmp / final.name, final)
    return _as_block({"ntotal": ntotal, "seconds": round(time.perf_counter() - t0, 3), "sha256": file_sha256(final),
                      "rss_mb": process_memory()["rss_mb"], "worker": task_identity()})


def index_reduction(workdir: str, tag: str, folders: list[Path], layout: IndexLayout, on_disk: bool,
                    fan_in: int | None = None):
    """The final index as a ``dask.array.reduction`` over the partials (in row order).

    A Dask chunk holds ``fan_in`` partials, merged into one by its chunk task (when there is more than
    one chunk), so the graph has ~2 tasks per ``fan_in`` partials: a tree of fan-in ``fan_in`` whatever
    the number of partials, without a task per partial.
    """
    import dask.array as da
    from dask.base import tokenize

    fan_in = max(2, fan_in or index_plan.FAN_IN)
    handles = np.empty((len(folders), 1), dtype=object)
    handles[:, 0] = [str(p) for p in folders]
    token = tokenize(workdir, tag, [str(p) for p in folders], on_disk)
    partials = da.from_array(handles, chunks=(fan_in, 1), name=f"index-partials-{token}")
    merge = functools.partial(merge_partials, workdir=workdir, stage="index-merge", layout=layout)
    return da.reduction(
        partials, _identity if partials.numblocks[0] == 1 else merge,
        functools.partial(assemble, workdir=workdir, tag=tag, on_disk=on_disk),
        combine=merge, axis=(0, 1), keepdims=True, concatenate=False, dtype=object,
        meta=np.empty((0, 0), dtype=object), split_every={0: fan_in, 1: 1}, name=f"index-add-{token}")


def add_to_index(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    """index-add: encode every span into a partial (resumable), then reduce the partials into the final index."""
    w = ex.workdir
    t0 = time.perf_counter()
    info = trained(w)
    tag = info["tag"]
    fingerprint = f"{info['sha256']}:{'on-disk' if config.index.on_disk else 'in-memory'}"
    final_ledger = Ledger(w, "index-add", fingerprint)
    if final_ledger.done_blocks(1):
        log(f"[index-add] {added_index_path(w, tag)} already built: skipped")
        return ex.write_stats("index-add", None, time.perf_counter() - t0, skipped=True,
                              ntotal=final_ledger.record(0)["ntotal"], tag=tag)
    emb_path = str(embeddings_path(w))
    emb = zarr_blocks.open_format(emb_path)
    n, B = emb.shape[0], emb.block_rows
    trained_path = str(trained_index_path(w, tag))
    layout = IndexLayout.of(load_index(trained_path, search_tables=False))
    span_rows = index_plan.encode_span(emb.n_blocks, B) * B
    target = PartialsTarget(w, "index-encode", str(index_partials_dir(w, tag)), n, span_rows, layout)
    job = StoreJob("index-encode", target, lambda lo, hi: encoded(
        zarr_blocks.lazy_rows(emb_path, lo, hi, (hi - lo,), name="read-embeddings"), trained_path, info["sha256"],
        layout.sa_code_size, B), fingerprint=info["sha256"])
    encode = ex.store([job], "index-add: encode", unit="chunks")[job.stage]
    t_encode = time.perf_counter()
    folders = [target.partial(b) for b in range(target.n_blocks)]
    log(f"[index-add] reducing {len(folders)} partials into {added_index_path(w, tag).name}"
        + (" (on disk)" if config.index.on_disk else ""))
    result = ex.compute(index_reduction(w, tag, folders, layout, config.index.on_disk))[0, 0]
    if result["ntotal"] != n:
        raise RuntimeError(f"assembled index holds {result['ntotal']} entries, expected {n}")
    files = [added_index_path(w, tag)] + ([added_ivfdata_path(w, tag)] if config.index.on_disk else [])
    ex.record("index-add", [{"block": 0, "rows": [0, n], "files": file_sizes(w, files), "ntotal": n,
                             "sha256": result["sha256"], "tag": tag}], fingerprint)
    # The partials and their records are spent once the final index is recorded.
    shutil.rmtree(index_partials_dir(w, tag), ignore_errors=True)
    ex.forget("index-encode")
    seconds = time.perf_counter() - t0
    levels, left = 0, len(folders)
    while left > index_plan.FAN_IN:
        left, levels = -(-left // index_plan.FAN_IN), levels + 1
    return ex.write_stats(
        "index-add", encode, seconds, ex.collect("index-encode"), ntotal=n, tag=tag, on_disk=config.index.on_disk,
        merge_levels=levels,
        encode_seconds=round(t_encode - t0, 3), reduce_seconds=round(time.perf_counter() - t_encode, 3),
        assemble_seconds=result["seconds"], partials=len(folders), assemble_worker_peak_rss_mb=result["rss_mb"],
        chunks_per_s=round(n / max(seconds, 1e-9), 1),
    )


def index_complete(workdir: str) -> bool:
    """Whether the final index is built and recorded for the trained index."""
    try:
        info = trained(workdir)
    except InputError:
        return False
    for mode in ("in-memory", "on-disk"):
        if Ledger(workdir, "index-add", f"{info['sha256']}:{mode}").complete(1):
            return True
    return False
