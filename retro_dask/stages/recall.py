"""Recall of the index and of the saved neighbours against exact search (Faiss's own ground truth).

Exact neighbours come from ``faiss.contrib.exhaustive_search.knn_ground_truth``
fed one block of ``db/embeddings.zarr`` at a time, in one task: out of core.
With the cosine metric both sides are normalized, as the index's ``L2norm`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import BuildConfig
from ..engine.executor import Executor
from ..formats import zarr_blocks
from ..formats.faiss_index import faiss
from ..formats.workdir import embeddings_path, neighbors_path
from ..plan.chunks import doc_key, lookup_documents
from .index import gather_rows, trained
from .query import document_lookup, filter_neighbors, open_samples, query_complete, search_settings, searcher

N_INDEX_QUERIES = 1000
N_NEIGHBOR_QUERIES = 500
RECALL_AT = 10


def exact_knn(path: str, queries: np.ndarray, k: int, cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest rows of a stored array of embeddings (ids -1 where the database has fewer than k)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    f = faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32).copy()
    if cosine:
        f.normalize_L2(q)
    fmt = zarr_blocks.open_format(path)

    def blocks():
        for b in range(fmt.n_blocks):
            x = np.ascontiguousarray(zarr_blocks.read_block(path, b), dtype=np.float32)
            if cosine:
                f.normalize_L2(x)
            yield x

    d, i = knn_ground_truth(q, blocks(), k, f.METRIC_L2, ngpu=0)
    return d, np.where(d >= 1e38, -1, i)  # padding where a block had fewer than k rows


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = RECALL_AT) -> float:
    hits = [len(set(f[:k][f[:k] >= 0].tolist()) & set(t[:k][t[:k] >= 0].tolist())) / max(int((t[:k] >= 0).sum()), 1)
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else float("nan")


def _index_recall(workdir: str, tag: str, rows: np.ndarray, nprobe: int, ef: int, cosine: bool) -> float:
    path = str(embeddings_path(workdir))
    q = gather_rows(path, rows)
    _, truth = exact_knn(path, q, RECALL_AT, cosine)
    found = searcher(workdir, tag, nprobe, ef).search(np.ascontiguousarray(q, np.float32), RECALL_AT)[1]
    return recall_at(found, truth)


def _embed_tokens(embed_config, gpt, chunk_tokens) -> np.ndarray:
    from ..text.chunk_texts import chunk_texts
    from ..text.embedder import get_embedder

    embedder = get_embedder(embed_config)
    texts = chunk_texts(gpt, chunk_tokens)
    return embedder.embed_ids(embedder.tokenizer.encode_for_model(texts, embed_config.max_chunk_length, num_threads=1))


def _neighbor_recall(workdir: str, config: BuildConfig, picks: list[tuple[str, int]], hashes: dict[str, str]) -> float:
    """Saved neighbours of query chunks against exact search with the same-document filter."""
    chunk_tokens, saved, pair_sample, pair_key = [], [], [], []
    for local, (split, row) in enumerate(picks):
        samples = open_samples(workdir, split, hashes[split])
        cps, cl = samples.chunks_per_sample, samples.chunk_length
        s, c = divmod(row, cps)
        chunk_tokens.append(samples.tokens(s)[c * cl : (c + 1) * cl])
        k, docs = samples.documents(s)
        keys = np.unique(doc_key(k, docs))
        pair_sample.append(np.full(len(keys), local))
        pair_key.append(keys)
        saved.append(zarr_blocks.read_rows(neighbors_path(workdir, split), row, row + 1)[0])
    x = _embed_tokens(config.embed, config.chunk.gpt_spec(), chunk_tokens)
    _, truth = exact_knn(str(embeddings_path(workdir)), x, config.query.num_neighbors_query,
                         config.index.metric == "cosine")
    first_row, keys = document_lookup(workdir)
    truth_kept = filter_neighbors(truth, lookup_documents(first_row, keys, truth), np.arange(len(picks)),
                                  np.concatenate(pair_sample), np.concatenate(pair_key), RECALL_AT)
    return recall_at(np.stack(saved), truth_kept)


def recall_figures(ex: Executor, config: BuildConfig, rng: np.random.Generator, log) -> dict[str, Any]:
    """recall@10 of the index on random chunks, and of the saved neighbours on random query chunks."""
    import dask

    from ..formats.sample_maps import Samples
    from ..plan.chunks import SPLIT_NAMES

    w = ex.workdir
    tag = trained(w)["tag"]
    n_chunks = zarr_blocks.open_format(embeddings_path(w)).shape[0]
    cosine = config.index.metric == "cosine"
    nprobe, ef_search = search_settings(config, w)
    rows = np.sort(rng.choice(n_chunks, size=min(N_INDEX_QUERIES, n_chunks), replace=False))
    out: dict[str, Any] = {}
    r = ex.compute(dask.delayed(_index_recall, pure=False)(w, tag, rows, nprobe, ef_search, cosine))
    out["recall_at_10_index"] = round(r, 4)
    log(f"[verify] recall@10 of the index (nprobe {nprobe}) against exact search on {len(rows)} chunks: {r:.4f}")
    splits = [s for s in SPLIT_NAMES if query_complete(w, s)]
    sizes = {s: zarr_blocks.open_format(neighbors_path(w, s)).shape[0] for s in splits}
    total = sum(sizes.values())
    if not total:
        return out
    picks_global = np.sort(rng.choice(total, size=min(N_NEIGHBOR_QUERIES, total), replace=False))
    offsets = np.cumsum([0] + [sizes[s] for s in splits])
    picks = [(splits[int(np.searchsorted(offsets, g, side="right") - 1)],
              int(g - offsets[int(np.searchsorted(offsets, g, side="right") - 1)])) for g in picks_global]
    hashes = {s: Samples(w, s).meta["hash"] for s in splits}
    r = ex.compute(dask.delayed(_neighbor_recall, pure=False)(w, config, picks, hashes))
    log(f"[verify] recall@10 of the saved neighbours against exact search with the same filter on "
        f"{len(picks)} query chunks: {r:.4f}")
    out.update(recall_at_10_neighbors=round(r, 4), neighbor_queries=len(picks))
    return out
