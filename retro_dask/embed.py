"""embed: BERT embeddings of chunks, computed inside the Dask workers.

Reads ``db/chunks.zarr`` and the corpora's tokens; writes ``db/embeddings.zarr``
(float ``[n_chunks, d]``, row i embeds chunks.zarr row i, one Zarr chunk per
block). The same ``Embedder`` embeds the pretraining query chunks and serves
``embed_texts`` to notebooks.

A chunk's text is the GPT detokenization of its tokens; it is WordPiece
tokenized with [CLS] and [SEP], truncated to ``max_chunk_length``; the
embedding is the mean of the last hidden states over the WordPiece tokens,
[CLS] and [SEP] excluded (Megatron's pooling).

The model is loaded once per worker process (``get_embedder`` caches it by
config; ``bert_encoder`` runs it without importing transformers) and never
travels in the task graph; only the small frozen
``EmbedConfig`` does. Within a block, chunks are sorted by length so batches
carry little padding; results go back in row order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import arrays
from .config import EmbedConfig
from .errors import InputError
from .plan import length_batches
from .runner import block_record, worker_threads
from .tokenizer import BertTokenizerSpec, GPTTokenizerSpec, default_bert_dir, get_bert_tokenizer, get_gpt_tokenizer
from .workdir import chunks_path, embeddings_path

CPU_BATCH = 64
GPU_BATCH = 1024
# CPU batching (plan.length_batches): a model call costs about as much as 190
# padded tokens of all-MiniLM-L6-v2 on this kind of CPU (measured: batches of
# 32, 64 and 128 length-sorted chunks), and a batch's largest activation
# (tokens x intermediate size x 4 bytes) stays under glibc's 32 MiB mmap
# ceiling, beyond which every batch would page-fault its activations in again.
CPU_BATCH_COST_TOKENS = 190
CPU_MAX_BATCH = 128
ACTIVATION_BYTES = 30 << 20


def bert_dir(model: str | None) -> str:
    return os.path.abspath(model) if model else default_bert_dir()


def check_bert_dir(model: str | None) -> dict[str, Any]:
    """Check that ``model`` is a local BERT directory; return its config.json.

    Raises an InputError naming the directory and what is wrong with it.
    """
    path = Path(bert_dir(model))
    if not path.is_dir():
        raise InputError(f"--bert-model {path}: no such directory; give a local Hugging Face BERT directory "
                         "(config.json, model.safetensors, tokenizer files) or leave it out for all-MiniLM-L6-v2")
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--bert-model {path}: cannot read {cfg_file} ({exc}); is this a Hugging Face model directory?") from None
    if cfg.get("model_type") != "bert":
        raise InputError(f"--bert-model {path} is not a BERT model: {cfg_file} says model_type "
                         f"{cfg.get('model_type')!r}, not 'bert'")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"--bert-model {path} has no *.safetensors weights: retro-dask loads weights only from "
                         "safetensors (never with pickle); convert the checkpoint to safetensors")
    get_bert_tokenizer(BertTokenizerSpec(str(path)))  # raises if the tokenizer files are missing
    return cfg


def embedding_dim(model: str | None) -> int:
    return int(check_bert_dir(model)["hidden_size"])


def _torch():
    import torch

    return torch


def native_half_precision(dtype) -> bool:
    """Whether oneDNN has kernels for ``dtype`` (bf16 or fp16) on this CPU (AVX-512 and up; AMX is fastest).

    Without them the type is emulated: all-MiniLM-L6-v2's linear layers ran
    ~5x slower in bf16 than in fp32 on an AVX2-only EPYC (RESULTS.md). Unknown
    (a torch without the probe) counts as native.
    """
    torch = _torch()
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return probe is None or bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def default_device() -> str:
    """Where this process runs BERT: ``RETRO_DASK_DEVICE`` if set, else

    - a Dask worker uses its GPU only if it is a CUDA worker (started by
      dask-cuda: ``LocalCUDACluster`` or ``dask cuda worker``, one per GPU), so
      that the many CPU workers of a plain cluster on a GPU machine do not all
      crowd onto one GPU;
    - any other process (synchronous runs, notebooks) uses a GPU if there is one.
    """
    import sys

    forced = os.environ.get("RETRO_DASK_DEVICE")
    if forced:
        return forced
    torch = _torch()
    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return "cuda"
    return "cuda" if "dask_cuda" in sys.modules else "cpu"


class Embedder:
    """A frozen BERT on one device, turning WordPiece id lists into pooled embeddings."""

    def __init__(self, config: EmbedConfig, device: str | None = None, threads: int | None = None):
        torch = _torch()
        from .bert_encoder import load_bert_encoder

        self.config = config
        self.model_dir = bert_dir(config.bert_model)
        if device is None:
            device = default_device()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            from .cluster import MODEL_ENV, tune_allocator

            tune_allocator()

            for key, value in MODEL_ENV.items():  # read when oneDNN makes its first primitive
                os.environ.setdefault(key, value)
            # Decided on purpose: a Dask worker's thread count (1 in the default
            # cluster, one worker per core), or every core in a plain process.
            torch.set_num_threads(threads or worker_threads())
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.embed_dtype]
        if self.device.type == "cpu" and not native_half_precision(dtype):
            logging.getLogger(__name__).warning(
                "--embed-dtype %s: this CPU (%s) has no native %s matmul, so it is emulated and runs several "
                "times slower than fp32; use --embed-dtype fp32 here", config.embed_dtype,
                torch.backends.cpu.get_cpu_capability(), config.embed_dtype)
        model_config = check_bert_dir(self.model_dir)
        self.model = load_bert_encoder(self.model_dir, self.device, dtype)
        self.dim = int(model_config["hidden_size"])
        self.tokenizer = get_bert_tokenizer(BertTokenizerSpec(self.model_dir))
        self.batch_size = GPU_BATCH if self.device.type == "cuda" else CPU_BATCH
        element = 2 if config.embed_dtype in ("bf16", "fp16") else 4
        self.max_tokens = max(256, ACTIVATION_BYTES // (int(model_config["intermediate_size"]) * element))
        self.lock = threading.Lock()

    def embed_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None,
                  counts: dict[str, int] | None = None) -> np.ndarray:
        """Embeddings (float32 ``[n, d]``) of [CLS] ... [SEP] id lists, in input order.

        ``counts``, if given, gets ``tokens`` (real) and ``padded`` (fed to the
        model, padding included) added to it.
        """
        torch = _torch()
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        with self.lock, torch.inference_mode():
            for sel in self.batches(lengths, batch_size):
                input_ids, attention = self.padded_batch(ids, lengths, sel)
                if counts is not None:
                    counts["tokens"] = counts.get("tokens", 0) + int(lengths[sel].sum())
                    counts["padded"] = counts.get("padded", 0) + input_ids.numel()
                hidden = self.model(input_ids, attention)
                # Pool over WordPiece tokens only: drop [CLS] (position 0) and [SEP] (last real token).
                pool = attention.clone()
                pool[:, 0] = 0
                pool[torch.arange(len(sel), device=self.device), torch.from_numpy(lengths[sel] - 1).to(self.device)] = 0
                pool = pool.to(hidden.dtype).unsqueeze(-1)
                summed = (hidden * pool).sum(dim=1, dtype=torch.float32)
                count = pool.sum(dim=1, dtype=torch.float32).clamp(min=1.0)
                out[sel] = (summed / count).cpu().numpy()
        return out

    def padded_batch(self, ids: Sequence[Sequence[int]], lengths: np.ndarray, sel: np.ndarray):
        """The model's inputs for the items ``sel`` of ``ids``: right-padded token ids and attention mask, on the device."""
        torch = _torch()
        width = int(lengths[sel].max())
        batch = np.full((len(sel), width), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        for r, i in enumerate(sel):
            batch[r, : lengths[i]] = ids[i]
            mask[r, : lengths[i]] = 1
        return torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)

    def batches(self, lengths: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        """Index arrays of the batches, by length. A given batch size means fixed, length-sorted batches."""
        if batch_size or self.device.type != "cpu":
            bs = batch_size or self.batch_size
            order = np.argsort(lengths, kind="stable")
            return [order[lo : lo + bs] for lo in range(0, len(order), bs)]
        return length_batches(lengths, CPU_MAX_BATCH, CPU_BATCH_COST_TOKENS, self.max_tokens)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        ids = self.tokenizer.encode_for_model(list(texts), self.config.max_chunk_length, num_threads=1)
        return self.embed_ids(ids, batch_size)


@functools.lru_cache(maxsize=4)
def get_embedder(config: EmbedConfig, device: str | None = None) -> Embedder:
    """This process's Embedder for ``config``: the model is loaded once per worker."""
    return Embedder(config, device)


def embed_texts(texts: Sequence[str], config: EmbedConfig | None = None) -> np.ndarray:
    """Embed strings with the configured BERT (for notebooks and ad-hoc queries)."""
    return get_embedder(config or EmbedConfig()).embed_texts(list(texts))


def chunk_texts(gpt_spec: GPTTokenizerSpec, token_arrays: Sequence[np.ndarray]) -> list[str]:
    """GPT detokenization of chunks; end-of-document tokens inside a chunk are dropped.

    Database chunks never hold one (db-build trims it); a pretraining sample's
    chunk can span a document boundary, and the marker is not text.
    """
    gpt = get_gpt_tokenizer(gpt_spec)
    return [gpt.decode(t[t != gpt.eod] if len(t) and (t == gpt.eod).any() else t) for t in token_arrays]


def compute_embeddings(workdir: str, config: EmbedConfig, gpt: GPTTokenizerSpec, prefixes: tuple[str, ...],
                       block: int, batch_size: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One block of embeddings.zarr (in the stored dtype) and the block's timings."""
    from .db import chunk_texts_of_rows, release_dataset_pages

    t0 = time.perf_counter()
    rows = arrays.read_block(chunks_path(workdir), block)
    embedder = get_embedder(config)
    t_load = time.perf_counter()
    # The text db-build measured the BERT length of (a trailing end-of-document token trimmed).
    texts = chunk_texts_of_rows(get_gpt_tokenizer(gpt), prefixes, rows)
    release_dataset_pages(prefixes)
    ids = embedder.tokenizer.encode_for_model(texts, config.max_chunk_length, num_threads=1)
    t_tok = time.perf_counter()
    counts: dict[str, int] = {}
    emb = embedder.embed_ids(ids, batch_size, counts)
    t_model = time.perf_counter()
    timings = dict(load_seconds=round(t_load - t0, 4), tokenize_seconds=round(t_tok - t_load, 4),
                   model_seconds=round(t_model - t_tok, 4), n_wordpieces=counts.get("tokens", 0),
                   n_padded=counts.get("padded", 0), device=str(embedder.device))
    return emb.astype(config.store_dtype, copy=False), timings


def embed_block_task(workdir: str, config: EmbedConfig, gpt: GPTTokenizerSpec, prefixes: tuple[str, ...],
                     block: int, batch_size: int | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    emb, timings = compute_embeddings(workdir, config, gpt, prefixes, block, batch_size)
    record = block_record(len(emb), t0, **timings)
    return arrays.write_block(workdir, "embed", embeddings_path(workdir), block, emb, record)


def build_embeddings(runner, config, log=print) -> dict[str, Any]:
    """Run the embed stage over every block of chunks.zarr; resumes from finished blocks."""
    import dask

    w = runner.workdir
    t0 = time.perf_counter()
    chunks = arrays.open_read(chunks_path(w))
    n, B = chunks.shape[0], chunks.chunks[0]
    dim = embedding_dim(config.embed.bert_model)
    arrays.create(embeddings_path(w), (n, dim), config.embed.store_dtype, B, compressed=False, fill_value=0.0)
    from .db import gpt_spec

    gpt = gpt_spec(config)
    prefixes = tuple(config.chunk.data.prefixes)
    batch = runner.embed_batch_size
    result = runner.run_blocks(
        "embed", -(-n // B),
        lambda b: dask.delayed(embed_block_task, pure=False)(w, config.embed, gpt, prefixes, b, batch),
        desc="embed", unit="chunks",
    )
    from .workdir import mark_stage_done

    mark_stage_done(w, "embed", {"n_chunks": n, "dim": dim})
    seconds = time.perf_counter() - t0
    model_s = result.total("model_seconds")
    return runner.write_stats(
        "embed", result, seconds, n_chunks=n, dim=dim, embed_dtype=config.embed.embed_dtype,
        chunks_per_s=round(result.total("n_rows") / max(result.seconds, 1e-9), 2),
        model_seconds_total=round(model_s, 2), tokenize_seconds_total=round(result.total("tokenize_seconds"), 2),
        wordpieces=int(result.total("n_wordpieces")),
        padding_share=round(1 - result.total("n_wordpieces") / max(result.total("n_padded"), 1), 4),
    )
