#!/usr/bin/env python
"""Benchmark: the embed stage against the model's own ceiling, fp32 and bf16.

For each precision, on the sample corpus's database chunks:

- ceiling: the same model's forward pass on the same chunks, pre-tokenized,
  length-sorted over the whole set and batched as the stage batches a block,
  one single-thread process per core (``common.model_ceiling``);
- pipeline: ``--tasks embed`` on the default embedded LocalCluster (one
  single-thread worker per core), from the stage's own timing (model loading
  in the workers, detokenization and WordPiece included; cluster start not).

The two are measured in turn ``--repeats`` times (default 2) and the best of
each is kept: on a shared machine the same work varies by 10% from minute to
minute, and interleaving exposes both to the same conditions. It prints
chunks/s of both, their ratio (goal: at least 0.9), the model's own share of
the stage (the workers' forward-pass time against the ceiling's), the share of
padding tokens, and each worker's peak RSS on a 5x smaller corpus and on the
whole one (it must not grow with the number of chunks).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed.py [--dtypes fp32,bf16]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import machine, model_ceiling, record_results, sample_corpus, table


def build(workdir: Path, prefix: str, dtype: str, tasks: str) -> dict:
    from retro_dask.build import run_build
    from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, EmbedConfig, QueryConfig, RunOptions

    config = BuildConfig(ChunkConfig(DataBlend((1.0,), (prefix,))), embed=EmbedConfig(embed_dtype=dtype),
                         query=QueryConfig(train_samples=0, valid_samples=0, test_samples=0))
    summary = run_build(workdir, config, RunOptions(progress=False, dashboard_address="127.0.0.1:0"), tasks,
                        log=lambda m: None)
    return summary.stats


def peak_halfway_and_end(workdir: Path) -> str:
    """Each worker's peak RSS after half of its blocks and after all of them (from the block ledger)."""
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for f in (workdir / ".retro" / "blocks" / "embed").glob("*.json"):
        r = json.loads(f.read_text())
        by_worker.setdefault(r["worker"], []).append((f.stat().st_mtime, r["rss_mb"]))
    parts = []
    for recs in by_worker.values():
        peaks = [rss for _, rss in sorted(recs)]
        parts.append(f"{max(peaks[: (len(peaks) + 1) // 2]):.0f} -> {max(peaks):.0f}")
    return " / ".join(parts)


def chunk_ids(workdir: Path) -> list[list[int]]:
    """The WordPiece ids the embed stage feeds the model, for the ceiling."""
    from retro_dask import inspect as retro
    from retro_dask.text.bert import get_bert_tokenizer

    retro.init(str(workdir), quiet=True)
    texts = [retro.get_db_chunk_text(i) for i in range(retro.get_db_num_chunks())]
    return get_bert_tokenizer().encode_for_model(texts, 256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default: fp32, and bf16 where this CPU has bf16 kernels: emulated bf16 "
                        "runs ~5x slower than fp32 and its ratio says nothing about bf16 where it pays)")
    p.add_argument("--small-docs", type=int, default=2000, help="documents of the small corpus for the RSS check")
    p.add_argument("--repeats", type=int, default=2, help="ceiling and pipeline runs, interleaved; best of each")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    else:
        import torch

        from retro_dask.text.embedder import native_half_precision

        dtypes = ["fp32"] + (["bf16"] if native_half_precision(torch.bfloat16) else [])
        if len(dtypes) == 1:
            print(f"bf16 skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 kernels "
                  "(--dtypes fp32,bf16 runs it anyway)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="retro-embed-bench-"))
    try:
        full = sample_corpus(tmp)
        small = sample_corpus(tmp, args.small_docs)
        build(tmp / "db", full, "fp32", "db-build")
        ids = chunk_ids(tmp / "db")
        rows = []
        for dtype in dtypes:
            ceilings, runs = [], []
            for rep in range(args.repeats):
                ceilings.append(model_ceiling(dtype, ids))
                w = tmp / f"w-{dtype}-{rep}"
                build(w, full, dtype, "db-build")
                runs.append(build(w, full, dtype, "embed")["embed"])
                runs[-1]["peak_halfway_and_end"] = peak_halfway_and_end(w)
                shutil.rmtree(w, ignore_errors=True)
            ceiling = max(ceilings, key=lambda c: c["chunks_per_s"])
            stats = min(runs, key=lambda r: r["seconds"])
            ws = tmp / f"s-{dtype}"
            small_stats = build(ws, small, dtype, "db-build,embed")["embed"]
            rss_small = max(small_stats["worker_peak_rss_mb"].values())
            rss_full = max(stats["worker_peak_rss_mb"].values())
            rate = stats["n_chunks"] / stats["seconds"]
            workers = max(len(stats["worker_peak_rss_mb"]), 1)
            model_rate = stats["n_chunks"] / (stats["model_seconds_total"] / workers)
            rows.append([dtype, stats["n_chunks"], f"{ceiling['chunks_per_s']:.1f}", f"{rate:.1f}",
                         f"{rate / ceiling['chunks_per_s']:.3f}", f"{model_rate / ceiling['chunks_per_s']:.3f}",
                         f"{ceiling['padding_share']:.3f}",
                         f"{stats['padding_share']:.3f}", f"{rss_small:.0f} ({small_stats['n_chunks']})",
                         f"{rss_full:.0f} ({stats['n_chunks']})", stats["peak_halfway_and_end"]])
            print(json.dumps({"dtype": dtype, "ceiling": ceiling, "stage": stats}, indent=1))
        out = table(rows, ["dtype", "chunks", "ceiling chunks/s", "pipeline chunks/s", "pipeline/ceiling",
                           "forward passes alone/ceiling", "padding (ceiling)", "padding (pipeline)", "worker peak MB (small corpus)",
                           "worker peak MB (full)", "each worker's peak MB: half-way -> end (full)"])
        print(f"\nembed stage vs model ceiling on {machine()}\n")
        print(out)
        if args.record:
            record_results("embed: stage vs model ceiling", out, "python benchmarks/embed.py --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
