#!/usr/bin/env python
"""Benchmark: tokens/s of ``retro_dask.preprocess`` on Dask against a single-process loop.

Inputs: the packaged sample corpus (10,033 documents, ~1.04M tokens) written as
a jsonl file, and the same corpus repeated ``--repeat`` times (default 8) in one
jsonl file, since the sample alone is under a second of work.

Contenders, all producing the same ``PREFIX.bin/.idx`` (checked byte for byte):

- ``dask``: :func:`retro_dask.preprocess.preprocess` on the default embedded
  LocalCluster (one single-thread worker process per core). The cluster is
  started once, and the workers' tokenizers loaded, before any timing; both
  are reported separately. The timed call is the whole ``preprocess`` call
  (planning, tasks, concatenation, validation).
- ``loop (jsonl)``: one process, one thread, Megatron's way: read the same jsonl
  line by line, ``json.loads``, ``encode``, append EOD, ``add_document`` on an
  ``IndexedDatasetWriter``.
- ``loop (texts)``: the same loop over texts already in memory (no jsonl
  parsing): encode + EOD + ``IndexedDatasetWriter`` only.

Each timing is the best of ``--runs`` (default 3), contenders interleaved so
that load from other processes on the machine hits them alike. Wall time is
what counts, but on a shared machine it depends on what else runs, so the CPU
seconds of each contender (for dask: the workers plus the driver process,
which also hosts the scheduler) are printed too: the tokens per CPU-second do
not depend on the load, and 2 x their ratio is what 2 idle cores would give.
The load average is printed before and after.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/preprocess.py``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def loop_jsonl(path: str, prefix: str, gpt) -> int:
    """Single-process, single-thread reference: jsonl -> indexed dataset; returns tokens."""
    from retro_dask.formats.indexed_writer import IndexedDatasetWriter
    from retro_dask.formats.indexed_dataset import best_token_dtype

    n = 0
    with open(path, "rb") as f, IndexedDatasetWriter(prefix, best_token_dtype(gpt.vocab_size)) as writer:
        for line in f:
            if not line.strip():
                continue
            ids = gpt.encode(json.loads(line)["text"])
            ids.append(gpt.eod)
            writer.add_document(ids)
            n += len(ids)
    return n


def loop_texts(texts: list[str], prefix: str, gpt) -> int:
    """The same loop over texts in memory: encode + EOD + IndexedDatasetWriter only."""
    from retro_dask.formats.indexed_writer import IndexedDatasetWriter
    from retro_dask.formats.indexed_dataset import best_token_dtype

    n = 0
    with IndexedDatasetWriter(prefix, best_token_dtype(gpt.vocab_size)) as writer:
        for text in texts:
            ids = gpt.encode(text)
            ids.append(gpt.eod)
            writer.add_document(ids)
            n += len(ids)
    return n


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (run on each worker too)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cluster_cpu_seconds(client) -> float:
    return sum(client.run(cpu_seconds).values()) + cpu_seconds()


def same_output(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=8, help="copies of the sample corpus in the large input (default 8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per contender; the best is reported (default 3)")
    p.add_argument("--n-workers", type=int, default=None, help="LocalCluster workers (default: one per core)")
    p.add_argument("--range-mb", type=float, default=None,
                   help="input MiB per task (default: preprocess's choice, about 4 tasks per worker)")
    p.add_argument("--workdir", default=None, help="where to write the inputs and outputs (default: a temp dir)")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from retro_dask.engine.cluster import open_client
    from retro_dask.config import RunOptions
    from retro_dask.stages.preprocess import preprocess
    from retro_dask.formats.sample_corpus import iter_sample_documents
    from retro_dask.text.gpt import get_gpt_tokenizer

    gpt = get_gpt_tokenizer()
    texts = list(iter_sample_documents())
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-", dir=args.workdir))
    try:
        block = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)
        inputs = {"sample": (tmp / "sample.jsonl", 1), f"sample x{args.repeat}": (tmp / "repeated.jsonl", args.repeat)}
        for path, copies in inputs.values():
            with open(path, "wb") as f:
                for _ in range(copies):
                    f.write(block)
        del block
        range_bytes = None if args.range_mb is None else int(args.range_mb * (1 << 20))

        t = time.perf_counter()
        options = RunOptions(n_workers=args.n_workers, dashboard_address="127.0.0.1:0", progress=False)
        with open_client(options, str(tmp), log=lambda m: None) as client:
            t_start = time.perf_counter() - t
            t = time.perf_counter()
            client.run(get_gpt_tokenizer)  # each worker builds its tokenizer once; later calls reuse it
            t_warm = time.perf_counter() - t
            n_workers = len(client.nthreads())
            threads = sum(client.nthreads().values())
            print(f"cpu cores: {os.cpu_count()}; LocalCluster: {n_workers} workers x "
                  f"{threads // max(n_workers, 1)} thread; start {t_start:.2f} s, worker tokenizer load "
                  f"{t_warm:.2f} s (both outside the timings below)")
            print(f"tokenizer backend: {gpt.backend}; runs per contender: {args.runs} (best wall reported); "
                  f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

            rows = []
            for name, (path, copies) in inputs.items():
                size_mb = path.stat().st_size / 2**20
                # contender -> [(wall s, cpu s)] per run
                times: dict[str, list[tuple[float, float]]] = {"dask": [], "loop (jsonl)": [], "loop (texts)": []}
                tokens = {}
                tasks = 0
                all_texts = texts * copies
                for run in range(args.runs):
                    c = cluster_cpu_seconds(client)
                    t = time.perf_counter()
                    r = preprocess(str(tmp / "out" / "dask"), [str(path)], client=client, range_bytes=range_bytes,
                                   progress=False, log=lambda m: None)
                    times["dask"].append((time.perf_counter() - t, cluster_cpu_seconds(client) - c))
                    tokens["dask"], tasks = r["n_tokens"], r["tasks"]
                    c = cpu_seconds()
                    t = time.perf_counter()
                    tokens["loop (jsonl)"] = loop_jsonl(str(path), str(tmp / "out" / "loop_jsonl"), gpt)
                    times["loop (jsonl)"].append((time.perf_counter() - t, cpu_seconds() - c))
                    c = cpu_seconds()
                    t = time.perf_counter()
                    tokens["loop (texts)"] = loop_texts(all_texts, str(tmp / "out" / "loop_texts"), gpt)
                    times["loop (texts)"].append((time.perf_counter() - t, cpu_seconds() - c))
                if not (same_output(str(tmp / "out" / "dask"), str(tmp / "out" / "loop_jsonl"))
                        and same_output(str(tmp / "out" / "dask"), str(tmp / "out" / "loop_texts"))):
                    print(f"ERROR: outputs differ on {name}", file=sys.stderr)
                    return 1
                best = {k: min(v) for k, v in times.items()}  # the run with the least wall time
                rows.append((name, size_mb, tokens["dask"], tasks, best))

            header = (f"{'input':<11} {'tokens':>10} {'tasks':>5} | {'contender':<12} {'wall s':>6} {'tokens/s':>10} "
                      f"{'ratio':>6} | {'CPU s':>6} {'tok/CPU-s':>10} {'ratio':>6}")
            lines = [header, "-" * len(header)]
            for name, size_mb, n_tokens, tasks, best in rows:
                for k, contender in enumerate(best):
                    wall, cpu = best[contender]
                    ref_wall, ref_cpu = best["loop (jsonl)"]
                    lead = f"{name:<11} {n_tokens:>10,} {tasks:>5}" if k == 0 else " " * 28
                    lines.append(f"{lead} | {contender:<12} {wall:>6.2f} {n_tokens / wall:>10,.0f} "
                                 f"{ref_wall / wall:>5.2f}x | {cpu:>6.2f} {n_tokens / cpu:>10,.0f} {ref_cpu / cpu:>5.2f}x")
            print("\n".join(lines))
            if args.record:
                from common import record_results

                record_results("preprocess: Dask against a single-thread loop", "```\n" + "\n".join(lines) + "\n```",
                               "python benchmarks/preprocess.py --record")
            print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print("ratio = the loop over the same jsonl (time or CPU) / the contender's; the outputs are identical "
                  "bytes.\ngoal: dask wall ratio >= 1.6x on 2 cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
