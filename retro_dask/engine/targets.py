"""Where a stage's blocks land: the targets that ``dask.array.store`` writes into.

A target is a block grid over rows (``n_blocks``, ``rows(block)``) with a
``__setitem__`` that ``da.store`` calls inside a worker with one Dask chunk of
the stage's lazy array: whole blocks of rows, each written to a temporary name
and renamed into place, so a retried or duplicated task is harmless. It also
names the files a block leaves (``files(block)``), which the executor records
in the ledger once the task is done. Fault injection (``faults.py``) happens
here, where a real crash would.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import zarr_blocks
from ..formats.ledger import file_sizes
from ..formats.workdir import temporary_sibling, write_error
from . import faults


def write_file_atomic(workdir: str, stage: str, block: int, target: Path, payload: bytes) -> None:
    """Write a block's file as Zarr's LocalStore does: to a temporary name, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        faults.atomic_file_write_hook(workdir, stage, block, tmp, payload)
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise write_error(target, exc) from exc
        raise


def rows_of(key: Any) -> tuple[int, int]:
    """The row range of a ``da.store`` region (a tuple of slices, rows first)."""
    rows = key[0] if isinstance(key, tuple) else key
    return int(rows.start or 0), int(rows.stop)


@dataclass(frozen=True)
class ZarrTarget:
    """A Zarr array of the workdir (``zarr_blocks``), written a whole chunk (block) at a time."""

    workdir: str
    stage: str
    path: str
    fmt: zarr_blocks.ChunkFormat

    @classmethod
    def create(cls, workdir: str, stage: str, path: str | Path, shape: tuple[int, ...], dtype: Any, block_rows: int,
               *, compressed: bool = True, fill_value: Any = 0) -> "ZarrTarget":
        zarr_blocks.create(path, shape, dtype, block_rows, compressed=compressed, fill_value=fill_value)
        return cls.open(workdir, stage, path)

    @classmethod
    def open(cls, workdir: str, stage: str, path: str | Path) -> "ZarrTarget":
        return cls(str(workdir), stage, str(path), zarr_blocks.open_format(path))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.fmt.shape

    @property
    def n_blocks(self) -> int:
        return self.fmt.n_blocks

    def rows(self, block: int) -> tuple[int, int]:
        return self.fmt.rows(block)

    def files(self, block: int) -> list[Path]:
        return [zarr_blocks.chunk_file(self.path, block, len(self.shape))]

    def record(self, block: int) -> dict[str, Any]:
        """The ledger record of a block just written: its rows, its file's size and its crc32c (the file's
        last bytes), so that a block later truncated can still be told from one recomputed differently."""
        file = self.files(block)[0]
        with open(file, "rb") as f:
            f.seek(-zarr_blocks.CRC_BYTES, os.SEEK_END)
            crc = f.read(zarr_blocks.CRC_BYTES).hex()
        return {"block": block, "rows": list(self.rows(block)), "files": file_sizes(self.workdir, [file]), "crc32c": crc}

    def region(self, lo: int, hi: int) -> tuple[slice, ...]:
        return (slice(lo, hi),) + tuple(slice(0, s) for s in self.shape[1:])

    def __setitem__(self, key: Any, data: np.ndarray) -> None:
        lo, hi = rows_of(key)
        b = self.fmt.block_rows
        if lo % b or (hi % b and hi != self.shape[0]):
            raise ValueError(f"{self.path}: rows {lo}:{hi} are not whole blocks of {b} rows")
        for block in range(lo // b, -(-hi // b)):
            a, z = self.rows(block)
            faults.before_block(self.workdir, self.stage, block)
            rows = np.asarray(data[a - lo : z - lo])
            if rows.shape != (z - a,) + self.shape[1:]:
                raise ValueError(f"block {block} of {self.path}: data shape {rows.shape} != {(z - a,) + self.shape[1:]}")
            write_file_atomic(self.workdir, self.stage, block, self.files(block)[0], self.fmt.encode(rows))

    def write_block(self, block: int, data: np.ndarray) -> None:
        """Write one block from this process (what the driver writes itself, e.g. the index-training sample)."""
        self[self.region(*self.rows(block))] = data
