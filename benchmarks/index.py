#!/usr/bin/env python
"""Benchmark: index-add (block encoding + merge) against a single-process Faiss add.

Synthetic, clustered 384-d vectors (``--vectors``, default 5M; generated block
by block, never all in memory) are written to a workdir's embeddings.zarr
first, with a training sample, and the index (``--index-str``, default
IVF4096,Flat) is trained once. Then, in the same run:

- baseline: one process, Faiss's own threads on every core, reads the vectors
  block by block, ``add_with_ids`` of all of them, ``write_index``; with
  ``--runs ...,1thread`` also the same with one Faiss thread;
- pipeline, 1 worker with every core (threads), and 2 single-thread workers:
  ``--tasks index-add`` (encode spans of blocks in the workers, merge if needed,
  write the final index file with fsync);
- the same 2-worker pipeline with ``--index-on-disk``;
- a 4x smaller database through the 2-worker pipeline, for memory;
- ``1thread``: the pipeline with 1 single-thread worker (against the 1-thread baseline).

It prints wall times, pipeline/baseline against both baselines (goal: at most
1.1 with 1 worker, faster with 2), the merge's own time, and the peak RSS of
each worker during encoding and of the assembly (flat when the vectors grow
4x: the assembly writes the lists straight into the file, in memory mode too).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/index.py [--vectors 5e6]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, record_results, table
from stored import DIM as D, write_clustered_embeddings

BLOCK = 1024
RUNS = ("1worker", "2workers", "disk", "small", "small-disk", "1thread")


def make_workdir(w: Path, n: int, index_str: str, ntrain: int, seed: int = 0) -> None:
    """A workdir holding synthetic embeddings (as the embed stage leaves it) and a training sample."""
    from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, IndexConfig, QueryConfig
    from retro_dask.engine.targets import ZarrTarget
    from retro_dask.formats.workdir import atomic_write_bytes, config_path, sampled_path

    write_clustered_embeddings(w, n, BLOCK, 2000, seed)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(ntrain, n), replace=False))
    target = ZarrTarget.create(str(w), "db-sampled", sampled_path(w), sample.shape, np.int64, 1 << 20)
    for b in range(target.n_blocks):
        target.write_block(b, sample[b << 20 : (b + 1) << 20])
    config = BuildConfig(ChunkConfig(DataBlend((1.0,), ("/synthetic",)), block_size=BLOCK),
                         index=IndexConfig(index_str=index_str, ntrain=ntrain), query=QueryConfig())
    atomic_write_bytes(config_path(w), config.to_json().encode())


def run_stage(w: Path, task: str, workers: int, threads: int, on_disk: bool = False) -> dict:
    """One index stage through the library in a fresh process (its own peak RSS, its own cluster)."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from retro_dask.build import recorded_config
from retro_dask.config import BuildConfig, IndexConfig, RunOptions
from retro_dask.engine.cluster import open_client
from retro_dask.engine.executor import Executor
from retro_dask.stages.registry import run_stage
def main():
    w = {str(w)!r}
    config = recorded_config(w)
    config = BuildConfig(config.chunk, config.embed, IndexConfig(**{{**config.index.__dict__, "on_disk": {on_disk}}}), config.query)
    options = RunOptions(n_workers={workers}, threads_per_worker={threads}, dashboard_address="127.0.0.1:0", progress=False)
    with open_client(options, w, log=lambda m: None) as client:
        stats = run_stage({task!r}, Executor(w, client, progress=False, log=lambda m: None), config, print)
    print("STATS" + json.dumps(stats))
if __name__ == "__main__":
    main()
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.split("STATS", 1)[1])


def baseline_add(w: Path, tag: str, threads: int) -> dict:
    code = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from retro_dask.engine.process_env import peak_rss_mb
from retro_dask.formats import zarr_blocks
from retro_dask.formats.faiss_index import faiss, read_index_file
from retro_dask.formats.workdir import embeddings_path, trained_index_path
w, tag = {str(w)!r}, {tag!r}
t0 = time.perf_counter()
f = faiss(); f.omp_set_num_threads({threads})
index = read_index_file(trained_index_path(w, tag))
emb = zarr_blocks.open_format(embeddings_path(w)); B = emb.block_rows
for lo in range(0, emb.shape[0], B):
    x = np.ascontiguousarray(zarr_blocks.read_rows(embeddings_path(w), lo, lo + B), dtype=np.float32)
    index.add_with_ids(x, np.arange(lo, lo + len(x), dtype=np.int64))
t_add = time.perf_counter()
f.write_index(index, os.path.join(w, "baseline.faissindex"))
print("STATS" + json.dumps({{"seconds": time.perf_counter() - t0, "add_seconds": t_add - t0,
      "rss_mb": peak_rss_mb()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    os.unlink(w / "baseline.faissindex")
    return json.loads(out.split("STATS", 1)[1])


def reset_add(w: Path, tag: str) -> None:
    from retro_dask.formats.ledger import Ledger
    from retro_dask.formats.workdir import index_dir

    for name in ("added.faissindex", "added.ivfdata"):
        (index_dir(w, tag) / name).unlink(missing_ok=True)
    shutil.rmtree(index_dir(w, tag) / "partials", ignore_errors=True)
    for stage in ("index-encode", "index-add"):
        Ledger(str(w), stage).clear()


def encode_peaks(w: Path) -> str:
    stats = json.loads((w / "stats" / "index-add.json").read_text())
    return " / ".join(f"{v:.0f}" for v in stats["worker_peak_rss_mb"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--vectors", type=float, default=5e6)
    p.add_argument("--index-str", default="IVF4096,Flat")
    p.add_argument("--ntrain", type=int, default=200_000)
    p.add_argument("--dir", default=None, help="scratch folder (needs ~3x the vectors' size free)")
    p.add_argument("--record", action="store_true")
    p.add_argument("--runs", default=",".join(RUNS), help=f"pipeline runs, any of {','.join(RUNS)} (default all)")
    args = p.parse_args()
    runs = args.runs.split(",")
    if unknown := set(runs) - set(RUNS):
        p.error(f"--runs: unknown {sorted(unknown)}; choose from {','.join(RUNS)}")
    n = int(args.vectors)
    tmp = Path(tempfile.mkdtemp(prefix="retro-index-bench-", dir=args.dir))
    cores = os.cpu_count() or 1
    try:
        t0 = time.perf_counter()
        big, small = tmp / "big", tmp / "small"
        make_workdir(big, n, args.index_str, args.ntrain)
        with_small = any(r.startswith("small") for r in runs)
        if with_small:
            make_workdir(small, n // 4, args.index_str, args.ntrain, seed=1)
        print(f"wrote {n:,}{f' + {n // 4:,}' if with_small else ''} vectors in {time.perf_counter() - t0:.0f} s", flush=True)
        train = run_stage(big, "index-train", 1, cores)
        if with_small:
            run_stage(small, "index-train", 1, cores)
        tag = train["tag"]
        print(f"trained {train['factory']} in {train['seconds']:.1f} s", flush=True)
        rows = []
        base = baseline_add(big, tag, cores)
        print(json.dumps({"baseline": base}), flush=True)
        # The pipeline on one core against Faiss on one core: the per-core overhead, and what
        # the second worker buys (a 2-core machine has no core left for it otherwise).
        base1 = baseline_add(big, tag, 1) if "1thread" in runs else None
        if base1:
            print(json.dumps({"baseline, 1 thread": base1}), flush=True)

        def ratios(seconds: float | None) -> list[str]:
            if seconds is None:
                return ["-", "-"]
            return [f"{seconds / base['seconds']:.2f}", f"{seconds / base1['seconds']:.2f}" if base1 else "-"]

        rows.append([f"baseline: one process, Faiss {cores} threads", n, f"{base['seconds']:.1f}", *ratios(base["seconds"]),
                     "-", "-", f"{base['rss_mb']:.0f}"])
        if base1:
            rows.append(["baseline: one process, Faiss 1 thread", n, f"{base1['seconds']:.1f}", *ratios(base1["seconds"]),
                         "-", "-", f"{base1['rss_mb']:.0f}"])
        for name, label, workers, threads, disk, w in (
            ("1thread", "pipeline: 1 worker x 1 thread", 1, 1, False, big),
            ("1worker", f"pipeline: 1 worker x {cores} threads", 1, cores, False, big),
            ("2workers", f"pipeline: {cores} workers x 1 thread", cores, 1, False, big),
            ("disk", f"pipeline: {cores} workers, --index-on-disk", cores, 1, True, big),
            ("small", f"pipeline: {cores} workers, 4x fewer vectors", cores, 1, False, small),
            ("small-disk", f"pipeline: {cores} workers, on disk, 4x fewer", cores, 1, True, small),
        ):
            if name not in runs:
                continue
            reset_add(w, tag)
            stats = run_stage(w, "index-add", workers, threads, disk)
            print(json.dumps({label: stats}), flush=True)
            rows.append([label, stats["ntotal"], f"{stats['seconds']:.1f}", *ratios(stats["seconds"] if w is big else None),
                         f"{stats['reduce_seconds']:.1f}", encode_peaks(w),
                         f"{stats['assemble_worker_peak_rss_mb']:.0f}"])
        out = table(rows, ["run", "vectors", "wall s", f"/ baseline ({cores} threads)", "/ baseline (1 thread)",
                           "reduce (merge + assemble) s",
                           "encode worker peak MB", "assembly peak MB"])
        print(f"\nindex-add, {args.index_str} on {D}-d vectors, {machine()}\n")
        print(out)
        if args.record:
            record_results(f"index-add: {args.index_str}, {n:,} vectors", out,
                           f"python benchmarks/index.py --vectors {args.vectors:g} --runs {args.runs} --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
