"""Zarr v3 arrays of the workdir: one block of rows per Zarr chunk, each chunk checksummed.

Every array is chunked along rows by its block size and holds whole rows in a
chunk, so a block is exactly one chunk file and writing one needs no
read-modify-write: a retried Dask task is harmless. The codecs are Zarr's
``bytes`` (little-endian), ``zstd`` for integer tables, and ``crc32c`` last, so
every chunk carries the checksum of its bytes and any Zarr reader (``zarr``,
``dask.array.from_zarr``) refuses a changed one.

:class:`ChunkFormat` encodes and decodes chunk files here, with Zarr's own codec
parameters (the same bytes; ``tests/test_zarr_blocks.py``): Zarr's own write of
one chunk costs ~1 ms of event-loop hops around ~0.3 ms of work (RESULTS.md,
profiling note 22). :func:`lazy_rows` gives a stored range as a Dask array.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from .workdir import write_error

# Empty chunks must still be written: a block of -1 neighbours is a finished
# block, and the ledger checks the chunk file on disk.
ZARR_CONFIG = {"write_empty_chunks": True}
CRC_BYTES = 4


class ChunkChecksumError(ValueError):
    """A chunk file whose bytes do not match its crc32c: changed or truncated on disk."""


def codecs(compressed: bool) -> tuple:
    # zstd level 1 costs little and shrinks the integer tables several-fold;
    # float embeddings gain only ~7%, so they are stored raw.
    return ((zarr.codecs.ZstdCodec(level=1),) if compressed else ()) + (zarr.codecs.Crc32cCodec(),)


def create(
    path: str | Path,
    shape: tuple[int, ...],
    dtype: Any,
    block_rows: int,
    *,
    compressed: bool = True,
    fill_value: Any = 0,
) -> zarr.Array:
    """Create the array, or keep an existing one with the same layout (resume)."""
    path = Path(path)
    chunks = (max(1, int(block_rows)),) + tuple(shape[1:])
    if path.exists():
        try:
            old = zarr.open_array(str(path), mode="r")
            if (old.shape == tuple(shape) and old.chunks == chunks and old.dtype == np.dtype(dtype)
                    and chunk_format(old) is not None and (chunk_format(old).zstd is not None) == compressed):
                return old
        except Exception:  # unreadable metadata: made anew below
            pass
    try:
        return zarr.create_array(
            store=str(path),
            shape=tuple(int(s) for s in shape),
            chunks=chunks,
            dtype=np.dtype(dtype),
            fill_value=fill_value,
            compressors=codecs(compressed),
            overwrite=True,
            config=ZARR_CONFIG,
        )
    except OSError as exc:
        raise write_error(path, exc) from exc


# Opened arrays of this process, by path, with the identity of the zarr.json they were opened from.
_OPENED: dict[str, tuple[tuple[int, int, int], zarr.Array, "ChunkFormat | None"]] = {}
_MAX_OPENED = 64


def _open(path: str | Path) -> tuple[zarr.Array, "ChunkFormat | None"]:
    """Open an array and find its chunk format, reusing this process's earlier open while its
    zarr.json is the same file, unchanged (opening parses it through Zarr's event loop: ~1 ms)."""
    key = str(path)
    try:
        st = os.stat(os.path.join(key, "zarr.json"))
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        identity = None
    cached = _OPENED.get(key)
    if identity is not None and cached is not None and cached[0] == identity:
        return cached[1], cached[2]
    arr = zarr.open_array(key, mode="r")
    fmt = chunk_format(arr)
    if identity is not None:
        if len(_OPENED) >= _MAX_OPENED:
            _OPENED.clear()
        _OPENED[key] = (identity, arr, fmt)
    return arr, fmt


def open_read(path: str | Path) -> zarr.Array:
    return _open(path)[0]


def open_format(path: str | Path) -> "ChunkFormat":
    arr, fmt = _open(path)
    if fmt is None:
        raise ValueError(f"{path}: not an array in the workdir's layout (one checksummed chunk per block of rows)")
    return fmt


@dataclass(frozen=True)
class ChunkFormat:
    """How one chunk of an array is stored: the layout of every array :func:`create` makes.

    The chunk holds whole rows (the grid is regular, the edge chunk padded with
    the fill value to the full chunk shape), serialized by Zarr's ``bytes``
    codec in C order, optionally compressed by its ``zstd`` codec, then
    followed by the little-endian crc32c of those bytes.
    """

    shape: tuple[int, ...]  # the array's
    dtype: np.dtype  # with the stored byte order
    chunk_shape: tuple[int, ...]
    fill_value: Any
    zstd: Any  # numcodecs.Zstd with the array's level and checksum, or None

    @property
    def block_rows(self) -> int:
        return self.chunk_shape[0]

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[0] // self.block_rows)

    def rows(self, block: int) -> tuple[int, int]:
        lo = block * self.block_rows
        return lo, min(lo + self.block_rows, self.shape[0])

    def encode(self, data: np.ndarray) -> bytes:
        """The chunk file's bytes for ``data`` (the chunk's rows; fewer rows only in the edge chunk)."""
        if data.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            full[: len(data)] = data
            data = full
        raw = np.ascontiguousarray(data, dtype=self.dtype)
        payload = self.zstd.encode(raw) if self.zstd is not None else raw.tobytes()
        return bytes(payload) + crc32c_bytes(payload)

    def decode(self, payload: bytes, where: str = "chunk") -> np.ndarray:
        """The chunk's rows, in a new (writable) array; ChunkChecksumError if the bytes were changed."""
        problem = checksum_problem(payload)
        if problem:
            raise ChunkChecksumError(f"{where}: {problem}")
        body = memoryview(payload)[:-CRC_BYTES]
        out = np.empty(self.chunk_shape, dtype=self.dtype)
        if self.zstd is not None:
            self.zstd.decode(body, out=out)
        else:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(body, dtype=np.uint8)
        return out

    def fill(self) -> np.ndarray:
        return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)


def crc32c_bytes(data) -> bytes:
    import google_crc32c

    return struct.pack("<I", google_crc32c.value(bytes(data) if not isinstance(data, bytes) else data))


def checksum_problem(payload: bytes) -> str | None:
    """Why a chunk file's bytes fail their crc32c, or None when they pass."""
    if len(payload) < CRC_BYTES:
        return f"{len(payload)} bytes, too short to hold a checksum (truncated)"
    if crc32c_bytes(memoryview(payload)[:-CRC_BYTES]) != payload[-CRC_BYTES:]:
        return "its crc32c checksum does not match its bytes (changed or truncated on disk)"
    return None


def chunk_format(arr: zarr.Array) -> ChunkFormat | None:
    """The :class:`ChunkFormat` of ``arr``, or None for a layout :func:`create` does not make."""
    from numcodecs import Zstd
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
    from zarr.core.chunk_grids import RegularChunkGrid

    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or not isinstance(md.chunk_grid, RegularChunkGrid):
        return None
    if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return None  # a chunk would not hold whole rows
    chain = tuple(md.codecs)
    if len(chain) not in (2, 3) or not isinstance(chain[0], BytesCodec) or not isinstance(chain[-1], Crc32cCodec):
        return None
    if len(chain) == 3 and not isinstance(chain[1], ZstdCodec):
        return None
    endian = "<" if chain[0].endian is None or chain[0].endian.name == "little" else ">"
    zstd = Zstd(level=chain[1].level, checksum=chain[1].checksum) if len(chain) == 3 else None
    return ChunkFormat(tuple(arr.shape), np.dtype(arr.dtype).newbyteorder(endian), tuple(arr.chunks),
                       arr.fill_value, zstd)


def chunk_file(path: str | Path, block: int, ndim: int = 2) -> Path:
    """The file of block ``block``: Zarr v3's default chunk key ``c/<block>/0/...``."""
    return Path(path, "c", str(block), *(["0"] * (ndim - 1)))


def read_rows(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the array at ``path``, each chunk's checksum checked."""
    arr, fmt = _open(path)
    start, stop = max(0, start), min(stop, arr.shape[0])
    if fmt is None or stop - start <= 0:
        return arr[start:stop]
    b = fmt.block_rows
    first, last = start // b, -(-stop // b)
    out = None if last - first == 1 else np.empty((stop - start, *arr.shape[1:]), np.dtype(arr.dtype))
    for block in range(first, last):  # several blocks: filled one at a time, never twice the rows in memory
        lo = block * b
        file = chunk_file(path, block, arr.ndim)
        try:
            rows = fmt.decode(file.read_bytes(), str(file))
        except FileNotFoundError:
            rows = fmt.fill()  # never written: the fill value, as Zarr reads it
        a, z = max(start - lo, 0), min(stop - lo, b)
        if out is None:
            return rows[a:z].astype(np.dtype(arr.dtype), copy=False)
        out[lo + a - start : lo + z - start] = rows[a:z]
    return out


def read_block(path: str | Path, block: int) -> np.ndarray:
    fmt = open_format(path)
    return read_rows(path, *fmt.rows(block))


def block_checksum_problems(path: str | Path, blocks: list[int]) -> dict[int, str]:
    """The blocks among ``blocks`` whose chunk file is missing or fails its checksum, with why."""
    ndim = open_read(path).ndim
    bad = {}
    for block in blocks:
        file = chunk_file(path, block, ndim)
        try:
            problem = checksum_problem(file.read_bytes())
        except FileNotFoundError:
            problem = "its chunk file is missing"
        if problem:
            bad[block] = problem
    return bad


def _read_window(path: str, offset: int, block_info=None) -> np.ndarray:
    (lo, hi), *_ = block_info[None]["array-location"]
    return read_rows(path, offset + lo, offset + hi)


def lazy_rows(path: str | Path, start: int, stop: int, chunks: tuple[int, ...] | None = None, name: str | None = None):
    """Rows ``start:stop`` of a stored array as a Dask array (one read task per chunk of ``chunks`` rows,
    default: one per block), read with :func:`read_rows`."""
    import dask.array as da
    from dask.base import tokenize

    arr, fmt = _open(path)
    if chunks is None:
        b = fmt.block_rows if fmt else arr.chunks[0]
        edges = sorted({start, stop, *range(-(-start // b) * b, stop, b)})
        chunks = tuple(np.diff(edges).tolist()) or (0,)
    st = os.stat(os.path.join(str(path), "zarr.json"))
    token = tokenize(str(path), st.st_mtime_ns, start, stop, chunks)
    label = name or f"read-{Path(path).stem}"
    return da.map_blocks(_read_window, str(path), start, chunks=(tuple(chunks),) + tuple((s,) for s in arr.shape[1:]),
                         dtype=np.dtype(arr.dtype), name=f"{label}-{token}", meta=np.empty((0,) * arr.ndim, arr.dtype))
