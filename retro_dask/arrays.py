"""Zarr v3 arrays of the workdir, written one whole block (one Zarr chunk) at a time.

Every array is chunked along rows by the block size and holds whole rows in a
chunk, so a block is exactly one chunk file. Writing a whole chunk needs no
read-modify-write, so a retried or duplicated Dask task is harmless; Zarr's
LocalStore writes each chunk to a temporary name and renames it into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from . import faults
from .workdir import Ledger, file_record, write_error

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


# Opened arrays of this process, by (path, mode), with the identity of the zarr.json they were opened from.
_OPENED: dict[tuple[str, str], tuple[tuple[int, int, int], zarr.Array]] = {}
_MAX_OPENED = 64


def _open(path: str | Path, mode: str) -> zarr.Array:
    """Open an array, reusing this process's earlier open while its zarr.json is the same file, unchanged.

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
        return cached[1]
    arr = zarr.open_array(key[0], mode=mode)
    if mode != "r":
        # The array config is not stored in zarr.json: it must be set on every open.
        arr = arr.with_config(ZARR_CONFIG)
    if identity is not None:
        if len(_OPENED) >= _MAX_OPENED:
            _OPENED.clear()
        _OPENED[key] = (identity, arr)
    return arr


def open_read(path: str | Path) -> zarr.Array:
    return _open(path, "r")


def open_write(path: str | Path) -> zarr.Array:
    return _open(path, "r+")


def chunk_file(arr: zarr.Array, path: str | Path, block: int) -> Path:
    key = arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))
    return Path(path) / key


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def read_block(path: str | Path, block: int) -> np.ndarray:
    arr = open_read(path)
    b = arr.chunks[0]
    return arr[block * b : (block + 1) * b]


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
    arr = open_write(path)
    b = arr.chunks[0]
    start = block * b
    stop = min(start + b, arr.shape[0])
    if data.shape != (stop - start,) + arr.shape[1:]:
        raise ValueError(f"block {block} of {path}: data shape {data.shape} != {(stop - start,) + arr.shape[1:]}")
    try:
        with faults.disk(workdir, stage, block):
            arr[start:stop] = data
    except OSError as exc:
        raise write_error(chunk_file(arr, path, block), exc) from exc
    record = {"rows": [start, stop], **(record or {})}
    written = chunk_file(arr, path, block)
    record["files"] = file_record(workdir, written)
    # The checksum lets verify tell a block changed on disk from one recomputed differently.
    record["sha256"] = file_sha256(written)
    Ledger(workdir, stage).write(block, record)
    return {"block": block, **record}
