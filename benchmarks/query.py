#!/usr/bin/env python
"""Benchmark: query-neighbors throughput, where its time goes, and worker memory as the database grows.

Two databases: the sample corpus (~20k chunks) and a synthetic corpus of
``--tokens`` (default 40M, ~600k chunks), both through db-build for real; their
embeddings are stored synthetic vectors (``stored.py``: BERT on every database
chunk would not fit the time; the query side is untouched). Each gets its auto
index and then ``--tasks query-neighbors`` with ``--train-samples`` samples
(default 128, i.e. 4,096 query chunks embedded by the real model) on the
default embedded cluster.

It prints query chunks/s, the share of task time spent embedding, searching
and filtering, and each worker's memory: peak RSS, and at the end of its tasks
the anonymous part (the worker's own memory, which must not grow with the
database) and the file-backed part (the memory-mapped index and row ->
document table: page cache the search touches, shared between workers and
given back under memory pressure).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/query.py``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import machine, record_results, sample_corpus, table
from stored import run_cli, stats, store_synthetic_embeddings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tokens", type=float, default=40e6)
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    from db_build import synthetic_corpus

    tmp = Path(tempfile.mkdtemp(prefix="retro-query-bench-"))
    try:
        sample = sample_corpus(tmp)
        large = synthetic_corpus(tmp, sample, args.tokens, seed=3)
        rows = []
        for name, prefix in (("sample corpus", sample), (f"synthetic {args.tokens / 1e6:.0f}M tokens", large)):
            w = tmp / name.split()[0]
            samples = ["--train-samples", str(args.train_samples), "--valid-samples", "0", "--test-samples", "0"]
            run_cli(w, "db-build", *samples, prefix=prefix)
            store_synthetic_embeddings(w)
            run_cli(w, "index-train,index-add")
            run_cli(w, "query-neighbors")
            q = stats(w, "query-neighbors")
            t = stats(w, "query-train")
            parts = {k: t[f"{k}_seconds_total"] for k in ("embed", "search", "filter")}
            busy = sum(parts.values())
            n_db = stats(w, "db-build")["n_chunks"]
            rows.append([name, f"{n_db:,}", stats(w, "index-train")["factory"], q["nprobe"], q["n_query_chunks"],
                         f"{q['n_query_chunks'] / q['seconds']:.1f}",
                         " / ".join(f"{parts[k] / busy:.3f}" for k in ("embed", "search", "filter")),
                         " / ".join(f"{v:.0f}" for v in q["worker_peak_rss_mb"].values()),
                         " / ".join(f"{v:.0f}" for v in q["worker_rss_anon_mb"].values()),
                         " / ".join(f"{v:.0f}" for v in q["worker_rss_file_mb"].values())])
            print(json.dumps({name: q}), flush=True)
            shutil.rmtree(w, ignore_errors=True)
        out = table(rows, ["database", "chunks", "index", "nprobe", "query chunks", "query chunks/s",
                           "embed / search / filter share", "worker peak RSS MB", "worker anonymous MB",
                           "worker file-backed MB (mapped index)"])
        print(f"\nquery-neighbors on {machine()}\n")
        print(out)
        if args.record:
            record_results("query-neighbors: throughput and memory", out, "python benchmarks/query.py --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
