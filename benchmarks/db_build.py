#!/usr/bin/env python
"""Benchmark: db-build throughput and memory, from the sample corpus to 200M+ tokens.

Corpora: the packaged sample corpus (~1M tokens), and synthetic corpora of
``--tokens`` (default 200M) and a tenth of it, generated blockwise from the
sample corpus's documents (random documents, so the text is real English and
BERT tokenizes it as it would a real corpus).

For each corpus, db-build on the default embedded LocalCluster prints chunks/s
of the BERT-length pass and of the whole stage, and the peak RSS of the driver
and of each worker, which must stay flat while the corpus grows 10x. Right
before and right after the pipeline, a single-process, single-thread loop does
the same detokenize + BERT-length work on every corpus, twice: with the exact
WordPiece counter the workers use (retro_dask/wordpiece_count.py), and
(except on the large corpus, where it would take ~15 minutes) encoding every
chunk with tokenizers, the straightforward way; pipeline / loop is the speedup
(goal: at least 1.7x on 2 cores). The counter loop run once per core, all at the same
time, gives the machine's own ceiling for this work (cores share caches,
memory bandwidth and turbo budget).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/db_build.py [--tokens 200e6]``
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

from common import ROOT, machine, record_results, sample_corpus, table


def synthetic_corpus(folder: Path, base_prefix: str, n_tokens: float, seed: int = 0) -> str:
    """Random sample documents, concatenated 1-8 at a time into documents, written block by block."""
    from retro_dask.formats.indexed_dataset import IndexedDataset
    from retro_dask.formats.indexed_writer import IndexedDatasetWriter

    base = IndexedDataset(base_prefix)
    rng = np.random.default_rng(seed)
    prefix = folder / f"synthetic{int(n_tokens / 1e6)}M"
    written = 0
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        while written < n_tokens:
            picks = rng.integers(0, len(base), size=(4096, 8))
            parts = rng.integers(1, 9, size=4096)
            for row, k in zip(picks, parts):
                doc = np.concatenate([np.asarray(base[int(i)])[:-1] for i in row[:k]] + [np.array([50256])])
                writer.add_document(doc.astype(np.uint16))
                written += len(doc)
    return str(prefix)


def loop_baseline(prefix: str, lengths: str = "counter") -> dict:
    """One process, one thread: cut chunks, detokenize, BERT lengths (what db-build's workers do).

    ``lengths="counter"``: this package's exact WordPiece counter, as in the workers;
    ``"tokenizers"``: the tokenizers library encoding every chunk (the straightforward way,
    and what the workers did before the counter).
    """
    from retro_dask.formats.indexed_dataset import IndexedDataset
    from retro_dask.plan.chunks import split_document_ranges
    from retro_dask.text.bert import get_bert_tokenizer
    from retro_dask.text.gpt import get_gpt_tokenizer

    gpt, bert = get_gpt_tokenizer(), get_bert_tokenizer()
    measure = bert.lengths if lengths == "counter" else bert._encoded_lengths
    ds = IndexedDataset(prefix)
    a, b = split_document_ranges(len(ds), (0.98, 0.02, 0.0))[0]
    t0 = time.perf_counter()
    n = valid = 0
    texts = []
    for doc in range(a, b):
        tokens = ds[doc]
        end = len(tokens) - 1 if len(tokens) and tokens[-1] == gpt.eod else len(tokens)
        for s in range(0, end, 64):
            texts.append(gpt.decode(tokens[s : min(s + 64, end)]))
        if len(texts) >= 1024:
            valid += int((measure(texts) > 0).sum())
            n += len(texts)
            texts = []
    valid += int((measure(texts) > 0).sum()) if texts else 0
    n += len(texts)
    seconds = time.perf_counter() - t0
    return {"chunks": n, "valid": valid, "seconds": seconds, "chunks_per_s": n / seconds}


def loops_per_core(prefix: str) -> dict:
    """The machine's ceiling for this work: one independent loop per core, all at once, each on the whole corpus.

    Their summed rate is what perfect parallelism over the cores would give here.
    """
    n = os.cpu_count() or 1
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from db_build import loop_baseline; "
            "print(json.dumps(loop_baseline(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), prefix],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"processes": n, "chunks_per_s": sum(r["chunks_per_s"] for r in runs)}


def pipeline(workdir: Path, prefix: str) -> dict:
    """db-build in a fresh process (so its peak RSS is its own), on the default embedded cluster."""
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--workdir", str(workdir), "--tasks", "db-build",
           "--data-path", "1", prefix, "--no-progress", "--dashboard-address", "127.0.0.1:0",
           "--train-samples", "0", "--valid-samples", "0", "--test-samples", "0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stats = json.loads((workdir / "stats" / "db-build.json").read_text())
    stats["wall_with_cluster_start"] = wall
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tokens", type=float, default=200e6)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="retro-db-bench-"))
    try:
        sample = sample_corpus(tmp)
        t0 = time.perf_counter()
        small = synthetic_corpus(tmp, sample, args.tokens / 10, seed=1)
        large = synthetic_corpus(tmp, sample, args.tokens, seed=2)
        print(f"generated synthetic corpora in {time.perf_counter() - t0:.0f} s")
        rows = []
        for name, prefix in (("sample", sample), ("small", small), ("large", large)):
            from retro_dask.formats.indexed_dataset import IndexedDataset

            n_tokens = IndexedDataset(prefix).n_tokens
            # The loops run right before and after the pipeline (this machine's speed drifts within minutes);
            # their rates are the means of the two runs.
            def loops() -> dict:
                # The tokenizers loop would take ~15 minutes on the large corpus: the counter loops only there.
                out = {"counter": loop_baseline(prefix), "per core": loops_per_core(prefix)}
                if name != "large":
                    out["tokenizers"] = loop_baseline(prefix, "tokenizers")
                return out

            runs = [loops()]
            stats = pipeline(tmp / f"w-{name}", prefix)
            runs.append(loops())
            loop_rate = {k: np.mean([run[k]["chunks_per_s"] for run in runs]) for k in runs[0]}
            workers = stats["worker_peak_rss_mb"]
            rate = stats["n_candidates"] / stats["seconds"]
            ratio = lambda k: f"{rate / loop_rate[k]:.2f}" if k in loop_rate else "-"  # noqa: E731
            rows.append([name, f"{n_tokens / 1e6:.1f}M", stats["n_candidates"], f"{stats['seconds']:.1f}",
                         f"{stats['chunks_per_s']:,.0f}", f"{rate:,.0f}",
                         f"{loop_rate['tokenizers']:,.0f}" if "tokenizers" in loop_rate else "-", ratio("tokenizers"),
                         f"{loop_rate['counter']:,.0f}", ratio("counter"), ratio("per core"),
                         f"{stats['driver_peak_rss_mb']:.0f}", " / ".join(f"{v:.0f}" for v in workers.values()),
                         " / ".join(f"{v:.0f}" for v in stats["worker_rss_anon_mb"].values()),
                         " / ".join(f"{v:.0f}" for v in stats["worker_rss_file_mb"].values())])
            print(json.dumps({"corpus": name, "stats": stats, "loops": runs}, indent=1))
            shutil.rmtree(tmp / f"w-{name}", ignore_errors=True)
        notes = ("\n\n- length pass: the candidate blocks (read, detokenize, BERT lengths, write); pipeline: "
                 "the whole stage (plus compaction into chunks.zarr, the document index and sampled.zarr)"
                 "\n- loops: one process, one thread, cutting the chunks, detokenizing each and taking BERT lengths "
                 "by encoding each chunk with tokenizers (the straightforward way) or with this package's exact "
                 "WordPiece counter (what the workers run; the only loop run on the large corpus); each loop ran "
                 "right before and right after the pipeline, and its rate is the mean of the two"
                 "\n- pipeline/(loop per core): against the counter loop run once per core at the same time, each on "
                 "the whole corpus (their summed rate is the machine's ceiling for this work)"
                 "\n- worker memory: peak RSS over the blocks, and at the end of a block its anonymous part (the "
                 "worker's own memory) and its file-backed part (mapped corpus and library pages)")
        out = table(rows, ["corpus", "tokens", "chunks", "db-build s", "length pass chunks/s", "pipeline chunks/s",
                           "loop (tokenizers) chunks/s", "pipeline/loop (tokenizers)", "loop (counter) chunks/s",
                           "pipeline/loop (counter)", "pipeline/(loop per core)", "driver peak MB", "worker peak MB", "worker anonymous MB",
                           "worker file-backed MB"]) + notes
        print(f"\ndb-build on {machine()}\n")
        print(out)
        if args.record:
            record_results("db-build: throughput and memory", out, "python benchmarks/db_build.py --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
