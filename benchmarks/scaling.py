#!/usr/bin/env python
"""Benchmark: cost and memory as the corpus grows, from the sample corpus to 5M+ chunks.

Corpora: the sample corpus (~1M tokens), a synthetic corpus of 20M tokens, and
one of ``--tokens`` (default 330M tokens, i.e. 5M+ database chunks), generated
blockwise from the sample's documents. Each goes through db-build for real; the
database embeddings are stored synthetic vectors (``stored.py``; BERT on 5M
chunks would take ten hours here) so that index-train, index-add and
query-neighbors (``--train-samples`` samples, embedded by the real model) run
on the full database.

It prints per corpus and stage: wall time, throughput, the peak RSS of the
driver and of each worker, and the largest number of tasks the Dask scheduler
held at once (the executor submits windows of spans: it must not grow with the
corpus), so that cost per chunk, memory and graph size can be compared as the
corpus grows (goal: cost linear in the corpus, memory and tasks flat).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scaling.py [--tokens 330e6]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import machine, record_results, sample_corpus, table
from stored import run_cli, stats, store_synthetic_embeddings


def peaks(s: dict, key: str = "worker_peak_rss_mb") -> str:
    values = (s.get(key) or {}).values()
    return " / ".join(f"{v:.0f}" for v in values) or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tokens", type=float, default=330e6)
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--dir", default=None)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    from db_build import synthetic_corpus

    tmp = Path(tempfile.mkdtemp(prefix="retro-scaling-bench-", dir=args.dir))
    try:
        sample = sample_corpus(tmp)
        corpora = [("sample", sample), ("20M", synthetic_corpus(tmp, sample, 20e6, seed=4)),
                   (f"{args.tokens / 1e6:.0f}M", synthetic_corpus(tmp, sample, args.tokens, seed=5))]
        rows = []
        for name, prefix in corpora:
            w = tmp / f"w-{name}"
            # The database embeddings are synthetic: a recall-tuned nprobe means nothing here, so the fixed
            # default (an eighth of the lists) keeps the search comparable across corpora.
            samples = ["--train-samples", str(args.train_samples), "--valid-samples", "0", "--test-samples", "0",
                       "--query-nprobe", "default"]
            run_cli(w, "db-build", *samples, prefix=prefix)
            store_synthetic_embeddings(w)
            run_cli(w, "index-train")  # separate runs: each stage's worker peak RSS is its own
            run_cli(w, "index-add")
            run_cli(w, "query-neighbors")
            db, tr, add, q = (stats(w, s) for s in ("db-build", "index-train", "index-add", "query-neighbors"))
            n = db["n_chunks"]
            tasks = lambda s: str(s.get("scheduler_tasks_max", "-"))  # noqa: E731
            rows += [
                [name, "db-build", f"{n:,}", f"{db['seconds']:.1f}", f"{db['n_candidates'] / db['seconds']:,.0f} chunks/s",
                 f"{db['driver_peak_rss_mb']:.0f}", peaks(db), tasks(db)],
                [name, f"index-train ({tr['factory']})", f"{tr.get('n_train', n):,}", f"{tr['seconds']:.1f}", "-",
                 f"{tr['driver_peak_rss_mb']:.0f}", "-", tasks(tr)],
                [name, "index-add", f"{n:,}", f"{add['seconds']:.1f}", f"{n / add['seconds']:,.0f} vectors/s",
                 f"{add['driver_peak_rss_mb']:.0f}",
                 f"{peaks(add)} (assembly {add['assemble_worker_peak_rss_mb']:.0f})", tasks(add)],
                [name, f"query-neighbors (nprobe {q['nprobe']})", f"{q['n_query_chunks']:,}", f"{q['seconds']:.1f}",
                 f"{q['n_query_chunks'] / q['seconds']:,.1f} chunks/s", f"{q['driver_peak_rss_mb']:.0f}",
                 f"{peaks(q)} (anon {peaks(q, 'worker_rss_anon_mb')})", tasks(q)],
            ]
            print(json.dumps({name: {"db": db, "add": add, "query": q}}), flush=True)
            shutil.rmtree(w, ignore_errors=True)
        out = table(rows, ["corpus", "stage", "rows", "seconds", "throughput", "driver peak MB", "worker peak MB",
                           "scheduler tasks (most at once)"])
        print(f"\nscaling on {machine()}\n")
        print(out)
        if args.record:
            record_results("scaling: sample corpus to 5M+ chunks", out,
                           f"python benchmarks/scaling.py --tokens {args.tokens:g} --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
