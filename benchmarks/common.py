"""Shared helpers of the benchmark scripts: corpora, the model ceiling, machine facts, tables."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_vector_units() -> str:
    """What the embed backends' speed depends on: " (AVX-512 with VNNI and BF16)", " (AVX2)", or ""."""
    from retro_dask.formats.faiss_index import cpu_flags

    flags = cpu_flags()
    extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
              if flag in flags]
    if "avx512f" in flags:
        return " (AVX-512" + (" with " + " and ".join(extras) if extras else "") + ")"
    return " (AVX2)" if "avx2" in flags else ""


def machine() -> str:
    """The machine kind a RESULTS.md section is for (sections of the same kind are replaced) and the Python."""
    from retro_dask.text.backends import cpu_name

    return f"{cpu_name()}{cpu_vector_units()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (VmHWM: ru_maxrss would include the process that started it)."""
    from retro_dask.engine.process_env import peak_rss_mb as own_peak

    return own_peak()


def sample_corpus(folder: Path, n_docs: int | None = None) -> str:
    """The packaged sample corpus (or its first ``n_docs``) as an indexed dataset."""
    from retro_dask.formats.indexed_writer import write_indexed_dataset
    from retro_dask.formats.sample_corpus import iter_sample_documents
    from retro_dask.text.gpt import get_gpt_tokenizer

    gpt = get_gpt_tokenizer()
    texts = list(iter_sample_documents())[:n_docs]
    prefix = folder / (f"wiki{n_docs}" if n_docs else "wiki")
    if not Path(f"{prefix}.idx").exists():
        docs = [np.asarray(ids + [gpt.eod], np.uint16) for ids in gpt.encode_batch(texts)]
        write_indexed_dataset(str(prefix), docs, np.uint16)
    return str(prefix)


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c)
                                           for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def record_results(title: str, body: str, command: str) -> None:
    """Write a dated section into benchmarks/RESULTS.md, replacing the one of the same title measured on the
    same kind of machine (RESULTS.md holds the current table of each benchmark per machine kind)."""
    import re

    path = ROOT / "benchmarks" / "RESULTS.md"
    today = datetime.date.today().isoformat()
    section = f"## {title} ({today})\n\nMachine: {machine()}. Command: `{command}`\n\n{body.rstrip()}\n\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    kind = machine().split(", Python")[0]
    pattern = re.compile(rf"^## {re.escape(title)} \(\d{{4}}-\d\d-\d\d\)\n\nMachine: {re.escape(kind)}, Python.*?(?=^## |\Z)",
                         re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


# ---------------------------------------------------------------- the model ceiling


def _ceiling_worker(dtype: str, ids: list[list[int]], barrier, out, backend: str = "torch") -> None:
    from retro_dask.config import EmbedConfig
    from retro_dask.text.embedder import Embedder

    # The model the workers run, at its best: the same forward pass (retro_dask.bert_encoder, or the exported
    # graph of --embed-backend), allocator settings, kernel caches and length batching as the embed stage's
    # Embedder, one thread.
    embedder = Embedder(EmbedConfig(embed_dtype=dtype, backend=backend), "cpu", threads=1)
    lengths = np.array([len(x) for x in ids])
    batches = [embedder.padded_batch(ids, sel) for sel in embedder.batches(lengths)]
    barrier.wait()
    t0 = time.perf_counter()
    for x, m in batches:
        embedder.forward(x, m)
    out.put((time.perf_counter() - t0, sum(x.size for x, _ in batches)))


def model_ceiling(dtype: str, ids: list[list[int]], processes: int | None = None,
                  backend: str = "torch") -> dict[str, float]:
    """The model's own forward throughput: pre-tokenized, length-sorted chunks, one single-thread process per core.

    Chunks are sorted by length over the whole set and dealt to the processes
    in turn, so each gets the same mix; each cuts its share into batches as the
    embed stage cuts a block (``Embedder.batches``), so the ceiling sorts by
    length over everything where the stage sorts a block at a time. The wall
    time is the slowest process's.
    """
    processes = processes or os.cpu_count() or 1
    if backend != "torch":  # export (and quantize) once here, not in every process at once
        from retro_dask.text.backends import prepare_graph
        from retro_dask.text.embedder import bert_dir

        prepare_graph(backend, bert_dir(None), dtype)
    order = np.argsort([len(x) for x in ids], kind="stable")
    shares = [[ids[i] for i in order[p::processes]] for p in range(processes)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(dtype, s, barrier, out, backend)) for s in shares]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    seconds = [r[0] for r in results]
    tokens = sum(len(x) for x in ids)
    padded = sum(r[1] for r in results)
    return {"seconds": max(seconds), "chunks_per_s": len(ids) / max(seconds), "padding_share": 1 - tokens / padded}
