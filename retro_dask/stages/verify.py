"""verify: check every block of the workdir, recompute a random fraction, rebuild what fails.

For every stored array (candidates, chunks, sampled, embeddings, neighbours of
each split):

1. every block has its ledger record and its file the recorded size;
2. every block's bytes match their crc32c (each Zarr chunk carries its own),
   read by the workers a span of blocks per task;
3. a random ``--verify-fraction`` of the blocks is recomputed from the stage's
   own lazy array and compared with what is stored (integers exactly;
   embeddings to within the compute precision; neighbour ids allowing a few
   swaps at ties).

The other files are checked against the sha256 recorded when they were
written: the document index, the sample maps, the trained and the final index
(whose lists must also hold every chunk id once, and for the sampled rows the
codes a fresh encoding gives). A block or file that fails is reported,
forgotten and rebuilt through the same stage; if what is rebuilt differs from
what was recorded, the stages computed from it are rebuilt too. Finally the
recall of the index and of the saved neighbours against exact search
(``recall.py``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import BuildConfig
from ..engine.executor import Executor, StoreJob
from ..engine.targets import ZarrTarget
from ..errors import InputError
from ..formats import zarr_blocks
from ..formats.ledger import Ledger, files_match
from ..formats.workdir import added_index_path, chunks_path, sampled_path, samples_dir, trained_index_path
from ..plan.chunks import SPLIT_NAMES
from .registry import run_stage

CHECKSUM_SPAN = 128  # blocks whose checksums one task reads


@dataclass
class Check:
    stage: str
    n_blocks: int
    recomputed: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)
    was: dict[int, set[bytes]] = field(default_factory=dict)  # the crc32c a bad block had, or should have had


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


def _compare(fresh: np.ndarray, stored: np.ndarray, compare: Callable) -> str | None:
    return compare(stored, fresh)


def _crcs_of(path: str, block: int, ndim: int) -> set[bytes]:
    """The checksum a block's file carries and the one its bytes have (they differ when it was changed)."""
    try:
        data = zarr_blocks.chunk_file(path, block, ndim).read_bytes()
    except OSError:
        return set()
    out = {zarr_blocks.crc32c_bytes(data[: -zarr_blocks.CRC_BYTES])} if len(data) > zarr_blocks.CRC_BYTES else set()
    return out | ({data[-zarr_blocks.CRC_BYTES:]} if len(data) >= zarr_blocks.CRC_BYTES else set())


def check_array(ex: Executor, job: StoreJob, fraction: float, rng: np.random.Generator, compare: Callable | None,
                log) -> Check:
    """Steps 1-3 of the module doc for one stored array; ``compare`` None: no recomputation."""
    import dask

    target, w = job.target, ex.workdir
    check = Check(job.stage, target.n_blocks)
    records = Ledger(w, job.stage, job.fingerprint).records()
    for b in range(target.n_blocks):
        rec = records.get(b)
        if rec is None or tuple(rec.get("rows", ())) != target.rows(b):
            check.bad[b] = "no ledger record (never finished)"
        elif not files_match(w, rec.get("files", {})):
            check.bad[b] = "file missing or truncated"
        elif rec.get("crc32c") and rec["crc32c"] not in {c.hex() for c in _crcs_of(target.path, b, len(target.shape))}:
            check.bad[b] = "its checksum is not the one recorded when it was written (replaced on disk)"
    spans = [list(range(b, min(b + CHECKSUM_SPAN, target.n_blocks))) for b in range(0, target.n_blocks, CHECKSUM_SPAN)]
    tasks = (dask.delayed(zarr_blocks.block_checksum_problems, pure=False)(target.path, s) for s in spans)
    for problems in ex.gather(tasks):
        for b, why in problems.items():
            check.bad.setdefault(b, why)
    if compare is not None and target.n_blocks:
        n = min(target.n_blocks, max(1, math.ceil(fraction * target.n_blocks)))
        sample = [b for b in sorted(rng.choice(target.n_blocks, size=n, replace=False).tolist()) if b not in check.bad]
        tasks = (dask.delayed(_compare, pure=False)(job.expression(*target.rows(b)),
                                                    zarr_blocks.lazy_rows(target.path, *target.rows(b)), compare)
                 for b in sample)
        for b, problem in zip(sample, ex.gather(tasks)):
            check.recomputed.append(b)
            if problem:
                check.bad[b] = problem
    status = "ok" if not check.bad else f"{len(check.bad)} bad"
    log(f"[verify] {job.stage}: {target.n_blocks} blocks, every checksum read, {len(check.recomputed)} recomputed: "
        f"{status}")
    for b, why in sorted(check.bad.items())[:20]:
        log(f"[verify]   block {b}: {why}")
    return check


def forget(ex: Executor, job: StoreJob, check: Check) -> None:
    """Drop bad blocks (record and file), keeping the checksums they had for the comparison after the rebuild."""
    ndim = len(job.target.shape)
    records = Ledger(ex.workdir, job.stage, job.fingerprint).records()
    for b in check.bad:
        recorded = (records.get(b) or {}).get("crc32c")
        check.was[b] = _crcs_of(job.target.path, b, ndim) | ({bytes.fromhex(recorded)} if recorded else set())
        for f in job.target.files(b):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    ex.forget(job.stage, check.bad, job.fingerprint)


def rebuilt_same(job: StoreJob, check: Check) -> bool:
    ndim = len(job.target.shape)
    for b, was in check.was.items():
        data = zarr_blocks.chunk_file(job.target.path, b, ndim).read_bytes()
        if not was or data[-zarr_blocks.CRC_BYTES:] not in was:
            return False
    return True


def _sha256(path) -> str | None:
    from .index import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


# ---------------------------------------------------------------- the stages' arrays


def db_checks(ex: Executor, config: BuildConfig, fraction, rng, log) -> tuple[list, bool]:
    from .db import candidate_counts, chunks_job, db_jobs

    facts, plan, cand = db_jobs(ex, config)
    checks = [(cand, check_array(ex, cand, fraction, rng, compare_exact, log))]
    if not checks[0][1].bad:
        counts = candidate_counts(ex, plan.n_candidates, len(facts))
        chunks = chunks_job(ex, config, counts)
        checks.append((chunks, check_array(ex, chunks, fraction, rng, compare_exact, log)))
    else:  # the compaction cannot be recomputed from bad candidates: records and checksums only
        chunks = StoreJob("db-chunks", ZarrTarget.open(ex.workdir, "db-chunks", chunks_path(ex.workdir)),
                          lambda lo, hi: None)
        checks.append((chunks, check_array(ex, chunks, fraction, rng, None, log)))
    fmt = zarr_blocks.open_format(sampled_path(ex.workdir))
    sampled = StoreJob("db-sampled", ZarrTarget.open(ex.workdir, "db-sampled", sampled_path(ex.workdir)),
                       lambda lo, hi: None, fingerprint=f"n={fmt.shape[0]}")
    checks.append((sampled, check_array(ex, sampled, fraction, rng, None, log)))
    docs = Ledger(ex.workdir, "db-docs").record(0)
    docs_ok = bool(docs) and files_match(ex.workdir, docs.get("files", {})) and all(
        _sha256(os.path.join(ex.workdir, rel)) == sha for rel, sha in docs.get("sha256", {}).items())
    log(f"[verify] db-docs: {'ok' if docs_ok else 'changed on disk (sha256 differs): bad'}")
    return checks, docs_ok


def settle(ex: Executor, config: BuildConfig, group: str, checks: list, log, extra_bad: bool = False) -> str | None:
    """Forget and rebuild what failed; return ``"changed"`` if the rebuilt blocks differ from what was recorded,
    ``"rebuilt"`` if they are the same, None if nothing failed."""
    bad = [(job, c) for job, c in checks if c.bad]
    if not bad and not extra_bad:
        return None
    for job, c in bad:
        forget(ex, job, c)
    log(f"[verify] rebuilding {sum(len(c.bad) for _, c in bad)} blocks of {group}")
    run_stage(group, ex, config, log)
    return "rebuilt" if all(rebuilt_same(job, c) for job, c in bad) else "changed"


def clear_downstream(ex: Executor, group: str) -> list[str]:
    """Forget every record computed from ``group``'s outputs; return the stages to run again."""
    order = ["db-build", "embed", "index-add", "query-neighbors"]
    later = order[order.index(group) + 1 :]
    for stage in later:
        names = {"embed": ["embed"], "index-add": ["index-encode", "index-add"],
                 "query-neighbors": [f"query-{s}" for s in SPLIT_NAMES]}.get(stage, [])
        for name in names:
            ex.forget(name)
    return later


# ---------------------------------------------------------------- the index


def _index_ids_task(workdir: str, tag: str, n_chunks: int, check_rows: list[int]) -> list[str]:
    """Every id exactly once; the codes of the checked rows equal a fresh encoding. Returns the problems."""
    from ..formats.faiss_index import faiss, ivf_of, load_index, read_index_file
    from ..formats.inverted_lists import IndexLayout, split_codes
    from ..formats.workdir import embeddings_path
    from .index import gather_rows

    f = faiss()
    index = read_index_file(added_index_path(workdir, tag), mmap=True)
    ivf = ivf_of(index)
    problems = []
    if int(index.ntotal) != n_chunks:
        problems.append(f"index holds {index.ntotal} entries, the database {n_chunks} chunks")
    if ivf is None:
        return problems
    trained_ = load_index(trained_index_path(workdir, tag))
    layout = IndexLayout.of(trained_)
    wanted = np.asarray(sorted(check_rows), dtype=np.int64)
    seen = np.zeros(n_chunks, dtype=np.int32)
    stored_codes = {}
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n == 0:
            continue
        ids = f.rev_swig_ptr(invlists.get_ids(lst), n).copy()
        ok = (ids >= 0) & (ids < n_chunks)
        if not ok.all():
            problems.append(f"list {lst} holds ids outside the database")
        np.add.at(seen, ids[ok], 1)
        hit = np.flatnonzero(np.isin(ids, wanted)) if len(wanted) else []
        if len(hit):
            codes = f.rev_swig_ptr(invlists.get_codes(lst), n * layout.code_size).reshape(n, layout.code_size)
            for j in hit:
                stored_codes[int(ids[j])] = (lst, codes[j].copy())
    duplicates, missing = int((seen > 1).sum()), int((seen == 0).sum())
    if duplicates or missing:
        problems.append(f"{duplicates} chunk ids appear more than once and {missing} never")
    if len(wanted):
        x = np.ascontiguousarray(gather_rows(embeddings_path(workdir), wanted), dtype=np.float32)
        lists, codes = split_codes(layout, trained_.sa_encode(x))
        bad = [int(r) for r, lst, c in zip(wanted, lists, codes) if int(r) not in stored_codes
               or stored_codes[int(r)][0] != lst or not np.array_equal(stored_codes[int(r)][1], c)]
        if bad:
            problems.append(f"{len(bad)} of {len(wanted)} checked chunks have other codes than a fresh encoding "
                            f"(e.g. row {bad[0]})")
    return problems


def check_index(ex: Executor, config: BuildConfig, fraction: float, rng, log) -> dict[str, list[str]]:
    """Problems of the trained and of the final index (by stage), after their sha256 and structure."""
    import dask

    from .index import trained

    w = ex.workdir
    info = trained(w)
    out: dict[str, list[str]] = {"index-train": [], "index-add": []}
    if _sha256(trained_index_path(w, info["tag"])) != info["sha256"]:
        out["index-train"].append("trained index changed on disk (sha256 differs)")
    ledgers = [Ledger(w, "index-add", f"{info['sha256']}:{m}") for m in ("in-memory", "on-disk")]
    rec = next((r for r in (lg.record(0) for lg in ledgers) if r), None)
    if rec is None:
        out["index-add"].append("no final index recorded")
    elif not files_match(w, rec["files"]) or _sha256(added_index_path(w, info["tag"])) != rec["sha256"]:
        out["index-add"].append("final index missing, truncated or changed on disk (sha256 differs)")
    else:
        n = rec["ntotal"]
        B = config.chunk.block_size
        n_blk = -(-n // B)
        blocks = rng.choice(n_blk, size=min(n_blk, max(1, math.ceil(fraction * n_blk))), replace=False)
        rows = [r for b in blocks for r in range(b * B, min((b + 1) * B, n))]
        out["index-add"] += ex.compute(dask.delayed(_index_ids_task, pure=False)(w, info["tag"], n, rows))
    for stage, problems in out.items():
        log(f"[verify] {stage} {info['tag']}: " + ("ok" if not problems else "; ".join(problems)))
    return out


# ---------------------------------------------------------------- the whole workdir


def verify_workdir(ex: Executor, config: BuildConfig, fraction: float, log=print,
                   rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Check every finished stage of the workdir; rebuild what fails; print recall figures."""
    from .db import db_complete
    from .embed import embed_complete, embed_job
    from .index import index_complete
    from .query import query_complete, search_settings, split_job
    from .recall import recall_figures

    w = ex.workdir
    t0 = time.perf_counter()
    rng = rng or np.random.default_rng()
    if not db_complete(w):
        raise InputError(f"{w}: nothing to verify yet (db-build has not finished)")
    stats: dict[str, Any] = {"fraction": fraction, "stages": {}}
    rebuilt: list[str] = []
    rerun: list[str] = []

    def record(checks):
        stats["stages"].update({c.stage: {"blocks": c.n_blocks, "recomputed": len(c.recomputed),
                                          "bad": {str(b): why for b, why in c.bad.items()}} for _, c in checks})

    def outcome(group: str, result: str | None) -> None:
        if result:
            rebuilt.append(group)
        if result == "changed":
            for stage in clear_downstream(ex, group):
                if stage not in rerun:
                    rerun.append(stage)

    checks, docs_ok = db_checks(ex, config, fraction, rng, log)
    record(checks)
    if not docs_ok:
        ex.forget("db-docs")
    result = settle(ex, config, "db-build", checks, log, extra_bad=not docs_ok)
    if result == "changed":  # the database itself may differ: everything after the length pass again
        for name in ("db-chunks", "db-docs", "db-sampled"):
            ex.forget(name)
        run_stage("db-build", ex, config, log)
    outcome("db-build", result)

    if not rerun and embed_complete(w):
        job = embed_job(ex, config)
        cmp = lambda a, b: compare_embeddings(a, b, config.embed.embed_dtype, config.embed.store_dtype)  # noqa: E731
        checks = [(job, check_array(ex, job, fraction, rng, cmp, log))]
        record(checks)
        outcome("embed", settle(ex, config, "embed", checks, log))

    if not rerun and index_complete(w):
        problems = check_index(ex, config, fraction, rng, log)
        stats["stages"]["index"] = {"problems": problems["index-train"] + problems["index-add"]}
        if problems["index-train"]:
            ex.forget("index-train")
            run_stage("index-train", ex, config, log)
        if problems["index-train"] or problems["index-add"]:
            ex.forget("index-add")
            # A trained index of other bytes has another sha256: the records of what used it are void.
            outcome("index-add", "changed" if problems["index-train"] else "rebuilt")
            run_stage("index-add", ex, config, log)

    if not rerun and index_complete(w):
        settings = search_settings(config, w)
        checks = []
        for split in SPLIT_NAMES:
            if not query_complete(w, split):
                continue
            maps_ok = maps_intact(w, config, split)
            if not maps_ok:
                log(f"[verify] query-{split}: sample maps changed on disk (sha256 differs): rebuilt")
                import shutil

                shutil.rmtree(samples_dir(w, split), ignore_errors=True)
            _, job = split_job(ex, config, split, settings)
            checks.append((job, check_array(ex, job, fraction, rng, compare_neighbors, log)))
        record(checks)
        outcome("query-neighbors", settle(ex, config, "query-neighbors", checks, log))

    for stage in rerun:
        log(f"[verify] rebuilding {stage}, which was computed from rebuilt blocks")
        run_stage(stage, ex, config, log)
        rebuilt.append(stage)
    stats["rebuilt"] = rebuilt
    stats["blocks_rebuilt"] = sum(len(v.get("bad", {})) for v in stats["stages"].values() if isinstance(v, dict))
    if index_complete(w):
        stats.update(recall_figures(ex, config, rng, log))
    return ex.write_stats("verify", None, time.perf_counter() - t0, **stats)


def maps_intact(workdir: str, config: BuildConfig, split: str) -> bool:
    """The split's cached sample maps equal a fresh computation from the sizes (they are pure functions of them)."""
    from ..formats.indexed_dataset import open_dataset
    from ..plan.samples import build_split_maps, split_plan

    folder = samples_dir(workdir, split)
    sizes_of = [open_dataset(p).sizes for p in config.chunk.data.prefixes]
    try:
        return all(np.array_equal(np.load(folder / f"{name}.npy", allow_pickle=False), arr)
                   for name, arr in build_split_maps(split_plan(config, split, sizes_of), sizes_of).items())
    except (OSError, ValueError):
        return False
