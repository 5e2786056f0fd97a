"""Read and write Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

An indexed dataset is the token store that Megatron-LM and RETRO train from.
It is a pair of files that share a prefix (the prefix is written without
extension):

``PREFIX.bin``
    every sequence's tokens, concatenated, in the dataset's dtype
    (little-endian).

``PREFIX.idx`` (little-endian)
    ========================  ===========================================
    ``9s``                    magic ``b"MMIDIDX\\x00\\x00"``
    ``<Q``                    version, always 1
    ``<B``                    dtype code (see :data:`DTYPE_CODES`)
    ``<Q``                    sequence count ``N``
    ``<Q``                    document count ``D`` (documents + 1)
    ``int32[N]``              sequence lengths, in tokens
    ``int64[N]``              sequence pointers, byte offsets into ``.bin``
    ``int64[D]``              document indices: sequence number at which
                              each document starts, from 0 up to ``N``
    ========================  ===========================================

For RETRO one sequence is one document, so the writer here always writes
``document_indices == arange(N + 1)``; the reader accepts any valid layout.

:class:`IndexedDataset` memory-maps an existing pair and validates it (every
problem is an :class:`~retro_dask.errors.InputError` that names the file, the
problem, the value found and a fix). The writer is ``indexed_writer``.
"""

from __future__ import annotations

import functools
import mmap
import operator
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from retro_dask.errors import InputError

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "IndexedDataset",
    "best_token_dtype",
    "data_path",
    "dtype_code",
    "exists",
    "index_path",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1

#: dtype code stored in the ``.idx`` header -> numpy dtype (Megatron's table).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}

_HEADER = struct.Struct("<9sQBQQ")
#: Bytes before the sequence lengths: magic, version, dtype code, N, D.
HEADER_SIZE = _HEADER.size  # 34

# Megatron switches to int32 tokens a little below 2**16, not at it; keep
# the same threshold so our files match what Megatron's preprocessing writes.
_UINT16_VOCAB_LIMIT = 65500

# Validation and index writing walk the arrays in pieces of this many
# elements so that memory stays bounded however many sequences there are.
_CHUNK = 1 << 16
# Bytes copied at a time when add_index streams another dataset's .bin.
_COPY_BYTES = 16 << 20

_MAX_SEQUENCE_LENGTH = int(np.iinfo(np.int32).max)

_REBUILD = (
    "rebuild the dataset (re-run `retro-dask preprocess`, or the tool that "
    "wrote it); the .bin and .idx must come from the same run"
)


def _little(dtype: np.dtype) -> np.dtype:
    """The on-disk (little-endian) form of ``dtype``."""
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _dtype_names() -> str:
    return ", ".join(f"{code} {dt.name}" for code, dt in DTYPE_CODES.items())


def dtype_code(dtype: Any) -> int:
    """Return the ``.idx`` dtype code for ``dtype`` (anything ``np.dtype`` accepts).

    Byte order is ignored: files are always little-endian.

    Raises:
        InputError: the dtype has no code in the format.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(
            f"{dtype!r} is not a numpy dtype; indexed datasets store one of: "
            f"{_dtype_names()}"
        ) from exc
    for code, known in DTYPE_CODES.items():
        if _little(dt) == _little(known):
            return code
    raise InputError(
        f"dtype {dt} cannot be stored in a Megatron indexed dataset; use one "
        f"of: {_dtype_names()} (for tokens, best_token_dtype(vocab_size) "
        f"picks uint16 or int32)"
    )


def best_token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron uses for tokens of a vocabulary this size.

    ``uint16`` when ``vocab_size < 65500``, else ``int32`` (Megatron's rule).
    """
    size = operator.index(vocab_size)
    if size < 1:
        raise InputError(
            f"vocabulary size {size} is not positive; pass the tokenizer's "
            f"vocabulary size (e.g. len(tokenizer))"
        )
    return np.dtype(np.uint16) if size < _UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def _prefix_str(prefix: str | os.PathLike) -> str:
    path = os.fspath(prefix)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def index_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.idx``."""
    return _prefix_str(prefix) + ".idx"


def data_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.bin``."""
    return _prefix_str(prefix) + ".bin"


def exists(prefix: str | os.PathLike) -> bool:
    """Whether both ``PREFIX.bin`` and ``PREFIX.idx`` exist as files.

    This does not validate their contents; open an :class:`IndexedDataset`
    for that.
    """
    return os.path.isfile(data_path(prefix)) and os.path.isfile(index_path(prefix))


def _extension_hint(prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return (
                f" Note: the prefix {prefix!r} ends in {ext!r}; an indexed "
                f"dataset's prefix is given without extension, so pass "
                f"{prefix[: -len(ext)]!r}."
            )
    return ""


def _bad(path: str, problem: str, fix: str = _REBUILD, prefix: str = "") -> InputError:
    return InputError(f"{path}: {problem}; {fix}.{_extension_hint(prefix)}")


def _map(path: str, size: int) -> np.ndarray:
    """Memory-map ``path`` read-only as bytes (mmap cannot map an empty file)."""
    if size == 0:
        empty = np.empty(0, dtype=np.uint8)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))


def _release(mapped: Any) -> None:
    """Drop a memory map's resident pages from this process (the page cache keeps them)."""
    mm = getattr(mapped, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class ScannedSizes:
    """A dataset's document sizes for a scan by windows (``sizes[a:b]``).

    Each window is a copy, and the ``.idx`` pages it was read from leave this
    process's RSS: a driver that plans blocks over a corpus of any size holds
    one window of sizes, not the corpus's.
    """

    def __init__(self, dataset: "IndexedDataset"):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset.sizes)

    def __getitem__(self, key: slice) -> np.ndarray:
        out = np.array(self._dataset.sizes[key])
        _release(self._dataset._idx_map)
        return out


class IndexedDataset:
    """A Megatron indexed dataset opened read-only from ``PREFIX.bin``/``PREFIX.idx``.

    Both files are memory-mapped; nothing is read into memory until a
    sequence is indexed, and :attr:`sizes`, :attr:`pointers` and
    :attr:`document_indices` are views into the ``.idx`` map.

    Opening validates the pair (header, file sizes, pointers against sizes,
    document indices) in bounded memory and raises
    :class:`~retro_dask.errors.InputError` on the first problem.

    The object pickles as its prefix only, so it is cheap to send to Dask
    workers, which re-open the maps (with the O(1) checks only: the full
    scan already ran where the object was first opened).

    Attributes:
        prefix: the path without ``.bin``/``.idx``.
        dtype: token dtype (native byte order).
        sizes: ``int32[N]`` sequence lengths in tokens.
        pointers: ``int64[N]`` byte offsets of the sequences in ``.bin``.
        document_indices: ``int64[D]`` first sequence of each document, then ``N``.
    """

    prefix: str
    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray

    def __init__(self, prefix: str | os.PathLike) -> None:
        self._open(_prefix_str(prefix), full_check=True)

    # -- opening and validation ---------------------------------------------

    def _bad(self, path: str, problem: str, fix: str = _REBUILD) -> InputError:
        return _bad(path, problem, fix, self.prefix)

    def _open(self, prefix: str, full_check: bool) -> None:
        self.prefix = prefix
        idx, bin_ = index_path(prefix), data_path(prefix)
        missing = [p for p in (bin_, idx) if not os.path.isfile(p)]
        if missing:
            found = [p for p in (bin_, idx) if p not in missing]
            have = f" (found {found[0]})" if found else ""
            raise InputError(
                f"indexed dataset {prefix!r} is incomplete: "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                f"missing{have}. An indexed dataset needs both PREFIX.bin and "
                f"PREFIX.idx, with PREFIX given without extension; check the "
                f"path, or write the dataset with `retro-dask preprocess`."
                + _extension_hint(prefix)
            )

        idx_bytes = os.path.getsize(idx)
        with open(idx, "rb") as f:
            head = f.read(HEADER_SIZE)
        # A file cut short inside the magic is truncated, not foreign.
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise self._bad(
                idx,
                f"not a Megatron indexed-dataset index: the file starts with "
                f"{head[: len(MAGIC)]!r}, expected the magic {MAGIC!r}",
                "pass the prefix of a Megatron .idx/.bin pair, or rebuild it "
                "with `retro-dask preprocess`",
            )
        if len(head) < HEADER_SIZE:
            raise self._bad(
                idx,
                f"truncated: the file is {idx_bytes} bytes, shorter than the "
                f"{HEADER_SIZE}-byte header",
            )
        _, version, code, n, d = _HEADER.unpack(head)
        if version != VERSION:
            raise self._bad(
                idx,
                f"unknown index version {version} (this reader knows version "
                f"{VERSION})",
                "write the dataset with Megatron's MMIDIDX version 1 format "
                "(`retro-dask preprocess` does)",
            )
        if code not in DTYPE_CODES:
            raise self._bad(
                idx,
                f"unknown dtype code {code} in the header (known codes: "
                f"{_dtype_names()})",
            )
        expected_idx = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if idx_bytes < expected_idx:
            raise self._bad(
                idx,
                f"truncated: the header describes {n} sequences and {d} "
                f"document indices, which need {expected_idx} bytes, but the "
                f"file is {idx_bytes} bytes",
            )
        # Trailing bytes are allowed: Megatron's multimodal variant appends
        # per-sequence modes after the document indices.

        self.dtype = DTYPE_CODES[code]
        disk = _little(self.dtype)
        self._idx_map = _map(idx, idx_bytes)
        offset = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx_map, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self.pointers = np.frombuffer(self._idx_map, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(
            self._idx_map, dtype="<i8", count=d, offset=offset
        )

        if full_check:
            bin_needed = self._check_pointers(idx, disk.itemsize)
            self._check_document_indices(idx)
        elif n:
            bin_needed = int(self.pointers[-1]) + int(self.sizes[-1]) * disk.itemsize
        else:
            bin_needed = 0

        bin_bytes = os.path.getsize(bin_)
        if bin_bytes != bin_needed:
            relation = "shorter than" if bin_bytes < bin_needed else "longer than"
            raise self._bad(
                bin_,
                f"the file is {bin_bytes} bytes, {relation} the {bin_needed} "
                f"bytes that {idx} describes ({n} sequences of {self.dtype} "
                f"tokens)",
            )
        self._n_tokens = bin_needed // disk.itemsize
        self._bin_map = _map(bin_, bin_bytes)
        self._tokens = np.frombuffer(self._bin_map, dtype=disk)

    def _check_pointers(self, idx: str, itemsize: int) -> int:
        """Check sizes >= 0 and pointers == running byte sum; return the .bin size."""
        n = len(self.sizes)
        expected_next = 0
        for start in range(0, n, _CHUNK):
            sizes = self.sizes[start : start + _CHUNK]
            negative = np.flatnonzero(sizes < 0)
            if negative.size:
                i = start + int(negative[0])
                raise self._bad(idx, f"sequence {i} has a negative length {int(self.sizes[i])}")
            nbytes = sizes.astype(np.int64) * itemsize
            expected = np.empty_like(nbytes)
            expected[0] = expected_next
            np.cumsum(nbytes[:-1], out=expected[1:])
            expected[1:] += expected_next
            wrong = np.flatnonzero(self.pointers[start : start + _CHUNK] != expected)
            if wrong.size:
                j = int(wrong[0])
                raise self._bad(
                    idx,
                    f"pointers are inconsistent with sizes: sequence {start + j} "
                    f"points at byte {int(self.pointers[start + j])} but the "
                    f"lengths before it add up to byte {int(expected[j])}",
                )
            expected_next = int(expected[-1]) + int(nbytes[-1])
            _release(self._idx_map)  # a window's pages need not stay in this process
        return expected_next

    def _check_document_indices(self, idx: str) -> None:
        docs = self.document_indices
        n = len(self.sizes)
        if len(docs) == 0:
            raise self._bad(
                idx,
                "the document count is 0; it must be at least 1 (the number "
                "of documents + 1)",
            )
        if docs[0] != 0:
            raise self._bad(idx, f"document indices start at {int(docs[0])}, not 0")
        previous = 0
        for start in range(0, len(docs), _CHUNK):
            chunk = docs[start : start + _CHUNK]
            steps = np.diff(chunk, prepend=previous)
            down = np.flatnonzero(steps < 0)
            if down.size:
                k = start + int(down[0])
                raise self._bad(
                    idx,
                    f"document indices decrease: index {k} is {int(docs[k])} "
                    f"after {int(docs[k - 1])}; they must be non-decreasing",
                )
            previous = int(chunk[-1])
            _release(self._idx_map)
        if previous != n:
            raise self._bad(
                idx,
                f"document indices end at {previous}, but there are {n} "
                f"sequences; the last index must equal the sequence count",
            )

    # -- access ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def n_tokens(self) -> int:
        """Total tokens in the dataset (the sum of :attr:`sizes`)."""
        return self._n_tokens

    def _sequence(self, i: Any) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(
                f"sequence index must be an integer, not {type(i).__name__}"
            ) from None
        n = len(self.sizes)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(
                f"sequence {i} is out of range: {self.prefix} has {n} sequences"
            )
        return j

    def release_pages(self) -> None:
        """Unmap the ``.bin`` and ``.idx`` pages this process has touched (they stay in the page cache).

        Pages read through the memory maps count in the process's RSS until the
        kernel needs them back, so a worker that streams through a large corpus
        would look (to Dask's memory monitor) as if it held the corpus, and a
        driver that scanned the document sizes as if it held them. Block tasks
        call this when they finish; views returned earlier stay valid (their
        pages are read in again on access).
        """
        _release(self._bin_map)
        _release(self._idx_map)

    def scanned_sizes(self) -> "ScannedSizes":
        """The document sizes for a scan by windows: each window is a copy, and the pages it came from are released."""
        return ScannedSizes(self)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` (negative counts from the end), a read-only view of ``.bin``."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset + length`` of sequence ``i``, as a view of ``.bin``.

        Only those tokens are touched, so reading a chunk of a long document
        does not page in the rest. ``length=None`` reads to the end.

        Raises:
            IndexError: ``i`` is out of range, or the span does not lie
                inside the sequence.
        """
        j = self._sequence(i)
        size = int(self.sizes[j])
        offset = operator.index(offset)
        if length is None:
            length = size - offset
        length = operator.index(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens {offset}:{offset + length} (offset={offset}, "
                f"length={length}) are outside sequence {i} of {self.prefix}, "
                f"which has {size} tokens; need 0 <= offset and "
                f"offset + length <= {size}"
            )
        start = int(self.pointers[j]) // self._tokens.itemsize + offset
        return self._tokens[start : start + length]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, dtype={self.dtype}, "
            f"sequences={len(self)}, tokens={self.n_tokens})"
        )

    # -- pickling ----------------------------------------------------------------

    def __getstate__(self) -> dict[str, str]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self._open(state["prefix"], full_check=False)


@functools.lru_cache(maxsize=64)
def open_dataset(prefix: str) -> IndexedDataset:
    """This process's memory map of an indexed dataset (opened once per worker)."""
    return IndexedDataset(prefix)


def release_dataset_pages(prefixes) -> None:
    """Drop this process's mapped pages of these corpora: block tasks stream through them once."""
    for prefix in prefixes:
        open_dataset(prefix).release_pages()
