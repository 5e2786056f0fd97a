#!/usr/bin/env python
"""Cost model: what a build of 1B, 100B and 2T tokens costs, from the rates of every stage measured here.

Rates come from one finished build's ``W/stats/*.json`` (``--workdir W``), or
from a build of the sample corpus that this script runs first (``scripts/build.py
--tasks build``, with ``--embed-backend`` / ``--embed-dtype``). Each stage's
rate becomes core-seconds per unit of its work (workers x seconds / units; the
embedded cluster runs one single-thread worker per core; index-train runs in
one task on every core of its machine):

- db-build, embed: per database chunk;
- index-train: per (training chunk x list x dimension), Faiss's k-means;
- index-add: per (chunk x distance computation x dimension): coarse assignment
  (``nlist`` distances with a flat quantizer, ``HNSW_DISTANCES`` with HNSW32)
  plus the encoding (PQ: 256 distances per sub-vector, OPQ: a rotation);
- query-neighbors: embedding per query chunk (its own measured share), and the
  search per scanned code (``nprobe x n / nlist`` codes a query; a flat code
  costs ``d`` multiply-adds, a PQ code ``m`` table look-ups), plus the coarse
  search as in index-add.

GPU-hours of the embedding: a one-thread dask-cuda worker per GPU, so each chunk
costs the GPU's forward pass plus the worker's own detokenization and WordPiece
(measured here, per chunk).

For each size it prints core-hours per stage (and GPU-hours of the embedding
on a GPU: the figure measured by ``gpu_bench.py`` where ``benchmarks/RESULTS.md``
holds one, else a FLOP estimate, marked as such), the wall hours on 8, 64 and
512 single-core workers (index-train on one machine of ``--train-cores``), the
index ``--index-str auto`` picks for the database with its size in RAM and on
disk, and the disk the Zarr arrays take. Every assumption is printed, one a line.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cost_model.py [--workdir W | --docs N --embed-backend auto]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, record_results, sample_corpus, table

SIZES = {"1B": 1e9, "100B": 1e11, "2T": 2e12}
WORKERS = (8, 64, 512)
# HNSW32 coarse quantizer: distances a search or an assignment computes (efSearch 64 x ~32 links).
HNSW_DISTANCES = 64 * 32
NEIGHBORS_SAVED = 20
# H100 SXM dense bf16 peak, and the share a BERT forward pass reaches (an assumption, printed).
GPU_TFLOPS, GPU_MFU = 989.0, 0.30


def run_sample_build(tmp: Path, docs: int | None, backend: str, dtype: str) -> Path:
    prefix = sample_corpus(tmp, docs)
    w = tmp / "w"
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--workdir", str(w), "--tasks", "build",
           "--data-path", "1", prefix, "--embed-backend", backend, "--embed-dtype", dtype, "--no-progress",
           "--dashboard-address", "127.0.0.1:0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return w


def measured_rates(w: Path) -> dict:
    """Core-seconds per unit of each stage's work, from a finished build's stats."""
    stats = {s: json.loads((w / "stats" / f"{s}.json").read_text())
             for s in ("db-build", "embed", "index-train", "index-add", "query-neighbors")}
    config = json.loads((w / "config.json").read_text())
    cores = os.cpu_count() or 1
    workers = max(len(stats["embed"].get("worker_peak_rss_mb") or {}), 1)
    n, d = stats["embed"]["n_chunks"], stats["embed"]["dim"]
    train = stats["index-train"]
    core = train["factory"].removeprefix("L2norm,")
    nlist = int(re.search(r"IVF(\d+)", core).group(1)) if "IVF" in core else 0
    if not nlist or "PQ" in core:
        raise SystemExit(f"{w}: index {core!r}: the model is calibrated on an IVF{{n}},Flat build (the sample "
                         "corpus's auto index); give a larger --docs or another --workdir")
    ntrain = int(json.loads((w / "db" / "infos.json").read_text())[0]["n_chunks_sampled"])
    q = stats["query-neighbors"]
    splits = q.get("splits", {}).values()
    q_embed = sum(s.get("embed_seconds_total", 0.0) for s in splits)
    q_search = sum(s.get("search_seconds_total", 0.0) for s in splits)
    n_q = max(q["n_query_chunks"], 1)
    scanned = q["nprobe"] * n / nlist  # codes a query scans
    return {
        "n": n, "d": d, "nlist": nlist, "workers": workers, "cores": cores, "backend": config["embed"].get("backend"),
        "embed_dtype": config["embed"]["embed_dtype"], "store_dtype": config["embed"]["store_dtype"],
        "chunk_length": config["chunk"]["chunk_length"],
        "wordpieces_per_chunk": stats["embed"].get("n_wordpieces_total", 0) / max(n, 1),
        "db": stats["db-build"]["seconds"] * workers / n,
        "embed": stats["embed"]["seconds"] * workers / n,
        # Detokenization + WordPiece a chunk: what a one-thread GPU worker does on its CPU before the GPU.
        "host_prep": stats["embed"].get("tokenize_seconds_total", 0.0) / n,
        "train": train["seconds"] * cores / (ntrain * nlist * d),
        "add": stats["index-add"]["seconds"] * workers / (n * (nlist + 1) * d),
        "query_embed": q_embed / n_q,
        "search": q_search / (n_q * (scanned + nlist) * d),
        "measured_nprobe": q["nprobe"],
        # The share of the lists that --query-nprobe auto (the default) probed to reach its recall target here.
        "probed_share": q["nprobe"] / nlist,
    }


def gpu_embed_rate(r: dict, results_md: Path) -> tuple[float, str]:
    """Database chunks/s of one GPU: gpu_bench.py's MiniLM bf16 figure in RESULTS.md, else a FLOP estimate."""
    if results_md.exists():
        for line in results_md.read_text().splitlines():
            m = re.match(r"\|\s*minilm[^|]*\|\s*bf16\s*\|\s*\d+\s*\|\s*([\d,]+)\s*\|\s*[\d,]+\s*\|\s*([\d,]+)\s*\|", line)
            if m:
                rate = float(m.group(2).replace(",", ""))
                return rate, f"measured: gpu_bench.py's one-thread-worker estimate for MiniLM bf16 in RESULTS.md ({rate:,.0f} chunks/s)"
    from retro_dask.text.bert import default_bert_dir

    cfg = json.loads((Path(default_bert_dir()) / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    length = r["wordpieces_per_chunk"] or 80.0
    flops = (2 * (4 * h * h + 2 * h * i) * length + 4 * length * length * h) * layers
    rate = GPU_TFLOPS * 1e12 * GPU_MFU / flops
    return rate, (f"FLOP ESTIMATE (no GPU figure in RESULTS.md): {flops / 1e9:.2f} GFLOP a chunk "
                  f"({length:.0f} WordPieces), an H100 at {GPU_TFLOPS:.0f} TFLOP/s bf16 x {GPU_MFU:.0%} -> {rate:,.0f} chunks/s")


def index_sizes(core: str, n: float, d: int, nlist: int) -> tuple[float, float]:
    """Bytes of the final index in RAM and on disk (codes + ids + centroids + HNSW links + OPQ)."""
    if core == "Flat":
        b = n * 4 * d
        return b, b
    m = re.search(r"PQ(\d+)$", core)
    code = int(m.group(1)) if m else 4 * d
    b = n * (code + 8) + nlist * d * 4
    if "HNSW" in core:
        b += nlist * 32 * 2 * 4  # two levels of 32 links on average
    if core.startswith("OPQ"):
        b += d * d * 4
    return b, b


def model(r: dict, tokens: float, args, gpu_rate: float) -> dict:
    from retro_dask.plan.index import default_ntrain, nlist_of, plan_index

    n = tokens / r["chunk_length"]
    q = n * args.query_ratio
    d = r["d"]
    plan = plan_index("auto", "cosine", int(n), d, args.index_memory, None)
    core, nlist = plan.core, nlist_of(plan.core)
    ntrain = default_ntrain(core, int(n))
    pq = re.search(r"PQ(\d+)$", core)
    code_m = int(pq.group(1)) if pq else 0
    coarse = HNSW_DISTANCES if "HNSW" in core else nlist
    encode = (256 + (4 * code_m if core.startswith("OPQ") else 0)) if pq else 1
    nprobe = args.nprobe or min(nlist, max(16, round(nlist * r["probed_share"])))
    # A flat code costs d multiply-adds; a PQ code m look-ups (counted as m / d of a flat one).
    scan = nprobe * n / max(nlist, 1) * (code_m / d if pq else 1.0)
    core_s = {
        "db-build": r["db"] * n,
        "embed": r["embed"] * n,
        "index-train": r["train"] * ntrain * nlist * d,
        "index-add": r["add"] * n * (coarse + encode) * d,
        "query-neighbors (embed)": r["query_embed"] * q,
        "query-neighbors (search)": r["search"] * q * (scan + coarse) * d,
    }
    ram, disk = index_sizes(core, n, d, nlist)
    elem = 4 if r["store_dtype"] == "float32" else 2
    zarr = {"chunks.zarr": n * 5 * 8, "candidates.zarr": n * 4 * 8, "embeddings.zarr": n * d * elem,
            "sampled.zarr": ntrain * 8, "neighbors.zarr (all splits)": q * NEIGHBORS_SAVED * 8}
    return {"n": n, "q": q, "core": core, "nlist": nlist, "nprobe": nprobe, "ntrain": ntrain, "core_s": core_s,
            "gpu_embed_hours": (n + q) * (1 / gpu_rate + r["host_prep"]) / 3600, "index_ram": ram, "index_disk": disk, "zarr": zarr}


def wall_hours(m: dict, workers: int, train_cores: int) -> float:
    parallel = sum(v for k, v in m["core_s"].items() if k != "index-train")
    return (parallel / workers + m["core_s"]["index-train"] / min(train_cores, workers)) / 3600


def human_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} EB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--workdir", default=None, help="a finished build to read the rates from (default: build the sample corpus)")
    p.add_argument("--docs", type=int, default=None, help="documents of the sample corpus to build (default: all)")
    p.add_argument("--embed-backend", default="torch", help="backend of the sample build (torch, onnx, openvino, auto)")
    p.add_argument("--embed-dtype", default="fp32", help="dtype of the sample build")
    p.add_argument("--query-ratio", type=float, default=1.0,
                   help="query chunks per database chunk (1: the pretraining set is the retrieval corpus, as RETRO's)")
    p.add_argument("--index-memory", type=float, default=8e9, help="--index-memory of the modelled builds (bytes)")
    p.add_argument("--nprobe", type=int, default=None, help="lists probed per query (default: the share of the lists the measured build's tuned nprobe probed)")
    p.add_argument("--train-cores", type=int, default=16, help="cores of the machine that trains the index")
    p.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="retro-cost-") as tmp:
        w = Path(args.workdir) if args.workdir else run_sample_build(Path(tmp), args.docs, args.embed_backend, args.embed_dtype)
        r = measured_rates(w)
    gpu_rate, gpu_note = gpu_embed_rate(r, ROOT / "benchmarks" / "RESULTS.md")
    sections = []
    for label, tokens in SIZES.items():
        m = model(r, tokens, args, gpu_rate)
        rows = [[k, f"{v / 3600:,.1f}"] for k, v in m["core_s"].items()]
        rows.append(["total", f"{sum(m['core_s'].values()) / 3600:,.1f}"])
        walls = ", ".join(f"{wk} workers {wall_hours(m, wk, args.train_cores):,.1f} h" for wk in WORKERS)
        zarr = ", ".join(f"{k} {human_bytes(v)}" for k, v in m["zarr"].items())
        sections.append(
            f"### {label} tokens: {m['n']:,.0f} database chunks, {m['q']:,.0f} query chunks\n\n"
            + table(rows, ["stage", "core-hours"]) + "\n\n"
            f"- embedding on GPUs instead: {m['gpu_embed_hours']:,.2f} GPU-hours (database + query chunks, one "
            f"single-thread worker a GPU)\n"
            f"- wall: {walls}\n"
            f"- index (--index-str auto, --index-memory {human_bytes(args.index_memory)}): {m['core']}, "
            f"nlist {m['nlist']:,}, trained on {m['ntrain']:,} chunks, nprobe {m['nprobe']:,}; "
            f"{human_bytes(m['index_ram'])} in RAM, {human_bytes(m['index_disk'])} on disk\n"
            f"- Zarr arrays: {zarr}; total {human_bytes(sum(m['zarr'].values()))}\n")
    assumptions = [
        f"rates measured on {machine()}: {r['n']:,} database chunks, {r['d']}-d, IVF{r['nlist']},Flat, "
        f"--embed-backend {r['backend']} --embed-dtype {r['embed_dtype']}, {r['workers']} single-thread workers",
        f"core-seconds a database chunk: db-build {r['db'] * 1e3:.3f} ms, embed {r['embed'] * 1e3:.2f} ms; "
        f"a query chunk's embedding {r['query_embed'] * 1e3:.2f} ms",
        f"chunks = tokens / {r['chunk_length']} (every token in a chunk; the split and dropped chunks ignored)",
        f"query chunks = {args.query_ratio} x database chunks (--query-ratio)",
        "db-build, embed, index-add and query-neighbors scale linearly with their chunks and perfectly over workers",
        f"index-train: Faiss k-means, core-seconds proportional to training chunks x lists x d, calibrated on the "
        f"measured IVF{r['nlist']} training; PQ and OPQ training ignored; on one machine of {args.train_cores} cores",
        f"index-add and search: core-seconds proportional to distance computations x d, calibrated on the measured "
        f"flat-quantizer run; an HNSW32 coarse quantizer computes {HNSW_DISTANCES} distances a vector, a PQ encoding "
        "256 a sub-vector, a PQ code scanned costs m/d of a flat vector (table look-ups counted as multiply-adds)",
        "nprobe: " + (f"--nprobe {args.nprobe}" if args.nprobe else f"the share of the lists that the measured build's "
                      f"--query-nprobe auto probed to reach its recall target ({r['measured_nprobe']} of {r['nlist']}), "
                      "at least 16") + "; "
        "the search cost grows with nprobe x n / nlist codes a query: a fixed share of the lists scans a fixed share "
        "of the database a query, so at billions of chunks the search dominates unless that share falls with the "
        "index (tune it there: --tasks tune)",
        f"GPU embedding: {gpu_note}; plus the worker's own detokenization and WordPiece, "
        f"{r['host_prep'] * 1e3:.2f} ms a chunk on one core as measured here (at such GPU rates the CPU side "
        "bounds a one-thread worker)",
        "index size: codes + 8-byte ids + centroids (+ HNSW links, OPQ matrix); the file on disk is the same size",
        f"Zarr: uncompressed, int64 chunks.zarr (5 columns), candidates.zarr (4 columns a candidate, one per chunk "
        f"assumed), {r['store_dtype']} embeddings, {NEIGHBORS_SAVED} int64 neighbours a query chunk",
    ]
    text = "\n".join(sections) + "\nAssumptions:\n\n" + "\n".join(f"- {a}" for a in assumptions)
    print(f"\ncost model, {machine()}\n")
    print(text)
    if args.record:
        record_results("cost model: 1B, 100B and 2T tokens", text, "python benchmarks/cost_model.py --record")


if __name__ == "__main__":
    main()
