"""embed: BERT embeddings of every chunk, as ``map_blocks`` of the chunk boundaries.

:func:`embeddings` turns any lazy array of chunk boundaries (rows of
``db/chunks.zarr``) into a lazy float array ``[n, d]``: each Dask task reads its
chunks' tokens, detokenizes, and runs the model that its worker process loaded
once (``text/embedder.py``; only the frozen ``EmbedConfig`` travels in the
graph). The stage stores it, from ``db/chunks.zarr``, into
``db/embeddings.zarr`` (row i embeds chunks.zarr row i, one Zarr chunk per
block); notebooks use the same function (``retro_dask.embed``).

:func:`resolve_backend` turns ``--embed-backend auto`` into one backend at a
workdir's first run, measured on a worker (``text/backends.py``); the build
records it in ``config.json`` and the reason in ``W/stats/embed_backend.json``,
which ``W/stats/embed.json`` repeats.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from ..config import BuildConfig, EmbedConfig
from ..engine import figures
from ..engine.executor import Executor, StoreJob
from ..engine.targets import ZarrTarget
from ..formats import zarr_blocks
from ..formats.indexed_dataset import release_dataset_pages
from ..formats.workdir import atomic_write_json, chunks_path, embeddings_path, read_json, stats_dir
from ..text.chunk_texts import chunk_texts_of_rows
from ..text.embedder import embedding_dim, get_embedder
from ..text.gpt import GPTTokenizerSpec, get_gpt_tokenizer


def embed_rows(rows: np.ndarray, config: EmbedConfig, gpt: GPTTokenizerSpec, prefixes: tuple[str, ...],
               batch_size: int | None = None) -> np.ndarray:
    """Embeddings (in the stored dtype) of chunks given as chunks.zarr rows."""
    t0 = time.perf_counter()
    embedder = get_embedder(config)
    t_load = time.perf_counter()
    # The text db-build measured the BERT length of (a trailing end-of-document token trimmed).
    texts = chunk_texts_of_rows(get_gpt_tokenizer(gpt), prefixes, np.asarray(rows, np.int64))
    release_dataset_pages(prefixes)
    ids = embedder.tokenizer.encode_for_model(texts, config.max_chunk_length, num_threads=1)
    t_tok = time.perf_counter()
    counts: dict[str, int] = {}
    emb = embedder.embed_ids(ids, batch_size, counts)
    figures.add("embed", n_rows=len(rows), load_seconds=t_load - t0, tokenize_seconds=t_tok - t_load,
                model_seconds=time.perf_counter() - t_tok, n_wordpieces=counts.get("tokens", 0),
                n_padded=counts.get("padded", 0), blocks_on_gpu=int(embedder.on_gpu))
    return emb.astype(config.store_dtype, copy=False)


def embeddings(boundaries, config: EmbedConfig, gpt: GPTTokenizerSpec, prefixes: tuple[str, ...],
               batch_size: int | None = None, dim: int | None = None):
    """The lazy embeddings of a lazy array of chunk boundaries (int64 ``[n, >=4]``: dataset, document,
    start, end), one model call per Dask chunk of it."""
    import dask.array as da
    from dask.base import tokenize

    dim = dim or embedding_dim(config.bert_model)
    boundaries = boundaries.rechunk({1: -1}) if boundaries.ndim == 2 and boundaries.numblocks[1] > 1 else boundaries
    return da.map_blocks(embed_rows, boundaries, config, gpt, tuple(prefixes), batch_size,
                         chunks=(boundaries.chunks[0], (dim,)), dtype=np.dtype(config.store_dtype),
                         name=f"embed-{tokenize(boundaries.name, config, gpt, tuple(prefixes), batch_size)}",
                         meta=np.empty((0, 0), np.dtype(config.store_dtype)))


def embed_job(ex: Executor, config: BuildConfig) -> StoreJob:
    w = ex.workdir
    chunks = zarr_blocks.open_format(chunks_path(w))
    dim = embedding_dim(config.embed.bert_model)
    target = ZarrTarget.create(w, "embed", embeddings_path(w), (chunks.shape[0], dim), config.embed.store_dtype,
                               chunks.block_rows, compressed=False, fill_value=0.0)
    src, gpt, prefixes = str(chunks_path(w)), config.chunk.gpt_spec(), tuple(config.chunk.data.prefixes)

    def expression(lo: int, hi: int):
        return embeddings(zarr_blocks.lazy_rows(src, lo, hi, (hi - lo,), name="read-chunks"), config.embed, gpt,
                          prefixes, ex.embed_batch_size, dim)

    return StoreJob("embed", target, expression)


def backend_choice_path(workdir):
    return stats_dir(workdir) / "embed_backend.json"


def resolve_backend(config: BuildConfig, client, log: Callable[[str], None] = print) -> tuple[BuildConfig, dict]:
    """``config`` with ``--embed-backend auto`` replaced by the backend measured fastest on a worker's CPU
    (on this process without a cluster), and the choice: backend, reason, figures."""
    from ..text.embedder import choose_here

    if config.embed.backend != "auto":
        return config, {"backend": config.embed.backend, "reason": f"--embed-backend {config.embed.backend}"}
    log(f"--embed-backend auto: measuring the backends that run {config.embed.embed_dtype} on "
        f"{'a worker' if client is not None else 'this machine'} (the graph is exported once per model)")
    if client is None:
        choice = choose_here(config.embed, log=log)
    else:
        choice = client.submit(choose_here, config.embed, pure=False).result()
    log(f"--embed-backend auto -> {choice['backend']}: {choice['reason']}")
    return dataclasses.replace(config, embed=dataclasses.replace(config.embed, backend=choice["backend"])), choice


def record_backend_choice(workdir, choice: dict) -> None:
    atomic_write_json(backend_choice_path(workdir), choice)


def build_embeddings(ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    """Store the embeddings of every block of chunks.zarr not yet done."""
    t0 = time.perf_counter()
    job = embed_job(ex, config)
    run = ex.store([job], "embed", unit="chunks")["embed"]
    sums, memory = ex.collect("embed")
    path = backend_choice_path(ex.workdir)
    choice = read_json(path) if path.exists() else {"reason": f"--embed-backend {config.embed.backend}"}
    return ex.write_stats("embed", run, time.perf_counter() - t0, (sums, memory), n_chunks=job.target.shape[0],
                          dim=job.target.shape[1], embed_dtype=config.embed.embed_dtype,
                          backend=config.embed.backend, backend_reason=choice.get("reason"),
                          backend_figures=choice.get("figures", {}),
                          chunks_per_s=round(run.rows / max(run.seconds, 1e-9), 2),
                          padding_share=round(1 - sums.get("n_wordpieces", 0) / max(sums.get("n_padded", 0), 1), 4))


def embed_complete(workdir: str) -> bool:
    try:
        fmt = zarr_blocks.open_format(embeddings_path(workdir))
    except (OSError, ValueError, FileNotFoundError):
        return False
    from ..formats.ledger import Ledger

    return Ledger(workdir, "embed").complete(fmt.n_blocks)
