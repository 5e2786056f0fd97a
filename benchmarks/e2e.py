#!/usr/bin/env python
"""Benchmark: the whole build on the sample corpus against a sequential baseline and the model ceiling.

In one run:

1. pipeline (fp32): ``scripts/build.py --tasks build`` on the default embedded
   LocalCluster, as a user runs it (wall time from process start to exit);
2. baseline (fp32): ``baseline.py``, one process doing the same work in order
   (chunk, detokenize, BERT-tokenize, embed length-sorted in batches, train the
   same index, add, build the samples, embed and search their chunks, filter)
   with torch and Faiss on every core through their own threads;
3. ceiling: the model's own forward throughput on the same chunks (database +
   pretraining queries), pre-tokenized and length-sorted, one single-thread
   process per core (as in ``embed.py``);
4. pipeline (bf16) and the recall@10 of its saved neighbours against that of
   the fp32 run (both against exact search on fp32 embeddings, same filter);
5. only when asked (``--embed-backend B --embed-dtype D``, or ``--settings
   B:D,B:D``): one more pipeline run per setting, with its speed against the
   fp32 baseline, the recall@10 of its saved neighbours against the fp32 run's
   (goal: within 0.01) and the cosines of its database embeddings to the fp32
   run's (mean, 1st percentile, minimum).

It prints per stage and in total: wall time, chunks/s, the ratios
pipeline/baseline and pipeline/ceiling, and peak RSS of the driver and each
worker; ``--record`` appends the table to benchmarks/RESULTS.md.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/e2e.py [--record] [--embed-backend openvino --embed-dtype int8]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, model_ceiling, record_results, sample_corpus, table

STAGES = ("db-build", "embed", "index-train", "index-add", "query-neighbors")


def pipeline(workdir: Path, prefix: str, dtype: str, backend: str | None = None) -> dict:
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--workdir", str(workdir), "--tasks", "build",
           "--data-path", "1", prefix, "--embed-dtype", dtype, "--no-progress", "--dashboard-address", "127.0.0.1:0"]
    if backend:
        cmd += ["--embed-backend", backend]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stats = {s: json.loads((workdir / "stats" / f"{s}.json").read_text()) for s in STAGES}
    return {"wall": wall, "stats": stats}


def baseline(prefix: str, factory: str, nprobe: int, dtype: str) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import json, baseline\n"
            f"out = baseline.run({prefix!r}, {factory!r}, {nprobe}, {dtype!r}); out.pop('db_ids')\n"
            "print('STATS' + json.dumps(out))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.split("STATS", 1)[1])
    result["wall"] = time.perf_counter() - t0
    return result


def ceiling_ids(workdir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """WordPiece ids of every chunk the pipeline embeds: (database chunks, query chunks)."""
    from retro_dask import inspect as retro
    from retro_dask.text.chunk_texts import chunk_texts
    from retro_dask.formats.sample_maps import Samples
    from retro_dask.text.gpt import GPTTokenizerSpec
    from retro_dask.text.bert import get_bert_tokenizer

    retro.init(str(workdir), quiet=True)
    db_texts = [retro.get_db_chunk_text(i) for i in range(retro.get_db_num_chunks())]
    query_texts: list[str] = []
    for split in ("train", "valid", "test"):
        samples = Samples(workdir, split)
        cps, cl = samples.chunks_per_sample, samples.chunk_length
        for s in range(len(samples)):
            query_texts += chunk_texts(GPTTokenizerSpec(), list(samples.tokens(s)[: cps * cl].reshape(cps, cl)))
    bert = get_bert_tokenizer()
    return bert.encode_for_model(db_texts, 256), bert.encode_for_model(query_texts, 256)


# Query chunks the saved neighbours' recall is measured on (of the ~16,000 of the train split).
RECALL_QUERIES = 2000


def neighbor_recalls(fp32: Path, others: list[Path], n: int = RECALL_QUERIES, seed: int = 0) -> list[float]:
    """recall@10 of each workdir's saved neighbours against exact search on the fp32 embeddings."""
    from retro_dask.build import recorded_config
    from retro_dask.formats import zarr_blocks
    from retro_dask.formats.sample_maps import Samples
    from retro_dask.formats.workdir import embeddings_path, neighbors_path
    from retro_dask.plan.chunks import doc_key, lookup_documents
    from retro_dask.stages.query import document_lookup, filter_neighbors
    from retro_dask.stages.recall import RECALL_AT, _embed_tokens, exact_knn, recall_at

    config = recorded_config(fp32)
    samples = Samples(fp32, "train")
    nb = zarr_blocks.open_read(neighbors_path(fp32, "train"))
    rows = np.sort(np.random.default_rng(seed).choice(nb.shape[0], size=min(n, nb.shape[0]), replace=False))
    cps, cl = samples.chunks_per_sample, samples.chunk_length
    tokens, pair_s, pair_k = [], [], []
    for local, r in enumerate(rows):
        s, c = divmod(int(r), cps)
        tokens.append(samples.tokens(s)[c * cl : (c + 1) * cl])
        k, docs = samples.documents(s)
        keys = np.unique(doc_key(k, docs))
        pair_s.append(np.full(len(keys), local))
        pair_k.append(keys)
    x = _embed_tokens(config.embed, config.chunk.gpt_spec(), tokens)
    _, truth = exact_knn(str(embeddings_path(fp32)), x, config.query.num_neighbors_query, True)
    first, keys = document_lookup(str(fp32))
    truth = filter_neighbors(truth, lookup_documents(first, keys, truth), np.arange(len(rows)),
                             np.concatenate(pair_s), np.concatenate(pair_k), RECALL_AT)
    out = []
    for w in [fp32, *others]:
        saved = zarr_blocks.open_read(neighbors_path(w, "train")).get_orthogonal_selection((rows, slice(None)))
        out.append(recall_at(saved, truth))
    return out


def extra_notes(tmp: Path, runs: dict, baseline_wall: float) -> list[str]:
    """For each extra run: the backend it ran, its speed against the fp32 baseline, its recall against the
    fp32 run's and the cosines of its database embeddings to the fp32 run's."""
    import zarr

    keys = list(runs)
    folders = [tmp / f"x-{b}-{d}" for b, d in keys]
    recalls = neighbor_recalls(tmp / "fp32", folders)
    ref = zarr.open_array(str(tmp / "fp32" / "db" / "embeddings.zarr"), mode="r")[:].astype(np.float32)
    notes = []
    for (backend, dtype), folder, recall in zip(keys, folders, recalls[1:]):
        picked = json.loads((folder / "config.json").read_text())["embed"]["backend"]
        x = zarr.open_array(str(folder / "db" / "embeddings.zarr"), mode="r")[:].astype(np.float32)
        c = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
        diff = recalls[0] - recall
        notes.append(f"--embed-backend {backend} --embed-dtype {dtype}"
                     + (f" (auto picked {picked})" if backend == "auto" else "")
                     + f": {baseline_wall / runs[(backend, dtype)]['wall']:.2f}x faster than the fp32 baseline; "
                     f"recall@10 of the saved neighbours {recall:.4f} against fp32's {recalls[0]:.4f} (difference "
                     f"{diff:+.4f}: {'within' if abs(diff) <= 0.01 else 'NOT within'} 0.01); cosine of its database "
                     f"embeddings to fp32's: mean {c.mean():.6f}, p1 {np.percentile(c, 1):.6f}, min {c.min():.6f}")
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--record", action="store_true")
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--docs", type=int, default=None, help="only the first N sample documents (a quick check)")
    p.add_argument("--embed-backend", default=None, help="one more pipeline run with this backend (torch, onnx, "
                   "openvino, auto), compared with the fp32 run")
    p.add_argument("--embed-dtype", default="fp32", help="the dtype of the --embed-backend run (fp32, bf16, int8)")
    p.add_argument("--settings", default=None, help="more extra runs: comma-separated BACKEND:DTYPE")
    args = p.parse_args()
    extras = [tuple(x.split(":")) for x in args.settings.split(",")] if args.settings else []
    if args.embed_backend:
        extras.insert(0, (args.embed_backend, args.embed_dtype))
    tmp = Path(tempfile.mkdtemp(prefix="retro-e2e-bench-"))
    try:
        prefix = sample_corpus(tmp, args.docs)
        run32 = pipeline(tmp / "fp32", prefix, "fp32")
        print(f"pipeline fp32: {run32['wall']:.1f} s", flush=True)
        factory = run32["stats"]["index-train"]["factory"]
        nprobe = run32["stats"]["query-neighbors"]["nprobe"]
        base = baseline(prefix, factory, nprobe, "fp32")
        print(f"baseline fp32: {base['wall']:.1f} s {json.dumps(base['stages'])}", flush=True)
        db_ids, query_ids = ceiling_ids(tmp / "fp32")
        # The ceiling of each set of chunks apart: query chunks are full 64-token chunks, longer in
        # WordPieces than the database's (which end documents), so they embed more slowly.
        ceil_db = model_ceiling("fp32", db_ids)
        ceil_q = model_ceiling("fp32", query_ids)
        ceiling_seconds = ceil_db["seconds"] + ceil_q["seconds"]
        print(f"ceiling fp32: {ceil_db['chunks_per_s']:.1f} chunks/s (database), {ceil_q['chunks_per_s']:.1f} "
              "(queries)", flush=True)
        run16 = None
        if not args.skip_bf16:
            run16 = pipeline(tmp / "bf16", prefix, "bf16")
            print(f"pipeline bf16: {run16['wall']:.1f} s", flush=True)
        runs_extra = {}
        for backend, dtype in extras:
            runs_extra[(backend, dtype)] = pipeline(tmp / f"x-{backend}-{dtype}", prefix, dtype, backend)
            print(f"pipeline --embed-backend {backend} --embed-dtype {dtype}: "
                  f"{runs_extra[(backend, dtype)]['wall']:.1f} s", flush=True)
        st = run32["stats"]
        n_db = st["embed"]["n_chunks"]
        n_q = st["query-neighbors"]["n_query_chunks"]
        model_chunks = n_db + n_q
        rows = []
        base_stage = {"db-build": base["stages"]["chunk"] + base["stages"]["load"], "embed": base["stages"]["embed"],
                      "index-train": base["stages"]["index-train"], "index-add": base["stages"]["index-add"],
                      "query-neighbors": base["stages"]["query-neighbors"]}
        count = {"db-build": n_db, "embed": n_db, "index-train": n_db, "index-add": n_db, "query-neighbors": n_q}
        for s in STAGES:
            workers = st[s].get("worker_peak_rss_mb") or {}
            ceiling = {"embed": ceil_db, "query-neighbors": ceil_q}.get(s)
            rows.append([s, f"{st[s]['seconds']:.1f}", f"{count[s] / st[s]['seconds']:,.1f}",
                         f"{base_stage[s]:.1f}", f"{st[s]['seconds'] / base_stage[s]:.2f}",
                         f"{count[s] / st[s]['seconds'] / ceiling['chunks_per_s']:.2f}" if ceiling else "-",
                         f"{st[s]['driver_peak_rss_mb']:.0f}", " / ".join(f"{v:.0f}" for v in workers.values()) or "-"])
        rows.append(["total (wall, process start to exit)", f"{run32['wall']:.1f}",
                     f"{model_chunks / run32['wall']:,.1f}", f"{base['wall']:.1f}",
                     f"{run32['wall'] / base['wall']:.2f}", f"{ceiling_seconds / run32['wall']:.2f}",
                     "-", f"baseline peak {base['peak_rss_mb']:.0f}"])
        if run16:
            rows.append(["total, --embed-dtype bf16", f"{run16['wall']:.1f}", f"{model_chunks / run16['wall']:,.1f}",
                         f"{base['wall']:.1f} (fp32)", f"{run16['wall'] / base['wall']:.2f}", "-", "-", "-"])
        for (backend, dtype), run in runs_extra.items():
            rows.append([f"total, --embed-backend {backend} --embed-dtype {dtype}", f"{run['wall']:.1f}",
                         f"{model_chunks / run['wall']:,.1f}", f"{base['wall']:.1f} (fp32)",
                         f"{run['wall'] / base['wall']:.2f}", "-", "-", "-"])
        out = table(rows, ["stage", "pipeline s", "chunks/s", "baseline s", "pipeline/baseline", "pipeline/ceiling",
                           "driver peak MB", "worker peak MB"])
        notes = [f"database chunks: {n_db:,}; query chunks: {n_q:,}; model ceiling (fp32, length-sorted over all "
                 "chunks, batched as the embed stage does, one single-thread process per core): "
                 f"{ceil_db['chunks_per_s']:.1f} chunks/s on the database chunks, {ceil_q['chunks_per_s']:.1f} on "
                 "the query chunks; the total's pipeline/ceiling is "
                 "the ceiling's time for both over the pipeline's wall time",
                 f"index: {factory}, nprobe {nprobe}"]
        q = st["query-neighbors"]
        split_stats = q.get("splits", {})
        q_embed = sum(v.get("embed_seconds_total", 0) for v in split_stats.values())
        q_search = sum(v.get("search_seconds_total", 0) for v in split_stats.values())
        q_filter = sum(v.get("filter_seconds_total", 0) for v in split_stats.values())
        if q_embed:
            notes.append(f"query-neighbors task time: embedding {q_embed:.0f} s, search {q_search:.1f} s, "
                         f"filter {q_filter:.1f} s (summed over workers)")
        tune_path = tmp / "fp32" / "stats" / "tune.json"
        if tune_path.exists():  # the default --query-nprobe auto tunes before query-neighbors
            tune = json.loads(tune_path.read_text())
            reused = sum(v.get("n_reused_total", v.get("n_reused", 0)) for v in split_stats.values())
            notes.append(f"tune (--query-nprobe auto, target recall@10 {tune['target_recall']}): {tune['seconds']:.1f} s "
                         f"= {tune['seconds'] / q['seconds']:.3f} of query-neighbors' {q['seconds']:.1f} s (embedding "
                         f"its {tune['queries']:,} chunks {tune['embed_seconds']:.1f} s, exact search "
                         f"{tune['exact_seconds']:.1f} s); chose nprobe {tune['chosen']['nprobe']} at recall@10 "
                         f"{tune['chosen']['recall_at_10']:.4f}; query-neighbors reused {reused:,} of those embeddings")
        leakage_path = tmp / "fp32" / "stats" / "leakage.json"
        if leakage_path.exists():
            notes.append(f"leakage report (part of --tasks build, not of the baseline): "
                         f"{json.loads(leakage_path.read_text())['seconds']:.1f} s")
        model_share = (st["embed"]["seconds"] + q["seconds"] * q_embed / max(q_embed + q_search + q_filter, 1e-9))
        notes.append(f"share of the wall time not spent embedding: {1 - model_share / run32['wall']:.3f}")
        if run16:
            r32, r16 = neighbor_recalls(tmp / "fp32", [tmp / "bf16"])
            notes.append(f"recall@10 of the saved neighbours ({RECALL_QUERIES} train query chunks, exact fp32 search, same filter): "
                         f"fp32 {r32:.4f}, bf16 {r16:.4f} (difference {r32 - r16:+.4f})")
            notes.append(f"bf16 build vs fp32 baseline: {base['wall'] / run16['wall']:.2f}x faster")
        if runs_extra:
            notes += extra_notes(tmp, runs_extra, base["wall"])
        text = out + "\n\n" + "\n".join(f"- {n}" for n in notes)
        print(f"\nend to end on the sample corpus, {machine()}\n")
        print(text)
        if args.record:
            record_results("end to end: sample corpus", text, "python benchmarks/e2e.py --record")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
