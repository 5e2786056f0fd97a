"""tune: the smallest nprobe (and efSearch) whose recall@10 reaches --target-recall, measured on query chunks.

Draws a seeded sample of --tune-queries chunks of the train and valid
pretraining samples and embeds them once, into ``W/query/tune/`` (query-neighbors
reuses these embeddings rather than computing them again). Their exact
neighbours come from Faiss's ``knn_ground_truth`` over ``db/embeddings.zarr``,
a block at a time, with the same same-document filter as the saved neighbours;
then the index is searched over a grid of nprobe (and of efSearch where the
coarse quantizer is HNSW), each point timed, in increasing nprobe up to two
levels past the first that reaches the target (the larger ones cost the most
and only confirm the plateau). The smallest nprobe that reaches
the target (with HNSW, the fastest point that does) is recorded in the ledger
and in ``config.json`` (``tuned``); ``W/stats/tune.json`` and ``tune.png`` show
recall@10 and query chunks/s against nprobe, the choice marked.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig
from ..engine.executor import Executor
from ..engine.process_env import block_task_threads
from ..errors import InputError
from ..formats.faiss_index import faiss
from ..formats.ledger import Ledger, file_sizes
from ..formats.sample_maps import prepare_samples
from ..formats.workdir import atomic_path, atomic_write_bytes, config_path, embeddings_path, read_json, stats_dir, tune_dir
from ..plan.chunks import doc_key, lookup_documents
from .index import index_complete, trained
from .query import TUNE_SPLITS, document_lookup, filter_neighbors, open_samples, searcher
from .recall import RECALL_AT, _embed_tokens, exact_knn, recall_at

EMBED_BATCH = 1024  # at most this many query chunks a task (the default 2,000: two tasks, one per core)
EF_GRID = (16, 32, 64, 128, 256)
LEVELS_PAST_TARGET = 2  # nprobe levels measured past the first that reaches the target (the plot's flat end)


def pick_queries(sizes: dict[str, int], n: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of ``n`` query chunks over the splits' rows: int64 ``[n, 2]`` (split index in
    ``TUNE_SPLITS``, row), sorted."""
    total = sum(sizes.get(s, 0) for s in TUNE_SPLITS)
    picks = np.sort(np.random.default_rng([seed, 24]).choice(total, size=min(n, total), replace=False))
    offsets = np.cumsum([0] + [sizes.get(s, 0) for s in TUNE_SPLITS])
    split = np.searchsorted(offsets, picks, side="right") - 1
    return np.stack([split, picks - offsets[split]], axis=1).astype(np.int64)


def _chunk_tokens(workdir: str, hashes: dict[str, str], picks: np.ndarray) -> list[np.ndarray]:
    out = []
    for split_idx, row in picks.tolist():
        samples = open_samples(workdir, TUNE_SPLITS[split_idx], hashes[TUNE_SPLITS[split_idx]])
        s, c = divmod(row, samples.chunks_per_sample)
        out.append(samples.tokens(s)[c * samples.chunk_length : (c + 1) * samples.chunk_length])
    return out


def _embed_picks(workdir: str, config: BuildConfig, hashes: dict[str, str], picks: np.ndarray) -> np.ndarray:
    return _embed_tokens(config.embed, config.chunk.gpt_spec(), _chunk_tokens(workdir, hashes, picks))


def _own_documents(workdir: str, hashes: dict[str, str], picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, document key) pairs of every document each picked chunk's sample spans."""
    pair_q, pair_key = [], []
    for local, (split_idx, row) in enumerate(picks.tolist()):
        samples = open_samples(workdir, TUNE_SPLITS[split_idx], hashes[TUNE_SPLITS[split_idx]])
        k, docs = samples.documents(row // samples.chunks_per_sample)
        keys = np.unique(doc_key(k, docs))
        pair_q.append(np.full(len(keys), local))
        pair_key.append(keys)
    return np.concatenate(pair_q), np.concatenate(pair_key)


def grid_points(nlist: int, hnsw: bool) -> list[tuple[int, int | None]]:
    """(nprobe, efSearch) pairs: powers of two up to nlist; with an HNSW quantizer, every efSearch of
    ``EF_GRID`` not below nprobe (the quantizer must return nprobe lists)."""
    probes = [1 << i for i in range(max(nlist, 1).bit_length()) if (1 << i) <= max(nlist, 1)]
    if nlist and probes[-1] != nlist:
        probes.append(nlist)
    if not hnsw:
        return [(p, None) for p in probes]
    return [(p, ef) for p in probes for ef in EF_GRID if ef >= p] + [(p, p) for p in probes if p > EF_GRID[-1]]


def _measure(workdir: str, tag: str, x: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], k_query: int,
             cosine: bool, grid: list[tuple[int, int | None]], default_ef: int, target: float) -> dict[str, Any]:
    """In a worker: the exact filtered neighbours, then recall@10 and search speed over the grid, in increasing
    nprobe, until ``LEVELS_PAST_TARGET`` levels past the first that reaches ``target``."""
    t0 = time.perf_counter()
    first_row, keys = document_lookup(workdir)
    local = np.arange(len(x))

    def kept(found: np.ndarray) -> np.ndarray:
        return filter_neighbors(found, lookup_documents(first_row, keys, found), local, *pairs, RECALL_AT)

    _, truth = exact_knn(str(embeddings_path(workdir)), x, k_query, cosine)
    truth = kept(truth)
    t_exact = time.perf_counter() - t0
    faiss().omp_set_num_threads(block_task_threads())
    levels = sorted({nprobe for nprobe, _ in grid})
    points, last_level = [], None  # last_level: the largest nprobe to measure, once the target is reached
    for nprobe, ef in grid:
        if last_level is not None and nprobe > last_level:
            break
        index = searcher(workdir, tag, nprobe, ef or default_ef, k_query)
        t = time.perf_counter()
        _, found = index.search(np.ascontiguousarray(x, np.float32), min(k_query, max(int(index.ntotal), 1)))
        seconds = time.perf_counter() - t
        points.append({"nprobe": nprobe, "ef_search": ef, "recall_at_10": round(recall_at(kept(found), truth), 4),
                       "search_chunks_per_s": round(len(x) / max(seconds, 1e-9), 1)})
        if last_level is None and points[-1]["recall_at_10"] >= target:
            last_level = levels[min(levels.index(nprobe) + LEVELS_PAST_TARGET, len(levels) - 1)]
    return {"points": points, "exact_seconds": round(t_exact, 3)}


def choose(points: list[dict[str, Any]], target: float) -> tuple[dict[str, Any], bool]:
    """The point to use and whether it reaches ``target``: the fastest of those that do (with one efSearch per
    nprobe, the smallest nprobe), else the one of best recall."""
    good = [p for p in points if p["recall_at_10"] >= target]
    if good:
        return min(good, key=lambda p: (p["nprobe"], -p["search_chunks_per_s"]) if p["ef_search"] is None
                   else (-p["search_chunks_per_s"], p["nprobe"])), True
    return max(points, key=lambda p: (p["recall_at_10"], p["search_chunks_per_s"])), False


def tuned(workdir: str) -> dict[str, Any] | None:
    """The tune's record (nprobe, ef_search, recall, index and samples it measured), if any."""
    return Ledger(workdir, "tune").record(0)


def tune_fingerprint(workdir: str, config: BuildConfig, hashes: dict[str, str]) -> str:
    """What a tune measured: the index, the query chunks, the target. Another one is stale."""
    parts = [trained(workdir)["sha256"], hashes, config.query.tune_queries, config.chunk.seed,
             config.query.target_recall, config.query.num_neighbors_query, config.query.ef_search,
             config.embed.__dict__]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tune_is_current(workdir: str, config: BuildConfig) -> bool:
    rec = tuned(workdir)
    if not rec or not index_complete(workdir):
        return False
    hashes = {s: prepare_samples(workdir, config, s).to_dict()["hash"] for s in TUNE_SPLITS}
    return rec.get("fingerprint") == tune_fingerprint(workdir, config, hashes) and bool(
        Ledger(workdir, "tune").done_blocks(1))


def run_tune(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    """Measure recall@10 and speed over the grid; record the choice (see the module doc)."""
    import dask
    import dask.base

    w = ex.workdir
    t0 = time.perf_counter()
    if not index_complete(w):
        raise InputError(f"{w} has no finished index: run --tasks index-add (or index-build) before tune")
    info = trained(w)
    plans = {s: prepare_samples(w, config, s) for s in TUNE_SPLITS}
    hashes = {s: p.to_dict()["hash"] for s, p in plans.items()}
    sizes = {s: p.n_samples * p.chunks_per_sample for s, p in plans.items()}
    picks = pick_queries(sizes, config.query.tune_queries, config.chunk.seed)
    if not len(picks):
        raise InputError("tune: the train and valid splits have no sample to measure recall on; give them samples "
                         "(--train-samples, --valid-samples) or set --query-nprobe to a number")
    # Near-equal tasks of EMBED_BATCH at most, a function of the picks alone: a chunk's embedding depends on
    # the batch it is sorted into, so the cluster's shape must not change the tasks (the same bytes).
    batches = np.array_split(picks, max(1, -(-len(picks) // EMBED_BATCH)))
    token = dask.base.tokenize(w, hashes, picks, config.embed)
    x = np.concatenate(list(ex.gather((dask.delayed(_embed_picks, pure=False)(
        w, config, hashes, b, dask_key_name=f"tune-embed-{token}-{i}") for i, b in enumerate(batches)),
        desc="tune: embed queries", total=len(batches))))
    t_embed = time.perf_counter()
    folder = tune_dir(w)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "picks.npy", picks, allow_pickle=False)
        np.save(tmp / "embeddings.npy", x.astype(np.float32), allow_pickle=False)
    grid = grid_points(int(info.get("nlist", 0)), "_HNSW" in info["factory"])
    pairs = _own_documents(w, hashes, picks)
    measured = ex.compute(dask.delayed(_measure, pure=False)(
        w, info["tag"], x, pairs, config.query.num_neighbors_query, config.index.metric == "cosine", grid,
        config.query.ef_search, config.query.target_recall, dask_key_name=f"tune-{token}"))
    best, reached = choose(measured["points"], config.query.target_recall)
    target = config.query.target_recall
    if reached:
        log(f"[tune] nprobe {best['nprobe']}" + (f", efSearch {best['ef_search']}" if best["ef_search"] else "")
            + f": recall@10 {best['recall_at_10']:.4f} >= {target} on {len(picks)} query chunks, "
            f"{best['search_chunks_per_s']:,.0f} query chunks/s searched")
    else:
        log(f"[tune] warning: no nprobe reaches recall@10 {target} (best {best['recall_at_10']:.4f} at nprobe "
            f"{best['nprobe']}, which query-neighbors will use): lower --target-recall or use an index with "
            "more exact codes (e.g. IVF...,Flat)")
    record = {"block": 0, "rows": [0, len(picks)], "files": file_sizes(w, [folder / "picks.npy", folder / "embeddings.npy"]),
              "nprobe": best["nprobe"], "ef_search": best["ef_search"] or config.query.ef_search,
              "recall_at_10": best["recall_at_10"], "reached": reached, "target_recall": target,
              "fingerprint": tune_fingerprint(w, config, hashes)}
    ex.record("tune", [record], fresh=True)
    if config.query.nprobe == "auto":
        write_tuned_config(w, config, record)
    seconds = time.perf_counter() - t0
    stats = {"target_recall": target, "queries": int(len(picks)), "chosen": best, "reached": reached,
             "points": measured["points"], "factory": info["factory"], "embed_seconds": round(t_embed - t0, 3),
             "exact_seconds": measured["exact_seconds"]}
    plot_tune(stats, stats_dir(w) / "tune.png")
    return ex.write_stats("tune", None, seconds, **stats)


def write_tuned_config(workdir: str, config: BuildConfig, record: dict[str, Any]) -> None:
    """config.json says what ``--query-nprobe auto`` chose (``tuned``), beside the settings."""
    tuned_section = {k: record[k] for k in ("nprobe", "ef_search", "recall_at_10", "target_recall", "reached")}
    current = read_json(config_path(workdir))
    if current.get("tuned") != tuned_section:
        atomic_write_bytes(config_path(workdir), config.to_json_with(tuned=tuned_section).encode())


def plot_tune(stats: dict[str, Any], path: Path) -> None:
    """recall@10 and searched query chunks/s against nprobe (one line per efSearch), the choice marked."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and a quicker import

    fig = Figure(figsize=(7, 4.2))
    left = fig.subplots()
    right = left.twinx()
    efs = sorted({p["ef_search"] for p in stats["points"]}, key=lambda e: -1 if e is None else e)
    for ef in efs:
        pts = [p for p in stats["points"] if p["ef_search"] == ef]
        label = "" if ef is None else f" (efSearch {ef})"
        left.plot([p["nprobe"] for p in pts], [p["recall_at_10"] for p in pts], "o-", label=f"recall@10{label}")
        right.plot([p["nprobe"] for p in pts], [p["search_chunks_per_s"] for p in pts], "s--", color="tab:orange",
                   alpha=0.7, label=f"query chunks/s{label}")
    c = stats["chosen"]
    left.axhline(stats["target_recall"], color="grey", lw=0.8, ls=":")
    left.plot([c["nprobe"]], [c["recall_at_10"]], "r*", ms=16, label=f"chosen: nprobe {c['nprobe']}")
    left.set_xscale("log", base=2)
    right.set_yscale("log")
    left.set_xlabel("nprobe (IVF lists probed)")
    left.set_ylabel("recall@10 vs exact search, same filter")
    right.set_ylabel("query chunks/s searched (one thread)")
    left.set_title(f"{stats['factory']}: {stats['queries']} query chunks, target {stats['target_recall']}")
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
