"""index-train and index-add: a Faiss index built block-parallel and merged by a reduction.

index-train reads the embeddings of the rows in ``db/sampled.zarr``, trains the
planned index (``index_plan.py``) with every core of the worker that runs it
(and the GPU for clustering when faiss-gpu and a CUDA device are there), and
writes ``W/index/<tag>/trained.faissindex``.

index-add encodes the blocks of ``db/embeddings.zarr`` against the trained
index inside the workers (``sa_encode``: coarse assignment and codes), a span of
consecutive blocks per task (``index_plan.encode_span``), into a *partial*: the
span's entries grouped by inverted list, ids = chunks.zarr row ids, saved as a
folder of ``.npy`` files under ``W/index/<tag>/partials/``. A tree reduction
merges partials, level by level, keeping row order inside every list, until few
enough remain (usually none is needed); the last step writes the lists, a slice
of lists at a time, straight into the final index file in Faiss's own layout:
a serialized in-memory index (``added.faissindex``) or, with
``--index-on-disk``, Faiss on-disk inverted lists (``added.faissindex`` +
``added.ivfdata``, opened with ``IO_FLAG_ONDISK_SAME_DIR`` so the workdir can
move). Because every list ends up holding its entries in row order, the result
is the index a single-process ``add`` of all embeddings in row order makes
(byte for byte, for the in-memory file).

Indexes without inverted lists whose codes can be appended (``Flat``, ``PQ``,
``SQ8``...) take the same path with one list.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import arrays
from .errors import InputError
from .faiss_util import faiss, has_gpu
from . import index_plan
from .runner import block_record, block_task_threads
from .workdir import (
    Ledger,
    added_index_path,
    added_ivfdata_path,
    atomic_path,
    clear_stage_done,
    embeddings_path,
    file_record,
    index_dir,
    index_partials_dir,
    mark_stage_done,
    sampled_path,
    stage_done,
    trained_index_path,
)



# ---------------------------------------------------------------- index structure


def ivf_of(index):
    """The IndexIVF inside ``index`` (through pre-transforms), or None."""
    try:
        return faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def index_chain(index) -> list:
    """``[index, ..., innermost]`` through IndexPreTransform wrappers.

    Callers keep the whole list alive: a SWIG proxy of a sub-index does not
    keep its parent (the owner of the sub-index) alive.
    """
    f = faiss()
    chain = [f.downcast_index(index)]
    while isinstance(chain[-1], f.IndexPreTransform):
        chain.append(f.downcast_index(chain[-1].index))
    return chain


def check_supported(index, factory: str) -> None:
    """index-add merges inverted lists or appends flat codes; refuse anything else."""
    f = faiss()
    if ivf_of(index) is not None:
        return
    chain = index_chain(index)
    if isinstance(chain[-1], f.IndexFlatCodes):
        return
    raise InputError(
        f"index {factory!r} ({type(chain[-1]).__name__}) cannot be built block by block: index-add merges inverted "
        "lists (IVF indexes) or appends codes (Flat, PQ, SQ). Use an IVF index, e.g. IVF1024,Flat or "
        "OPQ32_128,IVF4096_HNSW32,PQ32, or --index-str auto"
    )


def use_gpu_here() -> bool:
    """faiss-gpu is installed and this process runs on a GPU (see embed.default_device)."""
    from .embed import default_device

    return has_gpu() and default_device() == "cuda"


def read_index_file(path: str | Path, mmap: bool = False):
    f = faiss()
    flags = 0
    if Path(path).with_suffix(".ivfdata").exists():
        flags |= f.IO_FLAG_ONDISK_SAME_DIR
    elif mmap:
        flags |= f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY
    return f.read_index(str(path), flags)


def write_index_atomic(index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss().write_index(index, str(tmp))


@functools.lru_cache(maxsize=4)
def _cached_index(path: str, mtime_ns: int, size: int, mmap: bool):
    return read_index_file(path, mmap=mmap)


def load_index(path: str | Path, mmap: bool = False):
    """This process's copy of the index file (read once per worker, memory-mapped if asked)."""
    st = os.stat(path)
    return _cached_index(str(path), st.st_mtime_ns, st.st_size, mmap)


def index_tag(workdir: str) -> str:
    """The tag of the index planned for this workdir (recorded by index-train)."""
    info = stage_done(workdir, "index-train")
    if not info:
        raise InputError(f"{workdir} has no trained index: run --tasks index-train first")
    return info["tag"]


# ---------------------------------------------------------------- training


def gather_rows(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Rows of a 2-D Zarr array (sorted ids), read one block at a time."""
    arr = arrays.open_read(path)
    B = arr.chunks[0]
    out = np.empty((len(rows), arr.shape[1]), dtype=np.float32)
    blocks = rows // B
    for b in np.unique(blocks):
        sel = np.flatnonzero(blocks == b)
        data = arrays.read_rows(path, b * B, (b + 1) * B)
        out[sel] = data[rows[sel] - b * B]
    return out


def train_task(workdir: str, tag: str, factory: str, threads: int) -> dict[str, Any]:
    from . import faults

    f = faiss()
    t0 = time.perf_counter()
    faults.before_block(workdir, "index-train", 0)
    rows = arrays.open_read(sampled_path(workdir))[:]
    x = gather_rows(embeddings_path(workdir), np.asarray(rows, np.int64))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    write_index_atomic(index, path)
    return {"n_train": int(len(x)), "read_seconds": round(t_read - t0, 3),
            "train_seconds": round(t_train - t_read, 3), "gpu": used_gpu, "bytes": path.stat().st_size}


def train_index(runner, config, log=print) -> dict[str, Any]:
    """index-train: train the planned index on the sampled embeddings (skipped if done)."""
    import dask

    from .build import index_plan_for
    from .index_plan import training_problem

    w = runner.workdir
    t0 = time.perf_counter()
    n_chunks = arrays.open_read(embeddings_path(w)).shape[0]
    if not stage_done(w, "embed"):
        raise InputError(f"{w}: embeddings are not complete; run --tasks embed first")
    plan = index_plan_for(config, n_chunks)
    n_sampled = arrays.open_read(sampled_path(w)).shape[0]
    plan_check = plan.__class__(plan.factory, plan.core, plan.metric, plan.nlist, n_sampled)
    problem = training_problem(plan_check, n_chunks)
    if problem:
        raise InputError(problem)
    path = trained_index_path(w, plan.tag)
    done = stage_done(w, "index-train")
    if done and done.get("factory") == plan.factory and path.exists() and path.stat().st_size == done.get("bytes"):
        log(f"[index-train] {plan.factory} already trained: skipped")
        return runner.write_stats("index-train", None, time.perf_counter() - t0, skipped=True, factory=plan.factory,
                                  tag=plan.tag)
    threads = os.cpu_count() or 1
    log(f"[index-train] training {plan.factory} on {n_sampled} chunks with {threads} threads")
    result = runner.compute_one(dask.delayed(train_task, pure=False)(w, plan.tag, plan.factory, threads))
    mark_stage_done(w, "index-train", {"tag": plan.tag, "factory": plan.factory, "nlist": plan.nlist,
                                       "bytes": path.stat().st_size, "n_train": n_sampled})
    # A new trained index invalidates any partial or final index of an earlier one.
    for stage in list_stages(w, "index-"):
        if stage != "index-train":
            Ledger(w, stage).clear()
    from .workdir import clear_stage_done

    clear_stage_done(w, "index-add")
    return runner.write_stats("index-train", None, time.perf_counter() - t0, factory=plan.factory, tag=plan.tag,
                              **result)


def list_stages(workdir: str, prefix: str) -> list[str]:
    from .workdir import state_dir

    folder = state_dir(workdir) / "blocks"
    return [p.name for p in folder.glob(f"{prefix}*")] if folder.exists() else []


# ---------------------------------------------------------------- partials


@dataclass(frozen=True)
class IndexLayout:
    """What a partial's entries look like for one trained index."""

    nlist: int            # 1 for indexes without inverted lists
    code_size: int        # bytes per entry, list number excluded
    coarse_size: int      # bytes of the list number at the head of an sa code

    @classmethod
    def of(cls, index) -> "IndexLayout":
        ivf = ivf_of(index)
        if ivf is not None:
            return cls(int(ivf.nlist), int(ivf.code_size), int(ivf.coarse_code_size()))
        return cls(1, int(index.sa_code_size()), 0)


def split_codes(layout: IndexLayout, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sa codes -> (list number per entry, codes without the list number: a view into ``codes``)."""
    n = len(codes)
    if layout.coarse_size == 0:
        return np.zeros(n, np.int64), codes
    head = codes[:, : layout.coarse_size].astype(np.int64)
    lists = np.zeros(n, np.int64)
    for byte in range(layout.coarse_size):  # little-endian, as Faiss's encode_listno writes it
        lists |= head[:, byte] << (8 * byte)
    return lists, codes[:, layout.coarse_size :]


@dataclass
class Partial:
    """Entries grouped by inverted list, row order kept inside each list."""

    lists: np.ndarray   # int64 [m]: the non-empty lists, ascending
    counts: np.ndarray  # int64 [m]: entries per list
    ids: np.ndarray     # int64 [n]
    codes: np.ndarray   # uint8 [n, code_size]

    @classmethod
    def from_entries(cls, list_no: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> "Partial":
        order = np.argsort(list_no, kind="stable")
        lists, counts = np.unique(list_no[order], return_counts=True)
        return cls(lists.astype(np.int64), counts.astype(np.int64), ids[order], codes[order])

    @classmethod
    def merge(cls, parts: Sequence["Partial"]) -> "Partial":
        """Merge partials given in row order: each list keeps the earlier partial's entries first."""
        list_no = np.concatenate([np.repeat(p.lists, p.counts) for p in parts])
        ids = np.concatenate([p.ids for p in parts])
        codes = np.concatenate([p.codes for p in parts])
        return cls.from_entries(list_no, ids, codes)

    def save(self, folder: Path) -> None:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            for name in ("lists", "counts", "ids", "codes"):
                np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> "Partial":
        mode = "r" if mmap else None
        return cls(*(np.load(folder / f"{n}.npy", mmap_mode=mode, allow_pickle=False)
                     for n in ("lists", "counts", "ids", "codes")))

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.codes.nbytes)


def partial_folder(workdir: str, tag: str, level: int, number: int) -> Path:
    return index_partials_dir(workdir, tag) / f"L{level}" / f"{number:08d}"


def folder_record(workdir: str, folder: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    for p in sorted(folder.iterdir()):
        files.update(file_record(workdir, p))
    return files


def discard_if_assembled(workdir: str, tag: str, folder: Path, stage: str, number: int) -> None:
    """Remove a partial written after the final index was assembled (and its partials removed).

    Dask runs a task again when the worker holding its result dies, even if that
    result already reached the driver; such a late run would otherwise leave its
    partial in the finished workdir (seen in test_killing_a_worker_in_every_stage).
    add_to_index marks the stage done before it removes the partials, so a run
    that renamed its folder into place after that removal sees the mark here.
    """
    done = stage_done(workdir, "index-add")
    if done and done.get("tag") == tag:
        shutil.rmtree(folder, ignore_errors=True)
        Ledger(workdir, stage).forget(number)


def encode_span_task(workdir: str, tag: str, number: int, first_block: int, n_blocks: int) -> dict[str, Any]:
    """Encode embedding blocks ``first_block .. first_block + n_blocks - 1`` against the trained
    index into partial ``number`` (one block of vectors in memory at a time, plus the span's codes,
    written in place)."""
    from . import faults

    f = faiss()
    t0 = time.perf_counter()
    index = load_index(trained_index_path(workdir, tag))
    layout = IndexLayout.of(index)
    path = embeddings_path(workdir)
    emb = arrays.open_read(path)
    B = emb.chunks[0]
    f.omp_set_num_threads(block_task_threads())
    read_s = encode_s = 0.0
    lo = first_block * B
    hi = min((first_block + n_blocks) * B, emb.shape[0])
    list_no = np.empty(hi - lo, np.int64)
    codes = np.empty((hi - lo, layout.code_size), np.uint8)
    for start in range(lo, hi, B):
        t = time.perf_counter()
        x = np.ascontiguousarray(arrays.read_rows(path, start, min(start + B, hi)), dtype=np.float32)
        t_read = time.perf_counter()
        rows = slice(start - lo, start - lo + len(x))
        list_no[rows], codes[rows] = split_codes(layout, index.sa_encode(x))
        read_s += t_read - t
        encode_s += time.perf_counter() - t_read
        del x
    partial = Partial.from_entries(list_no, np.arange(lo, hi, dtype=np.int64), codes)
    del list_no, codes
    faults.before_block(workdir, "index-add", number)
    folder = partial_folder(workdir, tag, 0, number)
    partial.save(folder)
    record = block_record(len(partial.ids), t0, read_seconds=round(read_s, 4), encode_seconds=round(encode_s, 4),
                          bytes=partial.nbytes, blocks=[first_block, first_block + n_blocks])
    record["files"] = folder_record(workdir, folder)
    Ledger(workdir, "index-add").write(number, record)
    discard_if_assembled(workdir, tag, folder, "index-add", number)
    return {"block": number, **record}


def merge_task(workdir: str, tag: str, level: int, number: int, inputs: Sequence[int]) -> dict[str, Any]:
    """Merge partials ``inputs`` of ``level`` into partial ``number`` of ``level + 1``."""
    from . import faults

    faults.before_block(workdir, f"index-merge-L{level + 1}", number)
    t0 = time.perf_counter()
    parts = [Partial.load(partial_folder(workdir, tag, level, i)) for i in inputs]
    merged = Partial.merge(parts)
    folder = partial_folder(workdir, tag, level + 1, number)
    merged.save(folder)
    record = block_record(len(merged.ids), t0, bytes=merged.nbytes, inputs=list(map(int, inputs)))
    record["files"] = folder_record(workdir, folder)
    Ledger(workdir, f"index-merge-L{level + 1}").write(number, record)
    discard_if_assembled(workdir, tag, folder, f"index-merge-L{level + 1}", number)
    return {"block": number, **record}


# ---------------------------------------------------------------- final assembly


def assemble(workdir: str, tag: str, level: int, numbers: Sequence[int], on_disk: bool) -> dict[str, Any]:
    """Stream the last partials into the trained index's inverted lists; write added.faissindex.

    IVF indexes never hold their lists in this process: the lists are written
    straight into the file, in Faiss's own layout (``ListWriter``), in memory
    as in ``--index-on-disk`` mode; the worker's memory stays at one slice of
    lists whatever the index size.
    """
    from . import faults

    faults.before_block(workdir, "index-assemble", 0)
    f = faiss()
    t0 = time.perf_counter()
    index = read_index_file(trained_index_path(workdir, tag))
    layout = IndexLayout.of(index)
    ivf = ivf_of(index)
    folders = [partial_folder(workdir, tag, level, i) for i in numbers]
    final = added_index_path(workdir, tag)
    ivfdata = added_ivfdata_path(workdir, tag)
    with atomic_path(index_dir(workdir, tag) / "assemble") as tmp, ListWriter(folders, layout) as lists:
        tmp.mkdir()
        if ivf is None:
            if on_disk:
                raise InputError("--index-on-disk needs an IVF index (inverted lists live on disk)")
            chain = index_chain(index)
            for p in partials(folders):
                chain[-1].add_sa_codes(np.ascontiguousarray(p.codes))
            _set_ntotal(index, lists.ntotal)
            f.write_index(index, str(tmp / final.name))
        elif on_disk:
            _set_ntotal(index, lists.ntotal)
            lists.write_file(tmp / ivfdata.name)
            invlists = ondisk_lists(lists.sizes, layout, tmp / "sizing.ivfdata", str(ivfdata))
            ivf.replace_invlists(invlists, True)
            invlists.this.disown()
            f.write_index(index, str(tmp / final.name))
        else:
            _set_ntotal(index, lists.ntotal)
            head = serialized_head(index, layout)
            if head is None:  # an IVF subclass that stores more after its lists: fill them in memory
                for p in partials(folders):
                    _fill(ivf.invlists, p)
                f.write_index(index, str(tmp / final.name))
            else:
                lists.write_file(tmp / final.name, head + array_lists_header(lists.sizes, layout))
        ntotal = lists.ntotal
        del index
        if on_disk:
            os.replace(tmp / ivfdata.name, ivfdata)
        os.replace(tmp / final.name, final)
    from .runner import peak_rss_mb, task_identity

    return {"ntotal": ntotal, "seconds": round(time.perf_counter() - t0, 3), "rss_mb": round(peak_rss_mb(), 1),
            "worker": task_identity(), "files": {
        **file_record(workdir, final), **(file_record(workdir, ivfdata) if on_disk else {})}}


def partials(folders: Sequence[Path]):
    """Partials one at a time, memory-mapped; each is unmapped before the next is opened,
    so the pages read stay out of the assembling worker's RSS (which Dask watches)."""
    for folder in folders:
        p = Partial.load(folder, mmap=True)
        yield p
        del p


# Bytes of inverted-list data the assembly gathers in memory at a time.
ASSEMBLY_SLICE_BYTES = 64 << 20


class ListWriter:
    """Writes the entries of several partials as Faiss's list data: the lists in order,
    each its codes then its ids, entries in partial order (row order) inside each list.

    That is both the layout of ``OnDiskInvertedLists`` (``.ivfdata``, with each
    list's capacity equal to its size) and the data section of a serialized
    ``ArrayInvertedLists``. The lists are written a slice at a time
    (``ASSEMBLY_SLICE_BYTES``): each partial's entries for a slice of lists are
    contiguous, so a slice costs one ``pread`` per partial, a stable sort by list,
    and one ``pwritev``. Reading with ``pread`` rather than a memory map keeps the
    pages out of this process's RSS, which Dask watches.
    """

    def __init__(self, folders: Sequence[Path], layout: IndexLayout):
        self.layout = layout
        self.sizes = np.zeros(layout.nlist, dtype=np.int64)
        self.parts = []  # per partial: its lists, where each list starts, (fd, data offset) of codes and of ids
        self._fds: list[int] = []
        for folder in folders:
            lists = np.load(folder / "lists.npy", allow_pickle=False)
            counts = np.load(folder / "counts.npy", allow_pickle=False)
            self.sizes[lists] += counts
            starts = np.concatenate([[0], np.cumsum(counts)])
            self.parts.append((lists, starts, self._open(folder / "codes.npy"), self._open(folder / "ids.npy")))
        self.ntotal = int(self.sizes.sum())

    def _open(self, path: Path) -> tuple[int, int]:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if fortran or not dtype.isnative:
                raise InputError(f"{path}: not a C-ordered native-endian array (written by another tool?)")
            offset = fh.tell()
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        return fd, offset

    def __enter__(self) -> "ListWriter":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def slices(self) -> list[tuple[int, int]]:
        """Ranges of lists whose data is about ``ASSEMBLY_SLICE_BYTES`` (a bigger list is a slice alone)."""
        entry = self.layout.code_size + 8
        ends = np.cumsum(self.sizes * entry)
        out, lo = [], 0
        while lo < self.layout.nlist:
            base = ends[lo - 1] if lo else 0
            hi = int(np.searchsorted(ends, base + ASSEMBLY_SLICE_BYTES, side="right"))
            hi = min(max(hi, lo + 1), self.layout.nlist)
            out.append((lo, hi))
            lo = hi
        return out

    def write_file(self, path: Path, head: bytes = b"") -> None:
        """Write ``head`` then the list data into a new file at ``path``, fsynced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, head, 0)
            self.write_data(fd, len(head))
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_data(self, fd: int, base: int) -> None:
        """Write the list data at ``base``; ask the kernel to start writing each slice back to
        disk while the next one is gathered, so the caller's final fsync has little left."""
        cs = self.layout.code_size
        entry = cs + 8
        at = base
        for lo, hi in self.slices():
            n_slice = int(self.sizes[lo:hi].sum())
            if n_slice == 0:
                continue
            codes = np.empty((n_slice, cs), np.uint8)
            ids = np.empty(n_slice, np.int64)
            list_no = np.empty(n_slice, np.int64)
            k = 0
            for lists, starts, (cfd, coff), (ifd, ioff) in self.parts:
                a, b = np.searchsorted(lists, [lo, hi])
                if a == b:
                    continue
                r0, r1 = int(starts[a]), int(starts[b])
                pread_into(cfd, codes[k : k + r1 - r0], coff + r0 * cs)
                pread_into(ifd, ids[k : k + r1 - r0], ioff + r0 * 8)
                list_no[k : k + r1 - r0] = np.repeat(lists[a:b], np.diff(starts[a : b + 1]))
                k += r1 - r0
            order = np.argsort(list_no, kind="stable")
            codes, ids = codes[order], ids[order]
            del list_no, order
            # Each list is its codes then its ids: one pwritev of both views per list.
            pieces, k = [], 0
            for n in self.sizes[lo:hi].tolist():
                if n:
                    pieces += [codes[k : k + n], ids[k : k + n]]
                    k += n
            pwritev_all(fd, pieces, at)
            if hasattr(os, "posix_fadvise"):  # Linux: start the write-back now
                os.posix_fadvise(fd, at, n_slice * entry, os.POSIX_FADV_DONTNEED)
            at += n_slice * entry
            del codes, ids, pieces


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"unexpected end of file reading {out.nbytes} bytes at {offset} (fd {fd})")
        view, offset = view[got:], offset + got


def pwrite_all(fd: int, data, offset: int) -> None:
    pwritev_all(fd, [data], offset)


def pwritev_all(fd: int, buffers: Sequence, offset: int) -> None:
    """Write the buffers back to back at ``offset``, in as few system calls as the kernel allows."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    step = max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
    i = 0
    while i < len(views):
        written = os.pwritev(fd, views[i : i + step], offset)
        offset += written
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if written:
            views[i] = views[i][written:]


def ondisk_lists(sizes: np.ndarray, layout: IndexLayout, standin: Path, final_path: str):
    """Faiss OnDiskInvertedLists for list data of these sizes, written beforehand at ``final_path``.

    The list table is built on a sparse stand-in file and then pointed at
    ``final_path``; indexes are read with IO_FLAG_ONDISK_SAME_DIR, so the
    workdir can still move.
    """
    f = faiss()
    total = max(int(np.sum(sizes) * (layout.code_size + 8)), 1)
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    invlists = f.OnDiskInvertedLists(layout.nlist, layout.code_size, str(standin))
    invlists.update_totsize(total)
    invlists.set_all_lists_sizes(f.swig_ptr(sizes))
    invlists.filename = final_path
    standin.unlink()
    return invlists


ARRAY_LISTS_FOURCC = b"ilar"  # how Faiss tags serialized ArrayInvertedLists


def serialized_head(index, layout: IndexLayout) -> bytes | None:
    """The index's serialization up to its inverted lists, or None where the lists are not last.

    Faiss writes an IVF index's (empty) ``ArrayInvertedLists`` last: fourcc
    "ilar", nlist, code_size, fourcc "sprs", and an empty vector of sizes.
    """
    f = faiss()
    data = f.serialize_index(index).tobytes()
    tail = (ARRAY_LISTS_FOURCC + np.array([layout.nlist, layout.code_size], np.uint64).tobytes() + b"sprs"
            + np.zeros(1, np.uint64).tobytes())
    if not data.endswith(tail) or ivf_of(index).invlists.compute_ntotal() != 0:
        return None
    return data[: -len(tail)]


def array_lists_header(sizes: np.ndarray, layout: IndexLayout) -> bytes:
    """The head of a serialized ``ArrayInvertedLists`` holding lists of these sizes (Faiss's
    ``write_InvertedLists``): dense sizes when more than half the lists have entries, else
    (list, size) pairs. The list data follows it."""
    non_empty = np.flatnonzero(sizes)
    if len(non_empty) > layout.nlist // 2:
        kind, table = b"full", np.asarray(sizes, np.uint64)
    else:
        kind, table = b"sprs", np.stack([non_empty, sizes[non_empty]], axis=1).astype(np.uint64).reshape(-1)
    return (ARRAY_LISTS_FOURCC + np.array([layout.nlist, layout.code_size], np.uint64).tobytes() + kind
            + np.array([len(table)], np.uint64).tobytes() + table.tobytes())


def _fill(invlists, p: Partial) -> None:
    """Append a partial's entries to in-memory inverted lists, list by list."""
    f = faiss()
    ids = np.asarray(p.ids)
    codes = np.asarray(p.codes)
    ends = np.cumsum(p.counts)
    for l, n, end in zip(np.asarray(p.lists).tolist(), np.asarray(p.counts).tolist(), ends.tolist()):
        invlists.add_entries(l, n, f.swig_ptr(np.ascontiguousarray(ids[end - n : end])),
                             f.swig_ptr(np.ascontiguousarray(codes[end - n : end])))


def _set_ntotal(index, ntotal: int) -> None:
    for node in index_chain(index):
        node.ntotal = ntotal


def forget_other_spans(workdir: str, spans: list[tuple[int, int]]) -> None:
    """Drop encode records whose blocks are not this run's span (left by a version that cut
    spans differently): their partials would cover the wrong rows."""
    ledger = Ledger(workdir, "index-add")
    for number in ledger.done_blocks(len(spans)):
        first, count = spans[number]
        if (ledger.read(number) or {}).get("blocks") != [first, first + count]:
            ledger.forget(number)


def add_to_index(runner, config, log=print) -> dict[str, Any]:
    """index-add: encode every block, merge the partials, assemble the final index."""
    import dask

    w = runner.workdir
    t0 = time.perf_counter()
    tag = index_tag(w)
    emb = arrays.open_read(embeddings_path(w))
    n, B = emb.shape[0], emb.chunks[0]
    n_blk = -(-n // B)
    on_disk = config.index.on_disk
    done = stage_done(w, "index-add")
    final = added_index_path(w, tag)
    from .workdir import files_match

    if done and done.get("tag") == tag and files_match(w, done.get("files", {})):
        log(f"[index-add] {final} already built: skipped")
        return runner.write_stats("index-add", None, time.perf_counter() - t0, skipped=True, ntotal=done["ntotal"])
    # A mark whose files are gone or changed is stale; the encode tasks read it (discard_if_assembled).
    clear_stage_done(w, "index-add")
    span = index_plan.encode_span(n_blk, B)
    spans = [(first, min(span, n_blk - first)) for first in range(0, n_blk, span)]
    forget_other_spans(w, spans)
    encode = runner.run_blocks(
        "index-add", len(spans), lambda t: dask.delayed(encode_span_task, pure=False)(w, tag, t, *spans[t]),
        desc="index-add: encode", unit="chunks",
    )
    t_encode = time.perf_counter()
    # Reduction: merge levels sized by the partials' bytes, then the final assembly.
    rec0 = Ledger(w, "index-add").read(0) or {}
    bytes_per_partial = float(rec0.get("bytes", span * B * 64))
    numbers = list(range(len(spans)))
    level = 0
    for fan in index_plan.reduction_levels(len(spans), bytes_per_partial, index_plan.MERGE_BUDGET, index_plan.FINAL_FAN_IN,
                                           index_plan.MERGE_TARGET):
        groups = [numbers[i : i + fan] for i in range(0, len(numbers), fan)]
        runner.run_blocks(
            f"index-merge-L{level + 1}", len(groups),
            lambda g, lvl=level, grp=groups: dask.delayed(merge_task, pure=False)(w, tag, lvl, g, grp[g]),
            desc=f"index-add: merge level {level + 1}", unit="chunks",
        )
        numbers = list(range(len(groups)))
        level += 1
    t_merge = time.perf_counter()
    log(f"[index-add] assembling {final.name} from {len(numbers)} partials" + (" (on disk)" if on_disk else ""))
    result = runner.compute_one(dask.delayed(assemble, pure=False)(w, tag, level, numbers, on_disk))
    if result["ntotal"] != n:
        raise RuntimeError(f"assembled index holds {result['ntotal']} entries, expected {n}")
    mark_stage_done(w, "index-add", {"tag": tag, "ntotal": n, "files": result["files"], "on_disk": on_disk})
    # Partials are no longer needed once the final index is in place.
    shutil.rmtree(index_partials_dir(w, tag), ignore_errors=True)
    for stage in list_stages(w, "index-merge-"):
        Ledger(w, stage).clear()
    Ledger(w, "index-add").clear()
    seconds = time.perf_counter() - t0
    return runner.write_stats(
        "index-add", encode, seconds, ntotal=n, tag=tag, on_disk=on_disk,
        encode_seconds=round(t_encode - t0, 3), merge_seconds=round(t_merge - t_encode, 3),
        assemble_seconds=result["seconds"], merge_levels=level, assemble_worker_peak_rss_mb=result["rss_mb"],
        chunks_per_s=round(n / max(seconds, 1e-9), 1),
    )
