"""Write Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``; the format is in ``indexed_dataset``).

:class:`IndexedDatasetWriter` streams a new pair to disk under temporary names
and moves it into place only when it is complete, so readers never see a
half-written dataset.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from retro_dask.errors import InputError
from retro_dask.formats.indexed_dataset import (
    _CHUNK,
    _COPY_BYTES,
    _HEADER,
    _MAX_SEQUENCE_LENGTH,
    DTYPE_CODES,
    MAGIC,
    VERSION,
    IndexedDataset,
    _extension_hint,
    _little,
    _prefix_str,
    data_path,
    dtype_code,
    index_path,
)

__all__ = ["IndexedDatasetWriter", "write_indexed_dataset"]


class _GrowingArray:
    """An append-only numpy buffer that doubles its capacity as it fills."""

    def __init__(self, dtype: Any, capacity: int = 1024) -> None:
        self._data = np.empty(capacity, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown

    def append(self, value: int) -> None:
        self._reserve(1)
        self._data[self._n] = value
        self._n += 1

    def extend(self, values: np.ndarray, add: int = 0) -> None:
        self._reserve(len(values))
        out = self._data[self._n : self._n + len(values)]
        out[:] = values
        if add:
            out += add
        self._n += len(values)

    def view(self) -> np.ndarray:
        return self._data[: self._n]


class IndexedDatasetWriter:
    """Stream documents into a new ``PREFIX.bin``/``PREFIX.idx`` pair.

    Tokens go straight to a temporary ``.bin`` file; only the sequence
    lengths (4 bytes per document) are kept in memory. :meth:`finalize`
    writes the ``.idx`` and moves both temporaries into place with
    ``os.replace`` (``.bin`` first, then ``.idx``), so a complete ``.idx``
    only ever appears next to its complete ``.bin``. :meth:`abort` removes
    the temporaries.

    Used as a context manager it finalizes on success and aborts if the
    block raises::

        with IndexedDatasetWriter("out/corpus", best_token_dtype(vocab)) as w:
            for tokens in documents:
                w.add_document(tokens)
    """

    def __init__(self, prefix: str | os.PathLike, dtype: Any) -> None:
        self.prefix = _prefix_str(prefix)
        hint = _extension_hint(self.prefix)
        if hint:
            raise InputError(
                f"cannot write indexed dataset {self.prefix!r}: it would "
                f"create {data_path(self.prefix)!r}.{hint}"
            )
        self._code = dtype_code(dtype)
        self.dtype = DTYPE_CODES[self._code]
        self._disk = _little(self.dtype)
        self._sizes = _GrowingArray(np.int32)
        # None while every document is exactly one sequence (always the case
        # for RETRO); materialized only if add_index brings in a dataset with
        # multi-sequence documents, to keep memory at 4 bytes per sequence.
        self._documents: _GrowingArray | None = None
        self._state = "open"

        directory = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(directory, exist_ok=True)
        # Unique names let several writers target one directory; opening
        # with "xb" (not mkstemp) keeps the umask's permissions on the
        # final files.
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._bin_tmp = data_path(self.prefix) + tag
        self._idx_tmp = index_path(self.prefix) + tag
        self._bin = open(self._bin_tmp, "xb")

    def __len__(self) -> int:
        """Sequences added so far."""
        return len(self._sizes)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                f"the writer for {self.prefix!r} is {self._state}; create a new "
                f"IndexedDatasetWriter to write more"
            )

    def _convert(self, tokens: Any) -> np.ndarray:
        """``tokens`` as a little-endian array of the dataset dtype, or InputError."""
        where = f"document {len(self._sizes)} for {data_path(self.prefix)}"
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise InputError(
                f"{where} has shape {arr.shape}; a document must be a 1-D "
                f"sequence of token ids"
            )
        if arr.size == 0:
            return np.empty(0, dtype=self._disk)
        if len(arr) > _MAX_SEQUENCE_LENGTH:
            raise InputError(
                f"{where} has {len(arr)} tokens, more than the format's "
                f"int32 sequence-length limit {_MAX_SEQUENCE_LENGTH}; split it "
                f"into several documents"
            )
        kind = arr.dtype.kind
        if kind == "O" and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr
        ):
            kind = "i"  # Python ints too large for int64 land here
        if self.dtype.kind == "f":
            if kind not in "iuf" or arr.dtype.kind == "O":
                raise InputError(
                    f"{where} has {arr.dtype} values; a {self.dtype} dataset "
                    f"needs numbers"
                )
            out = arr.astype(self._disk)
            overflow = np.flatnonzero(np.isfinite(arr) & ~np.isfinite(out))
            if overflow.size:
                k = int(overflow[0])
                raise InputError(
                    f"{where}: value {arr[k]} at position {k} overflows "
                    f"{self.dtype}; use float64"
                )
            return out
        if kind not in "iu":
            raise InputError(
                f"{where} has {arr.dtype} values, not integers; pass integer "
                f"token ids (e.g. the tokenizer's output)"
            )
        info = np.iinfo(self.dtype)
        bad = np.flatnonzero((arr < info.min) | (arr > info.max))
        if bad.size:
            k = int(bad[0])
            raise InputError(
                f"{where}: token {arr[k]} at position {k} does not fit dtype "
                f"{self.dtype} (range {info.min}..{info.max}); write the "
                f"dataset with a wider dtype, e.g. best_token_dtype(vocab_size) "
                f"with the tokenizer's true vocabulary size, or int32."
            )
        return arr.astype(self._disk)

    def add_document(self, tokens: Any) -> None:
        """Append one document (one sequence) of token ids.

        Raises:
            InputError: ``tokens`` is not 1-D, not integers (for integer
                dtypes), or holds a value outside the dtype's range; nothing
                is written in that case.
        """
        self._check_open()
        arr = self._convert(tokens)
        self._write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self._sizes.append(len(arr))
        if self._documents is not None:
            self._documents.append(len(self._sizes))

    def _write(self, data: Any) -> None:
        try:
            self._bin.write(data)
        except BaseException:
            # A partial write leaves .bin out of step with the sizes.
            self._state = "broken by a failed write"
            raise

    def add_index(self, other_prefix: str | os.PathLike) -> None:
        """Append every document of the indexed dataset at ``other_prefix``.

        The other ``.bin`` is streamed in pieces, so memory stays bounded;
        this is how partial outputs are concatenated. Document boundaries
        are kept.

        Raises:
            InputError: the other dataset is invalid, or its dtype differs.
        """
        self._check_open()
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise InputError(
                f"cannot append {data_path(other.prefix)}: its tokens are "
                f"{other.dtype} but {self.prefix!r} is being written as "
                f"{self.dtype}; write all parts with the same dtype "
                f"(best_token_dtype of one vocabulary size)"
            )
        before = len(self._sizes)
        n = len(other)
        remaining = other.n_tokens * self._disk.itemsize
        with open(data_path(other.prefix), "rb") as src:
            while remaining:
                piece = src.read(min(_COPY_BYTES, remaining))
                if not piece:
                    self._state = "broken by a failed copy"
                    raise InputError(
                        f"{data_path(other.prefix)} shrank while it was being "
                        f"copied; make sure nothing rewrites it during the "
                        f"concatenation and retry"
                    )
                self._write(piece)
                remaining -= len(piece)

        docs = other.document_indices
        one_per_sequence = len(docs) == n + 1 and all(
            np.array_equal(docs[s : s + _CHUNK], np.arange(s, min(s + _CHUNK, n + 1)))
            for s in range(0, n + 1, _CHUNK)
        )
        if self._documents is None and not one_per_sequence:
            self._documents = _GrowingArray(np.int64, capacity=before + len(docs))
            self._documents.extend(np.arange(before + 1))
        for s in range(0, n, _CHUNK):
            self._sizes.extend(other.sizes[s : s + _CHUNK])
        if self._documents is not None:
            for s in range(1, len(docs), _CHUNK):
                self._documents.extend(docs[s : s + _CHUNK], add=before)

    def _write_index(self, f: Any) -> None:
        sizes = self._sizes.view()
        n = len(sizes)
        d = n + 1 if self._documents is None else len(self._documents)
        f.write(_HEADER.pack(MAGIC, VERSION, self._code, n, d))
        for s in range(0, n, _CHUNK):
            f.write(sizes[s : s + _CHUNK].astype("<i4", copy=False).tobytes())
        itemsize = self._disk.itemsize
        position = 0
        for s in range(0, n, _CHUNK):
            nbytes = sizes[s : s + _CHUNK].astype(np.int64) * itemsize
            ends = np.cumsum(nbytes)
            f.write((ends - nbytes + position).astype("<i8", copy=False).tobytes())
            position += int(ends[-1])
        if self._documents is None:
            for s in range(0, n + 1, _CHUNK):
                f.write(np.arange(s, min(s + _CHUNK, n + 1), dtype="<i8").tobytes())
        else:
            documents = self._documents.view()
            for s in range(0, d, _CHUNK):
                f.write(documents[s : s + _CHUNK].astype("<i8", copy=False).tobytes())

    def finalize(self) -> None:
        """Write ``.idx`` and move both files into place (``.bin`` first).

        On failure the temporaries are removed and the error re-raised.
        """
        self._check_open()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            with open(self._idx_tmp, "xb") as f:
                self._write_index(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp, data_path(self.prefix))
            os.replace(self._idx_tmp, index_path(self.prefix))
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discard everything written; removes the temporary files. Idempotent."""
        if self._state == "finalized":
            return
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._state = "aborted"

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._state == "open":
            self.finalize()
        elif self._state != "finalized":
            state = self._state
            self.abort()
            if exc_type is None and state.startswith("broken"):
                # The block swallowed the write error; finishing silently
                # would leave the caller believing the dataset exists.
                raise RuntimeError(
                    f"the writer for {self.prefix!r} was {state}; nothing "
                    f"was written"
                )


def write_indexed_dataset(
    prefix: str | os.PathLike, documents: Iterable[Any], dtype: Any
) -> None:
    """Write ``documents`` (an iterable of 1-D token arrays) to ``PREFIX.bin``/``.idx``.

    Nothing appears at ``prefix`` unless every document was written.
    """
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for tokens in documents:
            writer.add_document(tokens)
