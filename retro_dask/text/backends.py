"""Which forward pass the embedder runs, and ``auto``: the fastest one on this CPU that keeps the quality bar.

A backend replaces only BERT's forward pass ``(input_ids, attention_mask) ->
last hidden states``; tokenization, length batching and pooling stay the
Embedder's. ``torch`` is the eager model (``bert_encoder``), on a GPU where
there is one; ``onnx`` and ``openvino`` run the graph exported once from the
local model directory (``graph_export``) on the CPU.

:func:`choose_backend` is what ``--embed-backend auto`` runs once, at a
workdir's first run, on a worker (the CPU that will embed): it loads each
installed backend that runs the asked ``embed_dtype``, embeds the same probe
chunks of the packaged sample corpus with each (batched as the stage batches,
with the worker's threads), and picks the fastest whose embeddings meet the
bar against eager fp32: cosine >= ``FP32_MIN_COSINE`` on every chunk for fp32,
a mean cosine >= ``LOSSY_MIN_MEAN_COSINE`` for a lossy dtype. The build records
the pick in ``config.json`` (a rerun and every worker use the same) and the
reason and figures in ``W/stats/embed_backend.json``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace
from typing import Any, Callable

from ..config import BACKEND_DTYPES, EmbedConfig
from ..errors import RetroError
from .graph_export import FAST_EXTRA, cosines

BACKENDS = ("torch", "onnx", "openvino")
FP32_MIN_COSINE = 0.9999
LOSSY_MIN_MEAN_COSINE = 0.999
PROBE_CHUNKS = 128
# Packages a backend needs: to run the graph, and to export it (the export is cached per user).
NEEDS = {"torch": ("torch",), "onnx": ("onnxruntime", "onnx", "onnxscript"),
         "openvino": ("openvino", "onnx", "onnxscript")}


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (the pip install that fixes it), or None."""
    absent = [m for m in NEEDS[backend] if importlib.util.find_spec(m) is None]
    return f"not installed: {FAST_EXTRA} (or pip install {' '.join(absent)})" if absent else None


def load_forward(backend: str, model_dir: str, dtype: str, device, threads: int) -> Callable:
    """The forward pass ``(input_ids, attention_mask) -> hidden states`` of ``backend`` for ``dtype``."""
    if backend == "torch":
        import torch

        from .bert_encoder import load_bert_encoder

        return load_bert_encoder(model_dir, device, {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                     "fp16": torch.float16}[dtype])
    if backend == "onnx":
        from .onnx_backend import load_onnx_encoder

        return load_onnx_encoder(model_dir, dtype, threads)
    if backend == "openvino":
        from .openvino_backend import load_openvino_encoder

        return load_openvino_encoder(model_dir, dtype, threads)
    raise RetroError(f"--embed-backend {backend!r} must be resolved before a model is loaded (auto -> one of "
                     f"{', '.join(BACKENDS)})")


def prepare_graph(backend: str, model_dir: str, dtype: str) -> None:
    """Export (and quantize) the graph ``backend`` runs for ``dtype`` into the cache, without running it."""
    if backend == "onnx":
        from .onnx_backend import ort_graph

        ort_graph(model_dir, dtype)
    elif backend == "openvino":
        from .openvino_backend import ov_graph

        ov_graph(model_dir, dtype)


def meets_bar(dtype: str, figures: dict[str, float]) -> bool:
    if dtype == "fp32":
        return figures["cosine_min"] >= FP32_MIN_COSINE
    return figures["cosine_mean"] >= LOSSY_MIN_MEAN_COSINE


def choose_backend(config: EmbedConfig, make_embedder: Callable, device: str = "cpu", threads: int | None = None,
                   n_chunks: int = PROBE_CHUNKS, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the backends that run ``config.embed_dtype`` here; return the pick, the reason and the figures.

    ``make_embedder(config, device, threads)`` builds an Embedder (``embedder.choose_here`` passes the
    class: this module only runs the models it is handed); ``device`` is where this process embeds.
    """
    from ..engine.process_env import worker_threads
    from ..formats.faiss_index import cpu_flags
    from .bert import default_bert_dir
    from .graph_export import probe_ids

    if device != "cpu":
        if config.embed_dtype not in BACKEND_DTYPES["torch"]:
            raise RetroError(f"--embed-dtype {config.embed_dtype} runs only on the exported CPU backends, and this "
                             f"worker embeds on {device}: use --embed-dtype bf16 or fp16 on a GPU")
        return {"backend": "torch", "reason": f"this worker embeds on {device}; the exported graphs run on CPUs only",
                "figures": {}, "skipped": {}}
    threads = threads or worker_threads()
    candidates = [b for b in BACKENDS if config.embed_dtype in BACKEND_DTYPES[b]]
    skipped = {b: why for b in candidates if (why := missing(b))}
    model_dir = os.path.abspath(config.bert_model) if config.bert_model else default_bert_dir()
    ids = probe_ids(model_dir, n_chunks, seed=0, max_length=config.max_chunk_length)
    reference = make_embedder(replace(config, backend="torch", embed_dtype="fp32"), "cpu", threads)
    want = reference.embed_ids(ids)
    figures: dict[str, dict[str, float]] = {}
    for backend in candidates:
        if backend in skipped:
            continue
        try:
            embedder = reference if (backend, config.embed_dtype) == ("torch", "fp32") else \
                make_embedder(replace(config, backend=backend), "cpu", threads)
            embedder.embed_ids(ids[:16])  # the first calls compile kernels
            best, got = float("inf"), None
            for _ in range(2):
                t0 = time.perf_counter()
                got = embedder.embed_ids(ids)
                best = min(best, time.perf_counter() - t0)
        except (RetroError, RuntimeError, OSError) as exc:
            skipped[backend] = f"failed here: {str(exc).splitlines()[0][:300]}"
            continue
        cos = cosines(got, want)
        figures[backend] = {"chunks_per_s": round(len(ids) / best, 1), "cosine_min": round(float(cos.min()), 6),
                            "cosine_mean": round(float(cos.mean()), 6)}
        if log:
            log(f"  {backend} {config.embed_dtype}: {figures[backend]}")
    good = [b for b in figures if meets_bar(config.embed_dtype, figures[b])]
    bar = (f"cosine >= {FP32_MIN_COSINE} to eager fp32 on every probe chunk" if config.embed_dtype == "fp32"
           else f"mean cosine >= {LOSSY_MIN_MEAN_COSINE} to eager fp32")
    rates = ", ".join(f"{b} {f['chunks_per_s']} chunks/s (cosine min {f['cosine_min']}, mean {f['cosine_mean']})"
                      for b, f in sorted(figures.items(), key=lambda kv: -kv[1]["chunks_per_s"]))
    where = f"{cpu_name()} ({'VNNI' if {'avx512_vnni', 'avx_vnni'} & cpu_flags() else 'no VNNI'}), {threads} thread(s)"
    if good:
        pick = max(good, key=lambda b: figures[b]["chunks_per_s"])
        reason = f"fastest {config.embed_dtype} backend that meets the bar ({bar}) on {where}, {len(ids)} probe chunks: {rates}"
    elif figures:
        pick = max(figures, key=lambda b: figures[b]["cosine_mean"])
        reason = f"no backend met the bar ({bar}) on {where}; the most accurate is kept: {rates}"
    else:
        raise RetroError(f"--embed-backend auto: no backend runs --embed-dtype {config.embed_dtype} here: "
                         + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
    if skipped:
        reason += "; not measured: " + "; ".join(f"{b} ({why})" for b, why in skipped.items())
    return {"backend": pick, "reason": reason, "figures": figures, "skipped": skipped, "cpu": cpu_name(),
            "threads": threads, "embed_dtype": config.embed_dtype}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
