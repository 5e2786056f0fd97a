"""verify: recompute a random fraction of finished blocks and compare; measure recall.

For every block stage (db candidates and chunks, embeddings, neighbours of each
split):

1. every block's ledger record is checked against its file (present, same size);
2. a random ``--verify-fraction`` of the blocks is checked further: the file's
   checksum against the one recorded when it was written (a change on disk),
   then the block is recomputed through the same functions as the build and
   compared with what is stored (integers exactly; embeddings to within the
   compute precision; neighbour ids allowing a few swaps at ties);
3. any block that fails is reported and rebuilt, never trusted. If the rebuilt
   block is not the one whose checksum the ledger recorded, everything computed
   from it (later stages) is rebuilt too.

The index is checked for its size, for holding every chunk id exactly once and,
for the sampled blocks, for holding exactly the codes a fresh encoding gives.
Finally it prints recall@10 of the index against exact search on 1,000 random
chunks, and of the saved neighbours against exact search with the same filter
on 500 random query chunks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import arrays
from .errors import InputError
from .plan import SPLIT_NAMES
from .workdir import (
    Ledger,
    added_index_path,
    candidates_path,
    chunks_path,
    clear_stage_done,
    embeddings_path,
    files_match,
    neighbors_path,
    stage_done,
)

N_INDEX_QUERIES = 1000
N_NEIGHBOR_QUERIES = 500
RECALL_AT = 10


@dataclass
class StageCheck:
    stage: str
    n_blocks: int
    checked: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)


def compare_exact(stored: np.ndarray, fresh: np.ndarray) -> str | None:
    if stored.shape != fresh.shape:
        return f"shape {stored.shape} != recomputed {fresh.shape}"
    diff = int((stored != fresh).sum())
    return f"{diff} values differ from the recomputed block" if diff else None


def compare_embeddings(stored: np.ndarray, fresh: np.ndarray, embed_dtype: str, store_dtype: str) -> str | None:
    if stored.shape != fresh.shape:
        return f"shape {stored.shape} != recomputed {fresh.shape}"
    a, b = stored.astype(np.float32), fresh.astype(np.float32)
    # Recomputation may run with another thread count: allow the compute precision's noise.
    tol = 1e-4 if embed_dtype == "fp32" and store_dtype == "float32" else 3e-2
    scale = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-6)
    worst = float((np.abs(a - b) / scale).max()) if len(a) else 0.0
    if not np.isfinite(a).all():
        return "non-finite values stored"
    return f"embeddings differ from the recomputed block by {worst:.2e} (relative)" if worst > tol else None


def compare_neighbors(stored: np.ndarray, fresh: np.ndarray) -> str | None:
    if stored.shape != fresh.shape:
        return f"shape {stored.shape} != recomputed {fresh.shape}"
    same = [len(set(s.tolist()) & set(f.tolist())) / max(len(set(f.tolist())), 1) for s, f in zip(stored, fresh)]
    agree = float(np.mean(same)) if same else 1.0
    # Near-ties may swap after a recomputation in another thread layout; anything more is a fault.
    return f"only {agree:.3f} of the neighbours agree with the recomputed block" if agree < 0.99 else None


def verify_block(path: str, block: int, fresh: np.ndarray, compare, record: dict | None) -> str | None:
    """Runs on a worker (``fresh`` was just recomputed there): checksum, read, compare. None if good."""
    if record is None:
        return "no ledger record"
    try:
        arr = arrays.open_read(path)
        chunk = arrays.chunk_file(arr, path, block)
        if record.get("sha256") and arrays.file_sha256(chunk) != record["sha256"]:
            return "changed on disk since it was written (checksum differs)"
        stored = arrays.read_block(path, block)
    except Exception as exc:  # a truncated or garbled chunk fails to decode
        return f"unreadable ({type(exc).__name__}: {exc})"
    return compare(stored, fresh)


def check_stage(runner, stage: str, path, n_blocks: int, fraction: float, rng: np.random.Generator,
                make_recompute: Callable[[int], Any], compare, log) -> StageCheck:
    """``make_recompute(block)`` gives the delayed recomputation of a block."""
    import dask

    w = runner.workdir
    ledger = Ledger(w, stage)
    result = StageCheck(stage, n_blocks)
    records = ledger.records(n_blocks)
    for b, rec in enumerate(records):
        if rec is None:
            result.bad[b] = "no ledger record (never finished)"
        elif not files_match(w, rec.get("files", {})):
            result.bad[b] = "file missing or truncated"
    n_check = min(n_blocks, max(1, math.ceil(fraction * n_blocks))) if n_blocks else 0
    sample = sorted(rng.choice(n_blocks, size=n_check, replace=False).tolist()) if n_check else []
    sample = [b for b in sample if b not in result.bad]
    tasks = [dask.delayed(verify_block, pure=False)(str(path), b, make_recompute(b), compare, records[b]) for b in sample]
    for b, problem in zip(sample, runner.map_ordered(tasks)):
        result.checked.append(b)
        if problem:
            result.bad[b] = problem
    status = "ok" if not result.bad else f"{len(result.bad)} bad"
    log(f"[verify] {stage}: {n_blocks} blocks, sizes checked, {len(result.checked)} recomputed: {status}")
    for b, why in sorted(result.bad.items())[:20]:
        log(f"[verify]   block {b}: {why}")
    return result


def forget_blocks(workdir: str, check: StageCheck, path) -> dict[int, str | None]:
    """Remove bad blocks (ledger record and file); return their recorded checksums."""
    ledger = Ledger(workdir, check.stage)
    old = {}
    arr = arrays.open_read(path)
    for b in check.bad:
        rec = ledger.read(b)
        old[b] = rec.get("sha256") if rec else None
        ledger.forget(b)
        try:
            os.unlink(arrays.chunk_file(arr, path, b))
        except FileNotFoundError:
            pass
    return old


def rebuilt_same(workdir: str, stage: str, old: dict[int, str | None]) -> bool:
    ledger = Ledger(workdir, stage)
    return all(sha is not None and (ledger.read(b) or {}).get("sha256") == sha for b, sha in old.items())


# ---------------------------------------------------------------- exact search


def _exact_block(path: str, block: int, queries: np.ndarray, k: int, cosine: bool):
    from .faiss_util import faiss

    f = faiss()
    x = np.ascontiguousarray(arrays.read_block(path, block), dtype=np.float32)
    B = arrays.open_read(path).chunks[0]
    if cosine:
        f.normalize_L2(x)
    index = f.IndexFlatL2(x.shape[1])
    index.add(x)
    d, i = index.search(queries, min(k, len(x)))
    i = np.where(i >= 0, i + block * B, -1)
    return d, i


def exact_knn(runner, queries: np.ndarray, k: int, cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest database chunks, one embeddings block at a time (out of core)."""
    import dask

    from .faiss_util import faiss

    w = runner.workdir
    q = np.ascontiguousarray(queries, dtype=np.float32).copy()
    if cosine:
        faiss().normalize_L2(q)
    emb = arrays.open_read(embeddings_path(w))
    n_blk = -(-emb.shape[0] // emb.chunks[0])
    best_d = np.full((len(q), k), np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    q_shared = dask.delayed(q)
    tasks = (dask.delayed(_exact_block, pure=False)(str(embeddings_path(w)), b, q_shared, k, cosine) for b in range(n_blk))
    for d, i in runner.map_ordered(tasks):
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, i], axis=1)
        order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(all_d, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_d, best_i


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = RECALL_AT) -> float:
    hits = [len(set(f[:k][f[:k] >= 0].tolist()) & set(t[:k][t[:k] >= 0].tolist())) / max(int((t[:k] >= 0).sum()), 1)
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else float("nan")


# ---------------------------------------------------------------- the index


def _index_ids_task(workdir: str, tag: str, n_chunks: int, check_rows: list[int], factory: str) -> dict[str, Any]:
    """Every id exactly once; the codes of the checked rows equal a fresh encoding."""
    from .faiss_util import faiss
    from .index import IndexLayout, ivf_of, load_index, read_index_file, split_codes
    from .workdir import trained_index_path

    f = faiss()
    index = read_index_file(added_index_path(workdir, tag), mmap=True)
    ivf = ivf_of(index)
    seen = np.zeros(n_chunks, dtype=np.int32)
    problems = []
    if int(index.ntotal) != n_chunks:
        problems.append(f"index holds {index.ntotal} entries, the database {n_chunks} chunks")
    if ivf is None:
        return {"problems": problems, "duplicates": 0, "missing": 0}
    trained = load_index(trained_index_path(workdir, tag))
    layout = IndexLayout.of(trained)
    wanted = np.asarray(sorted(check_rows), dtype=np.int64)
    stored_codes = {}
    invlists = ivf.invlists
    for l in range(ivf.nlist):
        n = invlists.list_size(l)
        if n == 0:
            continue
        ids = f.rev_swig_ptr(invlists.get_ids(l), n).copy()
        ok = (ids >= 0) & (ids < n_chunks)
        if not ok.all():
            problems.append(f"list {l} holds ids outside the database")
        np.add.at(seen, ids[ok], 1)
        if len(wanted):
            hit = np.flatnonzero(np.isin(ids, wanted))
            if len(hit):
                codes = f.rev_swig_ptr(invlists.get_codes(l), n * layout.code_size).reshape(n, layout.code_size)
                for j in hit:
                    stored_codes[int(ids[j])] = (l, codes[j].copy())
    duplicates, missing = int((seen > 1).sum()), int((seen == 0).sum())
    if duplicates or missing:
        problems.append(f"{duplicates} chunk ids appear more than once and {missing} never")
    if len(wanted):
        x = np.ascontiguousarray(_rows(workdir, wanted), dtype=np.float32)
        lists, codes = split_codes(layout, trained.sa_encode(x))
        bad = [int(r) for r, l, c in zip(wanted, lists, codes)
               if int(r) not in stored_codes or stored_codes[int(r)][0] != l or not np.array_equal(stored_codes[int(r)][1], c)]
        if bad:
            problems.append(f"{len(bad)} of {len(wanted)} checked chunks have other codes than a fresh encoding "
                            f"(e.g. row {bad[0]})")
    return {"problems": problems, "duplicates": duplicates, "missing": missing}


def _rows(workdir: str, rows: np.ndarray) -> np.ndarray:
    from .index import gather_rows

    return gather_rows(embeddings_path(workdir), np.sort(rows))


def _index_search_task(workdir: str, tag: str, queries: np.ndarray, k: int, nprobe: int, ef: int) -> np.ndarray:
    from .query import searcher

    return searcher(workdir, tag, nprobe, ef).search(np.ascontiguousarray(queries, np.float32), k)[1]


# ---------------------------------------------------------------- the whole workdir


def verify_workdir(runner, config, fraction: float, log=print, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Check every finished stage of the workdir; rebuild what fails; print recall figures."""
    import dask

    from .build import run_stage
    from .db import (candidate_counts_of_blocks, candidate_job, compute_candidates, compute_compaction, dataset_facts,
                     gpt_spec, plan_candidates)
    from .embed import compute_embeddings
    from .plan import plan_compaction

    w = runner.workdir
    t0 = time.perf_counter()
    rng = rng or np.random.default_rng()
    stats: dict[str, Any] = {"fraction": fraction, "stages": {}}
    if not stage_done(w, "db-build"):
        raise InputError(f"{w}: nothing to verify yet (db-build has not finished)")
    rebuilt: list[str] = []
    cascade_from: int | None = None
    order = ["db-build", "embed", "index-add", "query-neighbors"]

    def settle(stage_group: str, checks: list[tuple[StageCheck, Any]]) -> None:
        nonlocal cascade_from
        stats["stages"].update({c.stage: {"blocks": c.n_blocks, "recomputed": len(c.checked),
                                          "bad": {str(b): why for b, why in c.bad.items()}} for c, _ in checks})
        bad = [(c, p) for c, p in checks if c.bad]
        if not bad:
            return
        old = {c.stage: forget_blocks(w, c, p) for c, p in bad}
        clear_stage_done(w, stage_group)
        for c, _ in bad:
            if c.stage.startswith("query-"):
                clear_stage_done(w, c.stage)
        log(f"[verify] rebuilding {sum(len(c.bad) for c, _ in bad)} blocks of {stage_group}")
        if stage_group == "db-build":
            clear_stage_done(w, "db-docs")
        run_stage(stage_group, runner, config, None, log)
        rebuilt.append(stage_group)
        if not all(rebuilt_same(w, c.stage, old[c.stage]) for c, _ in bad):
            cascade_from = order.index(stage_group) + 1 if cascade_from is None else min(cascade_from, order.index(stage_group) + 1)

    # db-build: candidates, then chunks.
    facts = dataset_facts(config)
    plan = plan_candidates(config, facts)
    job = candidate_job(w, config, facts)

    def cand_recompute(b):
        lo, hi = plan.block_rows(b)
        return dask.delayed(compute_candidates, pure=False)(job, plan.starts[b], hi - lo)

    c1 = check_stage(runner, "db-candidates", candidates_path(w), plan.n_blocks, fraction, rng,
                     cand_recompute, compare_exact, log)
    checks = [(c1, candidates_path(w))]
    if not c1.bad:
        valid_per_block, _ = candidate_counts_of_blocks(w, plan.n_blocks, len(plan.candidates_per_dataset))
        compaction = plan_compaction(valid_per_block, config.chunk.block_size)
        c2 = check_stage(runner, "db-chunks", chunks_path(w), len(compaction), fraction, rng,
                         lambda b: dask.delayed(compute_compaction, pure=False)(w, compaction[b]), compare_exact, log)
        checks.append((c2, chunks_path(w)))
    settle("db-build", checks)

    if stage_done(w, "embed") or Ledger(w, "embed").folder.exists():
        emb = arrays.open_read(embeddings_path(w))
        n_blk = -(-emb.shape[0] // emb.chunks[0])
        prefixes = tuple(config.chunk.data.prefixes)
        gpt = gpt_spec(config)
        cmp = lambda a, b: compare_embeddings(a, b, config.embed.embed_dtype, config.embed.store_dtype)  # noqa: E731
        c3 = check_stage(runner, "embed", embeddings_path(w), n_blk, fraction, rng,
                         lambda b: dask.delayed(_first, pure=False)(
                             dask.delayed(compute_embeddings, pure=False)(w, config.embed, gpt, prefixes, b)),
                         cmp, log)
        settle("embed", [(c3, embeddings_path(w))])

    index_info = stage_done(w, "index-add")
    if cascade_from is not None and cascade_from <= order.index("index-add"):
        index_info = None  # rebuilt below
    if index_info:
        tag = index_info["tag"]
        n_chunks = arrays.open_read(chunks_path(w)).shape[0]
        problems = []
        if not files_match(w, index_info.get("files", {})):
            problems.append("index file missing or truncated")
        else:
            B = config.chunk.block_size
            n_blk = -(-n_chunks // B)
            blocks = rng.choice(n_blk, size=min(n_blk, max(1, math.ceil(fraction * n_blk))), replace=False)
            rows = [r for b in blocks for r in range(b * B, min((b + 1) * B, n_chunks))]
            out = runner.compute_one(dask.delayed(_index_ids_task, pure=False)(
                w, tag, n_chunks, rows, (stage_done(w, "index-train") or {}).get("factory", "")))
            problems += out["problems"]
        stats["stages"]["index"] = {"problems": problems}
        log(f"[verify] index {tag}: " + ("ok" if not problems else "; ".join(problems)))
        if problems:
            clear_stage_done(w, "index-add")
            cascade_from = order.index("index-add") if cascade_from is None else min(cascade_from, order.index("index-add"))

    for split in SPLIT_NAMES:
        if cascade_from is not None:
            break
        done = stage_done(w, f"query-{split}")
        if not done:
            continue
        from .index import index_tag
        from .query import compute_neighbors, query_job, query_nprobe

        job_q = query_job(w, config, split, index_tag(w), query_nprobe(config, w), done["hash"])
        n_rows = arrays.open_read(neighbors_path(w, split)).shape[0]
        n_blk = -(-n_rows // job_q.rows_per_block) if n_rows else 0
        c4 = check_stage(runner, f"query-{split}", neighbors_path(w, split), n_blk, fraction, rng,
                         lambda b, j=job_q: dask.delayed(_first, pure=False)(
                             dask.delayed(compute_neighbors, pure=False)(j, b)),
                         compare_neighbors, log)
        settle("query-neighbors", [(c4, neighbors_path(w, split))])

    if cascade_from is not None:
        for stage in order[cascade_from:]:
            if stage == "index-add":
                clear_stage_done(w, "index-add")
            if stage == "embed":
                Ledger(w, "embed").clear()
                clear_stage_done(w, "embed")
            if stage == "query-neighbors":
                for split in SPLIT_NAMES:
                    Ledger(w, f"query-{split}").clear()
                    clear_stage_done(w, f"query-{split}")
            log(f"[verify] rebuilding {stage}, which was computed from rebuilt blocks")
            run_stage(stage, runner, config, None, log)
            rebuilt.append(stage)
    stats["rebuilt"] = rebuilt
    stats["blocks_rebuilt"] = sum(len(v.get("bad", {})) for v in stats["stages"].values() if isinstance(v, dict))
    stats.update(recall_figures(runner, config, rng, log))
    return runner.write_stats("verify", None, time.perf_counter() - t0, **stats)


def _first(pair):
    return pair[0]


def recall_figures(runner, config, rng: np.random.Generator, log) -> dict[str, Any]:
    import dask

    from .index import index_tag
    from .query import query_nprobe

    w = runner.workdir
    out: dict[str, Any] = {}
    if not stage_done(w, "index-add"):
        return out
    tag = index_tag(w)
    n_chunks = arrays.open_read(embeddings_path(w)).shape[0]
    cosine = config.index.metric == "cosine"
    nprobe = query_nprobe(config, w)
    rows = np.sort(rng.choice(n_chunks, size=min(N_INDEX_QUERIES, n_chunks), replace=False))
    q = _rows(w, rows)
    _, truth = exact_knn(runner, q, RECALL_AT, cosine)
    found = runner.compute_one(dask.delayed(_index_search_task, pure=False)(w, tag, q, RECALL_AT, nprobe,
                                                                           config.query.ef_search))
    out["recall_at_10_index"] = round(recall_at(found, truth), 4)
    log(f"[verify] recall@10 of the index (nprobe {nprobe}) against exact search on {len(rows)} chunks: "
        f"{out['recall_at_10_index']:.4f}")
    splits = [s for s in SPLIT_NAMES if stage_done(w, f"query-{s}")]
    if splits:
        out.update(neighbor_recall(runner, config, splits, rng, log))
    return out


def neighbor_recall(runner, config, splits, rng, log) -> dict[str, Any]:
    """Saved neighbours against exact search with the same-document filter, on random query chunks."""
    import dask

    from .db import doc_key, gpt_spec, lookup_documents
    from .query import document_lookup, filter_neighbors, open_samples

    w = runner.workdir
    sizes = {s: arrays.open_read(neighbors_path(w, s)).shape[0] for s in splits}
    total = sum(sizes.values())
    if total == 0:
        return {}
    picks = np.sort(rng.choice(total, size=min(N_NEIGHBOR_QUERIES, total), replace=False))
    offsets = np.cumsum([0] + [sizes[s] for s in splits])
    chunk_tokens, saved, pair_sample, pair_key = [], [], [], []
    for local, g in enumerate(picks):
        si = int(np.searchsorted(offsets, g, side="right") - 1)
        split, row = splits[si], int(g - offsets[si])
        samples = open_samples(w, split, stage_done(w, f"query-{split}")["hash"])
        cps, cl = samples.chunks_per_sample, samples.chunk_length
        s, c = divmod(row, cps)
        chunk_tokens.append(samples.tokens(s)[c * cl : (c + 1) * cl])
        k, docs = samples.documents(s)
        keys = np.unique(doc_key(k, docs))
        pair_sample.append(np.full(len(keys), local))
        pair_key.append(keys)
        saved.append(arrays.open_read(neighbors_path(w, split))[row])
    x = runner.compute_one(dask.delayed(_embed_tokens, pure=False)(config.embed, gpt_spec(config), chunk_tokens))
    k_query = config.query.num_neighbors_query
    _, truth = exact_knn(runner, x, k_query, config.index.metric == "cosine")
    first_row, keys = document_lookup(w)
    truth_kept = filter_neighbors(truth, lookup_documents(first_row, keys, truth), np.arange(len(picks)),
                                  np.concatenate(pair_sample), np.concatenate(pair_key), RECALL_AT)
    r = recall_at(np.stack(saved), truth_kept)
    log(f"[verify] recall@10 of the saved neighbours against exact search with the same filter on "
        f"{len(picks)} query chunks: {r:.4f}")
    return {"recall_at_10_neighbors": round(r, 4), "neighbor_queries": int(len(picks))}


def _embed_tokens(embed_config, gpt, chunk_tokens) -> np.ndarray:
    from .embed import chunk_texts, get_embedder

    embedder = get_embedder(embed_config)
    texts = chunk_texts(gpt, chunk_tokens)
    return embedder.embed_ids(embedder.tokenizer.encode_for_model(texts, embed_config.max_chunk_length, num_threads=1))
