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


def write_clustered_embeddings(workdir: Path, n: int, block: int, n_centers: int, rng: np.random.Generator) -> None:
    """Write ``n`` clustered 384-d vectors into embeddings.zarr, one block at a time, as the embed stage does."""
    from retro_dask import arrays
    from retro_dask.workdir import embeddings_path

    centers = rng.standard_normal((n_centers, DIM)).astype(np.float32) * 2
    arrays.create(embeddings_path(workdir), (n, DIM), np.float32, block, compressed=False)
    for b in range(-(-n // block)):
        m = min(block, n - b * block)
        x = centers[rng.integers(0, len(centers), m)] + rng.standard_normal((m, DIM), dtype=np.float32)
        arrays.write_block(str(workdir), "embed", embeddings_path(workdir), b, x)


def store_synthetic_embeddings(workdir: Path, seed: int = 0) -> float:
    """Fill embeddings.zarr with clustered vectors, one block at a time, as the embed stage would."""
    from retro_dask import arrays
    from retro_dask.workdir import chunks_path, mark_stage_done

    t0 = time.perf_counter()
    chunks = arrays.open_read(chunks_path(workdir))
    n, B = chunks.shape[0], chunks.chunks[0]
    write_clustered_embeddings(workdir, n, B, 4096, np.random.default_rng(seed))
    mark_stage_done(workdir, "embed", {"n_chunks": n, "dim": DIM, "synthetic": True})
    return time.perf_counter() - t0


def stats(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / "stats" / f"{stage}.json").read_text())
