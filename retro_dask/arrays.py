"""Zarr v3 arrays of the workdir, written one whole block (one Zarr chunk) at a time.

Every array is chunked along rows by the block size and holds whole rows in a
chunk, so a block is exactly one chunk file. Writing a whole chunk needs no
read-modify-write, so a retried or duplicated Dask task is harmless. Block
writes and reads encode and decode the chunk files here (:class:`ChunkFormat`),
with Zarr's codec parameters: Zarr reads what they write, and they write what
Zarr would, to a temporary name renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from . import faults
from .workdir import Ledger, file_record, temporary_sibling, write_error

# Empty chunks must still be written: a block of -1 neighbours is a finished
# block, and the ledger checks the chunk file on disk.
ZARR_CONFIG = {"write_empty_chunks": True}


def compressors(compressed: bool):
    # zstd level 1 costs little and shrinks the integer tables several-fold;
    # float embeddings gain only ~7%, so they are stored raw.
    return (zarr.codecs.ZstdCodec(level=1),) if compressed else None


def create(
    path: str | Path,
    shape: tuple[int, ...],
    dtype: Any,
    block_rows: int,
    *,
    compressed: bool = True,
    fill_value: Any = 0,
    attributes: dict[str, Any] | None = None,
) -> zarr.Array:
    """Create the array, or keep an existing one with the same layout (resume)."""
    path = Path(path)
    chunks = (max(1, int(block_rows)),) + tuple(shape[1:])
    if path.exists():
        try:
            old = zarr.open_array(str(path), mode="r")
            if old.shape == tuple(shape) and old.chunks == chunks and old.dtype == np.dtype(dtype):
                if attributes:
                    old = zarr.open_array(str(path), mode="r+")
                    old.attrs.update(attributes)
                return old
        except Exception:
            pass
    try:
        arr = zarr.create_array(
            store=str(path),
            shape=tuple(int(s) for s in shape),
            chunks=chunks,
            dtype=np.dtype(dtype),
            fill_value=fill_value,
            compressors=compressors(compressed),
            overwrite=True,
            config=ZARR_CONFIG,
        )
    except OSError as exc:
        raise write_error(path, exc) from exc
    if attributes:
        arr.attrs.update(attributes)
    return arr


# Opened arrays of this process, by (path, mode), with the identity of the zarr.json they were opened
# from and their ChunkFormat.
_OPENED: dict[tuple[str, str], tuple[tuple[int, int, int], zarr.Array, "ChunkFormat | None"]] = {}
_MAX_OPENED = 64


def _open(path: str | Path, mode: str) -> tuple[zarr.Array, "ChunkFormat | None"]:
    """Open an array and find its chunk format, reusing this process's earlier open while its zarr.json
    is the same file, unchanged.

    Opening reads and parses zarr.json through Zarr's event loop: ~1 ms, as much as
    writing a db-build block. An array created anew or given new attributes has a
    new zarr.json (another inode or mtime) and is opened again.
    """
    key = (str(path), mode)
    try:
        st = os.stat(os.path.join(key[0], "zarr.json"))
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        identity = None
    cached = _OPENED.get(key)
    if identity is not None and cached is not None and cached[0] == identity:
        return cached[1], cached[2]
    arr = zarr.open_array(key[0], mode=mode)
    if mode != "r":
        # The array config is not stored in zarr.json: it must be set on every open.
        arr = arr.with_config(ZARR_CONFIG)
    fmt = chunk_format(arr)
    if identity is not None:
        if len(_OPENED) >= _MAX_OPENED:
            _OPENED.clear()
        _OPENED[key] = (identity, arr, fmt)
    return arr, fmt


def open_read(path: str | Path) -> zarr.Array:
    return _open(path, "r")[0]


def open_write(path: str | Path) -> zarr.Array:
    return _open(path, "r+")[0]


# ---------------------------------------------------------------- whole chunks, without Zarr's event loop


@dataclass(frozen=True)
class ChunkFormat:
    """How one chunk of an array is stored: the layout of every array :func:`create` makes.

    The chunk holds whole rows (the grid is regular, the edge chunk padded with
    the fill value to the full chunk shape), serialized by Zarr's ``bytes``
    codec in C order, then optionally compressed by its ``zstd`` codec.
    """

    dtype: np.dtype  # with the stored byte order
    chunk_shape: tuple[int, ...]
    fill_value: Any
    zstd: Any  # numcodecs.Zstd with the array's level and checksum, or None

    def encode(self, data: np.ndarray) -> bytes:
        """The chunk file's bytes for ``data`` (the chunk's rows; fewer rows only in the edge chunk)."""
        if data.shape != self.chunk_shape:
            full = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            full[: len(data)] = data
            data = full
        raw = np.ascontiguousarray(data, dtype=self.dtype)
        return self.zstd.encode(raw) if self.zstd is not None else raw.tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        """The chunk's rows, in a new (writable) array."""
        out = np.empty(self.chunk_shape, dtype=self.dtype)
        if self.zstd is not None:
            self.zstd.decode(payload, out=out)
        else:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload, dtype=np.uint8)
        return out


def chunk_format(arr: zarr.Array) -> ChunkFormat | None:
    """The :class:`ChunkFormat` of ``arr``, or None for a layout this module does not write itself.

    Zarr's own ``arr[a:b] = x`` of one 1,024-row chunk takes ~1.3 ms, three
    hops through its event loop and thread pool around ~0.3 ms of work; db-build
    writes two such chunks per block and reads three. Encoding the chunk here,
    with Zarr's own codec parameters and the same zstd library, gives the same
    bytes (tests/test_db_build.py checks them against Zarr's).
    """
    from numcodecs import Zstd
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.core.chunk_grids import RegularChunkGrid

    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or not isinstance(md.chunk_grid, RegularChunkGrid):
        return None
    if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return None  # a chunk would not hold whole rows
    codecs = tuple(md.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    if len(codecs) == 2 and not isinstance(codecs[1], ZstdCodec):
        return None
    endian = "<" if codecs[0].endian is None or codecs[0].endian.name == "little" else ">"
    zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum) if len(codecs) == 2 else None
    return ChunkFormat(np.dtype(arr.dtype).newbyteorder(endian), tuple(arr.chunks), arr.fill_value, zstd)


def _write_chunk_file(workdir: str, stage: str, block: int, target: Path, payload: bytes) -> None:
    """Write a chunk file as Zarr's LocalStore does: to a temporary name, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        faults.atomic_file_write_hook(workdir, stage, block, tmp, payload)
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_rows(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the array at ``path``, decoding its chunk files directly when it can."""
    arr, fmt = _open(path, "r")
    start, stop = max(0, start), min(stop, arr.shape[0])
    if fmt is None or stop - start <= 0:
        return arr[start:stop]
    b = arr.chunks[0]
    parts = []
    for block in range(start // b, -(-stop // b)):
        lo = block * b
        try:
            rows = fmt.decode(chunk_file(arr, path, block).read_bytes())
        except FileNotFoundError:
            rows = np.full(fmt.chunk_shape, fmt.fill_value, dtype=fmt.dtype)  # never written: the fill value
        parts.append(rows[max(start - lo, 0) : min(stop - lo, b)])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.astype(np.dtype(arr.dtype), copy=False)


def chunk_file(arr: zarr.Array, path: str | Path, block: int) -> Path:
    key = arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))
    return Path(path) / key


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def read_block(path: str | Path, block: int) -> np.ndarray:
    b = open_read(path).chunks[0]
    return read_rows(path, block * b, (block + 1) * b)


def write_block(
    workdir: str,
    stage: str,
    path: str | Path,
    block: int,
    data: np.ndarray,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``data`` as block ``block`` of the array at ``path``, then record it done.

    The ledger record is written only after the chunk file is in place, and
    holds the chunk file's size so that a later run can tell a finished block
    from one that was truncated or removed.
    """
    faults.before_block(workdir, stage, block)
    written, digest = write_chunk(workdir, stage, path, block, data)
    b = open_write(path).chunks[0]
    record = {"rows": [block * b, block * b + len(data)], **(record or {})}
    record["files"] = file_record(workdir, written)
    # The checksum lets verify tell a block changed on disk from one recomputed differently.
    record["sha256"] = digest
    Ledger(workdir, stage).write(block, record)
    return {"block": block, **record}


def write_chunk(workdir: str, stage: str, path: str | Path, block: int, data: np.ndarray) -> tuple[Path, str]:
    """Write ``data`` as block ``block`` (one chunk file) of the array at ``path``; no ledger record.

    Returns the chunk file and the sha256 of its bytes. ``workdir`` and ``stage``
    name the block for fault injection and errors.
    """
    arr, fmt = _open(path, "r+")
    b = arr.chunks[0]
    start = block * b
    stop = min(start + b, arr.shape[0])
    if data.shape != (stop - start,) + arr.shape[1:]:
        raise ValueError(f"block {block} of {path}: data shape {data.shape} != {(stop - start,) + arr.shape[1:]}")
    written = chunk_file(arr, path, block)
    try:
        if fmt is None:
            arr[start:stop] = data
            return written, file_sha256(written)
        payload = fmt.encode(data)
        _write_chunk_file(workdir, stage, block, written, payload)
        return written, hashlib.sha256(payload).hexdigest()
    except OSError as exc:
        raise write_error(written, exc) from exc
