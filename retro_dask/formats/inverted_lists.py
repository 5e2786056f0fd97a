"""Inverted lists on disk: the partials index-add encodes and merges, and Faiss's own list layouts.

A *partial* is a folder of ``.npy`` files holding encoded entries grouped by
inverted list, row order kept inside each list: ``lists`` (the non-empty lists,
ascending), ``counts`` (entries per list), ``ids`` and ``codes``. Partials in
row order are merged, and written into the final index, by :class:`ListSlices`:
a slice of lists at a time, read with ``pread`` from every partial and sorted
stably by list, so memory stays at one slice whatever the index size and the
fan-in. The final file is written in Faiss's own layouts: the data section of a
serialized ``ArrayInvertedLists`` (after :func:`serialized_head` and
:func:`array_lists_header`) or an ``OnDiskInvertedLists`` ``.ivfdata`` file;
both are each list's codes then its ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from .faiss_index import faiss, index_chain, ivf_of
from .workdir import atomic_path

PARTIAL_FILES = ("lists", "counts", "ids", "codes")
# Bytes of list data gathered in memory at a time.
SLICE_BYTES = 64 << 20
ARRAY_LISTS_FOURCC = b"ilar"  # how Faiss tags serialized ArrayInvertedLists


@dataclass(frozen=True)
class IndexLayout:
    """What an encoded entry looks like for one trained index."""

    nlist: int            # 1 for indexes without inverted lists
    code_size: int        # bytes per entry, list number excluded
    coarse_size: int      # bytes of the list number at the head of an sa code

    @classmethod
    def of(cls, index) -> "IndexLayout":
        ivf = ivf_of(index)
        if ivf is not None:
            return cls(int(ivf.nlist), int(ivf.code_size), int(ivf.coarse_code_size()))
        return cls(1, int(index.sa_code_size()), 0)

    @property
    def sa_code_size(self) -> int:
        return self.coarse_size + self.code_size


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

    def save(self, folder: Path) -> None:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            for name in PARTIAL_FILES:
                np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> "Partial":
        mode = "r" if mmap else None
        return cls(*(np.load(Path(folder) / f"{n}.npy", mmap_mode=mode, allow_pickle=False) for n in PARTIAL_FILES))


def partial_files(folder: Path) -> list[Path]:
    return [Path(folder) / f"{name}.npy" for name in PARTIAL_FILES]


def npy_data(path: Path) -> tuple[int, tuple, np.dtype]:
    """Where an ``.npy`` file's data starts, its shape and dtype."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or not dtype.isnative:
            raise InputError(f"{path}: not a C-ordered native-endian array (written by another tool?)")
        return fh.tell(), shape, dtype


class ListSlices:
    """The entries of several partials (in row order) gathered a slice of lists at a time."""

    def __init__(self, folders: Sequence[Path], layout: IndexLayout):
        self.layout = layout
        self.sizes = np.zeros(layout.nlist, dtype=np.int64)
        self.parts = []  # per partial: its lists, where each list starts, (fd, data offset) of codes and of ids
        self._fds: list[int] = []
        for folder in folders:
            lists = np.load(Path(folder) / "lists.npy", allow_pickle=False)
            counts = np.load(Path(folder) / "counts.npy", allow_pickle=False)
            self.sizes[lists] += counts
            starts = np.concatenate([[0], np.cumsum(counts)])
            self.parts.append((lists, starts, self._open(Path(folder) / "codes.npy"),
                               self._open(Path(folder) / "ids.npy")))
        self.ntotal = int(self.sizes.sum())

    def _open(self, path: Path) -> tuple[int, int]:
        offset = npy_data(path)[0]
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        return fd, offset

    def __enter__(self) -> "ListSlices":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def ranges(self) -> list[tuple[int, int]]:
        """Ranges of lists whose data is about ``SLICE_BYTES`` (a bigger list is a slice alone)."""
        entry = self.layout.code_size + 8
        ends = np.cumsum(self.sizes * entry)
        out, lo = [], 0
        while lo < self.layout.nlist:
            base = ends[lo - 1] if lo else 0
            hi = int(np.searchsorted(ends, base + SLICE_BYTES, side="right"))
            hi = min(max(hi, lo + 1), self.layout.nlist)
            out.append((lo, hi))
            lo = hi
        return out

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(lo, hi, codes, ids)`` of each non-empty slice of lists, entries sorted by list, row order inside."""
        cs = self.layout.code_size
        for lo, hi in self.ranges():
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
            yield lo, hi, codes[order], ids[order]

    def write_faiss_lists(self, fd: int, base: int) -> None:
        """Write the list data in Faiss's layout (each list's codes then its ids) at ``base``; ask the
        kernel to start writing each slice back while the next is gathered."""
        at = base
        for lo, hi, codes, ids in self:
            pieces, k = [], 0
            for n in self.sizes[lo:hi].tolist():
                if n:
                    pieces += [codes[k : k + n], ids[k : k + n]]
                    k += n
            pwritev_all(fd, pieces, at)
            if hasattr(os, "posix_fadvise"):  # Linux: start the write-back now
                os.posix_fadvise(fd, at, codes.nbytes + ids.nbytes, os.POSIX_FADV_DONTNEED)
            at += codes.nbytes + ids.nbytes

    def write_file(self, path: Path, head: bytes = b"") -> None:
        """Write ``head`` then the list data into a new file at ``path``, fsynced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwritev_all(fd, [head], 0)
            self.write_faiss_lists(fd, len(head))
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_partial(self, folder: Path) -> None:
        """Write the merged entries as one partial (streamed, a slice at a time)."""
        non_empty = np.flatnonzero(self.sizes)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            np.save(tmp / "lists.npy", non_empty.astype(np.int64), allow_pickle=False)
            np.save(tmp / "counts.npy", self.sizes[non_empty].astype(np.int64), allow_pickle=False)
            with open(tmp / "codes.npy", "wb") as fc, open(tmp / "ids.npy", "wb") as fi:
                for f, shape, dtype in ((fc, (self.ntotal, self.layout.code_size), np.uint8),
                                        (fi, (self.ntotal,), np.int64)):
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                            "shape": shape})
                for _, _, codes, ids in self:
                    fc.write(codes.tobytes())
                    fi.write(ids.tobytes())


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"unexpected end of file reading {out.nbytes} bytes at {offset} (fd {fd})")
        view, offset = view[got:], offset + got


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


def fill_lists(invlists, p: Partial) -> None:
    """Append a partial's entries to in-memory inverted lists, list by list."""
    f = faiss()
    ids = np.asarray(p.ids)
    codes = np.asarray(p.codes)
    ends = np.cumsum(p.counts)
    for lst, n, end in zip(np.asarray(p.lists).tolist(), np.asarray(p.counts).tolist(), ends.tolist()):
        invlists.add_entries(lst, n, f.swig_ptr(np.ascontiguousarray(ids[end - n : end])),
                             f.swig_ptr(np.ascontiguousarray(codes[end - n : end])))


def set_ntotal(index, ntotal: int) -> None:
    for node in index_chain(index):
        node.ntotal = ntotal
