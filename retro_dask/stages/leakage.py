"""leakage: how much of each evaluation chunk its saved neighbours already contain.

RETRO's paper judges retrieval only together with this: for every chunk of the
valid and test pretraining samples, the share of its GPT-2 13-grams found in
its saved neighbours (each neighbour's chunk and its continuation; the chunk's
leakage is its largest share over its neighbours, ``plan/ngrams.py``). A lazy
array maps the blocks of ``neighbors.zarr`` with the samples' chunks to a
histogram each, on the workers; the driver adds them up. Writes
``W/stats/leakage.json`` (per split: histogram, mean, share of chunks above
0.2, 0.5 and 0.8) and ``W/stats/leakage.png``. ``RetroDataset(...,
max_overlap=x)`` masks the neighbours above ``x``, as the paper's filtered
evaluation does.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import BuildConfig
from ..engine.executor import Executor
from ..formats import zarr_blocks
from ..formats.chunk_tokens import neighbor_tokens
from ..formats.sample_maps import prepare_samples
from ..formats.workdir import atomic_path, chunks_path, neighbors_path, stats_dir
from ..plan.ngrams import NGRAM, overlap_shares
from ..text.gpt import get_gpt_tokenizer
from .query import query_complete, query_rows_per_block, sample_chunk_tokens

SPLITS = ("valid", "test")
EDGES = np.linspace(0.0, 1.0, 21)  # histogram bins of 0.05
THRESHOLDS = (0.2, 0.5, 0.8)
RETRIEVED = 2  # a neighbour and its continuation, as RETRO retrieves them


def _summary(tokens: np.ndarray, neighbors: np.ndarray, workdir: str, prefixes: tuple[str, ...], pad: int) -> np.ndarray:
    """One block's leakage: ``[1, bins + 2 + thresholds]``: histogram counts, sum, count, counts above thresholds."""
    table = zarr_blocks.open_read(chunks_path(workdir))
    _, ntok = neighbor_tokens(neighbors, lambda ids: table.get_orthogonal_selection((ids, slice(None))),
                              table.shape[0], RETRIEVED, prefixes, tokens.shape[1], pad)
    leak = overlap_shares(tokens, ntok, pad).max(axis=1) if len(tokens) else np.zeros(0, np.float32)
    hist = np.histogram(np.clip(leak, 0, 1), EDGES)[0]
    above = [(leak > t).sum() for t in THRESHOLDS]
    return np.concatenate([hist, [leak.sum(), len(leak)], above]).astype(np.float64)[None, :]


def leakage_of(workdir: str, config: BuildConfig, split: str, samples_hash: str, lo: int, hi: int):
    """The leakage summary of rows ``lo:hi`` of a split's neighbours, as a lazy array (one task)."""
    import dask.array as da
    from dask.base import tokenize

    pad = get_gpt_tokenizer(config.chunk.gpt_spec()).eod
    tokens = sample_chunk_tokens(workdir, split, samples_hash, lo, hi)
    nb = zarr_blocks.lazy_rows(neighbors_path(workdir, split), lo, hi, (hi - lo,), name=f"read-neighbors-{split}")
    width = len(EDGES) - 1 + 2 + len(THRESHOLDS)
    return da.map_blocks(_summary, tokens, nb, workdir, tuple(config.chunk.data.prefixes), pad, chunks=((1,), (width,)),
                         dtype=np.float64, name=f"leakage-{split}-{tokenize(workdir, samples_hash, lo, hi)}",
                         meta=np.empty((0, 0), np.float64))


def split_leakage(ex: Executor, config: BuildConfig, split: str) -> dict[str, Any] | None:
    w = ex.workdir
    if not query_complete(w, split):
        return None
    n_rows = zarr_blocks.open_format(neighbors_path(w, split)).shape[0]
    if n_rows == 0:
        return None
    samples_hash = prepare_samples(w, config, split).to_dict()["hash"]
    step = 4 * query_rows_per_block(config)  # whole samples; a task reads a few blocks
    total = sum(ex.gather((leakage_of(w, config, split, samples_hash, lo, min(lo + step, n_rows))
                           for lo in range(0, n_rows, step)), desc=f"leakage: {split}", total=-(-n_rows // step)))
    total = np.asarray(total).ravel()
    bins = len(EDGES) - 1
    hist, (sum_, count), above = total[:bins], total[bins : bins + 2], total[bins + 2 :]
    return {"n_chunks": int(count), "mean": round(float(sum_ / max(count, 1)), 4),
            "histogram": {"edges": [round(e, 2) for e in EDGES.tolist()], "counts": [int(c) for c in hist]},
            **{f"share_above_{t}": round(float(a / max(count, 1)), 4) for t, a in zip(THRESHOLDS, above)}}


def run_leakage(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    per_split = {s: r for s in SPLITS if (r := split_leakage(ex, config, s)) is not None}
    for split, r in per_split.items():
        log(f"[leakage] {split}: {r['n_chunks']:,} chunks, mean {NGRAM}-gram overlap with their neighbours "
            f"{r['mean']:.3f}; above 0.2: {r['share_above_0.2']:.3f}, above 0.5: {r['share_above_0.5']:.3f}, "
            f"above 0.8: {r['share_above_0.8']:.3f}")
    if not per_split:
        log("[leakage] no valid or test neighbours to measure: skipped")
    else:
        plot_leakage(per_split, stats_dir(ex.workdir) / "leakage.png")
    return ex.write_stats("leakage", None, time.perf_counter() - t0, ngram=NGRAM, retrieved_chunks=RETRIEVED,
                          splits=per_split)


def plot_leakage(per_split: dict[str, dict[str, Any]], path) -> None:
    """Histogram of the chunks' leakage per split (share of chunks), the thresholds marked."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and a quicker import

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    width = EDGES[1] - EDGES[0]
    for i, (split, r) in enumerate(per_split.items()):
        counts = np.asarray(r["histogram"]["counts"], float)
        ax.bar(EDGES[:-1] + width * (0.1 + 0.4 * i), counts / max(counts.sum(), 1), width=0.4 * width, align="edge",
               label=f"{split} ({r['n_chunks']:,} chunks, mean {r['mean']:.3f})")
    for t in THRESHOLDS:
        ax.axvline(t, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"share of the chunk's {NGRAM}-grams in its neighbours (chunk + continuation)")
    ax.set_ylabel("share of evaluation chunks")
    ax.set_title("Evaluation leakage (RETRO's filtered evaluation masks above a threshold)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
