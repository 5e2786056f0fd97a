"""Workdirs whose database embeddings are stored synthetic vectors instead of BERT outputs.

The scaling and query benchmarks need databases of millions of chunks; BERT on
this CPU embeds about 140 chunks/s, so for them the embed stage is replaced by
writing seeded, clustered 384-d vectors block by block (never all in memory)
into ``db/embeddings.zarr``, exactly where and how the embed stage writes.
Everything else (db-build, index-train, index-add, query-neighbors with the
real model on the query chunks) runs for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT

DIM = 384


def run_cli(workdir: Path, tasks: str, *extra: str, prefix: str | None = None) -> float:
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--workdir", str(workdir), "--tasks", tasks,
           "--no-progress", "--dashboard-address", "127.0.0.1:0", *extra]
    if prefix:
        cmd += ["--data-path", "1", prefix]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def _clustered_block(seed: int, n_centers: int, block_info=None) -> np.ndarray:
    (lo, hi), _ = block_info[None]["array-location"]
    centers = np.random.default_rng([seed, 0]).standard_normal((n_centers, DIM)).astype(np.float32) * 2
    rng = np.random.default_rng([seed, 1, lo])
    return centers[rng.integers(0, n_centers, hi - lo)] + rng.standard_normal((hi - lo, DIM), dtype=np.float32)


def write_clustered_embeddings(workdir: Path, n: int, block: int, n_centers: int, seed: int) -> None:
    """Store ``n`` clustered 384-d vectors into embeddings.zarr through the executor, a block at a time,
    recorded in the ledger as the embed stage records its blocks."""
    import dask.array as da

    from retro_dask.engine.executor import Executor, StoreJob
    from retro_dask.engine.targets import ZarrTarget
    from retro_dask.formats.workdir import embeddings_path

    target = ZarrTarget.create(str(workdir), "embed", embeddings_path(workdir), (n, DIM), np.float32, block,
                               compressed=False, fill_value=0.0)

    def expression(lo: int, hi: int):
        return da.map_blocks(_clustered_block, seed + lo, n_centers, chunks=((hi - lo,), (DIM,)), dtype=np.float32)

    Executor(str(workdir), None, progress=False, log=lambda m: None).store(
        [StoreJob("embed", target, expression)], "synthetic embeddings")


def store_synthetic_embeddings(workdir: Path, seed: int = 0) -> float:
    """Fill embeddings.zarr with clustered vectors, one block at a time, as the embed stage would."""
    from retro_dask.formats import zarr_blocks
    from retro_dask.formats.workdir import chunks_path

    t0 = time.perf_counter()
    fmt = zarr_blocks.open_format(chunks_path(workdir))
    write_clustered_embeddings(workdir, fmt.shape[0], fmt.block_rows, 4096, seed)
    return time.perf_counter() - t0


def stats(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / "stats" / f"{stage}.json").read_text())
