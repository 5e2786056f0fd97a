"""The embedder: a frozen BERT turning chunk texts into pooled embeddings, loaded once per process.

A chunk's text is WordPiece tokenized with [CLS] and [SEP], truncated to
``max_chunk_length``; its embedding is the mean of the last hidden states over
the WordPiece tokens, [CLS] and [SEP] excluded (Megatron's pooling,
``batch_arrays.py``). :func:`get_embedder` caches the model by its frozen
``EmbedConfig``, so Dask tasks ship only the config. Within a call, texts are
batched by length (``plan/batches.py``) and results come back in order. The
forward pass is the config's backend (``backends.py``): eager torch
(``bert_encoder``), or the exported graph on ONNX Runtime or OpenVINO, which
takes and gives numpy arrays (a process embedding with it never imports torch).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import EmbedConfig
from ..engine.process_env import MODEL_ENV, tune_allocator, worker_threads
from ..errors import InputError
from ..plan.batches import length_batches
from .bert import BertTokenizerSpec, default_bert_dir, get_bert_tokenizer
from .batch_arrays import mean_pool, pad_batch, pool_weights

CPU_BATCH = 64
GPU_BATCH = 1024
# CPU batching (plan/batches.py): a model call costs about as much as 190 padded
# tokens of all-MiniLM-L6-v2, and a batch's largest activation stays under the
# 32 MiB mmap threshold that process_env.tune_allocator sets (RESULTS.md, notes 6 and 12).
CPU_BATCH_COST_TOKENS = 190
CPU_MAX_BATCH = 128
ACTIVATION_BYTES = 30 << 20
# The exported graphs in fp32 and int8 run a token 5-15% faster in batches of ~500-2,000 tokens
# than of 5,000 (their activations stay in the cache), and a call costs them ~40 tokens; bf16
# pays more for each new batch shape and keeps the larger batches (note 34).
GRAPH_BATCH_COST_TOKENS = 40
GRAPH_ACTIVATION_BYTES = 6 << 20


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

    Without them the type is emulated, ~5x slower than fp32 (RESULTS.md). Unknown
    (a torch without the probe) counts as native.
    """
    torch = _torch()
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return probe is None or bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def default_device() -> str:
    """Where this process runs BERT: ``RETRO_DASK_DEVICE`` if set, else a GPU if there is one, except
    in a Dask worker that dask-cuda did not start (the CPU workers of a plain cluster on a GPU machine
    would all crowd onto one GPU)."""
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
    """A frozen BERT on one device, turning WordPiece id lists into pooled embeddings.

    ``config.backend`` picks the forward pass (``backends.py``): eager torch, on
    a GPU where there is one, or the exported graph on the CPU (ONNX Runtime,
    OpenVINO); ``auto`` is measured once in this process (a build resolves it
    before any worker starts, and records it).
    """

    def __init__(self, config: EmbedConfig, device: str | None = None, threads: int | None = None):
        from .backends import load_forward

        if config.backend == "auto":
            config = replace(config, backend=choice_in_process(config)["backend"])
        self.config = config
        self.model_dir = bert_dir(config.bert_model)
        # The exported graphs run on the CPU with numpy in and out: their workers never import torch (note 34).
        self.exported = config.backend != "torch"
        if self.exported:
            device = "cpu"
        elif device is None:
            device = default_device()
        self.device = str(device)
        self.on_gpu = not self.device.startswith("cpu")
        threads = threads or worker_threads()
        if not self.on_gpu:
            tune_allocator()
            for key, value in MODEL_ENV.items():  # read when oneDNN makes its first primitive
                os.environ.setdefault(key, value)
        if not self.exported:
            torch = _torch()
            if not self.on_gpu:
                # Decided on purpose: a Dask worker's thread count (1 in the default
                # cluster, one worker per core), or every core in a plain process.
                torch.set_num_threads(threads)
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.embed_dtype)
            if not self.on_gpu and half is not None and not native_half_precision(half):
                logging.getLogger(__name__).warning(
                    "--embed-dtype %s: this CPU (%s) has no native %s matmul, so it is emulated and runs several "
                    "times slower than fp32; use --embed-dtype fp32 here", config.embed_dtype,
                    torch.backends.cpu.get_cpu_capability(), config.embed_dtype)
        model_config = check_bert_dir(self.model_dir)
        self.model = load_forward(config.backend, self.model_dir, config.embed_dtype, self.device, threads)
        self.dim = int(model_config["hidden_size"])
        self.tokenizer = get_bert_tokenizer(BertTokenizerSpec(self.model_dir))
        self.batch_size = GPU_BATCH if self.on_gpu else CPU_BATCH
        element = 2 if config.embed_dtype in ("bf16", "fp16") else 4
        small = self.exported and config.embed_dtype in ("fp32", "int8")
        budget, self.batch_cost = ((GRAPH_ACTIVATION_BYTES, GRAPH_BATCH_COST_TOKENS) if small
                                   else (ACTIVATION_BYTES, CPU_BATCH_COST_TOKENS))
        self.max_tokens = max(256, budget // (int(model_config["intermediate_size"]) * element))
        self.lock = threading.Lock()

    def embed_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None,
                  counts: dict[str, int] | None = None) -> np.ndarray:
        """Embeddings (float32 ``[n, d]``) of [CLS] ... [SEP] id lists, in input order.

        ``counts``, if given, gets ``tokens`` (real) and ``padded`` (fed to the
        model, padding included) added to it.
        """
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        with self.lock:
            for sel in self.batches(lengths, batch_size):
                input_ids, attention = self.padded_batch(ids, sel)
                if counts is not None:
                    counts["tokens"] = counts.get("tokens", 0) + int(lengths[sel].sum())
                    counts["padded"] = counts.get("padded", 0) + input_ids.size
                out[sel] = self.pooled(input_ids, attention, lengths[sel])
        return out

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """BERT's last hidden states of one padded batch: a numpy array, or a torch tensor on the device."""
        if self.exported:
            return self.model(input_ids, attention_mask)
        torch = _torch()
        with torch.inference_mode():
            return self.model(torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device))

    def pooled(self, input_ids: np.ndarray, attention_mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The pooled float32 embeddings of one padded batch whose rows have ``lengths`` real tokens."""
        hidden = self.forward(input_ids, attention_mask)
        if self.exported:
            return mean_pool(hidden, lengths)
        torch = _torch()
        with torch.inference_mode():  # pooled on the model's device, in float32
            pool = torch.from_numpy(pool_weights(lengths, input_ids.shape[1])).to(self.device, hidden.dtype)
            summed = (hidden * pool.unsqueeze(-1)).sum(dim=1, dtype=torch.float32)
            count = pool.sum(dim=1, dtype=torch.float32).clamp(min=1.0).unsqueeze(-1)
            return (summed / count).cpu().numpy()

    def padded_batch(self, ids: Sequence[Sequence[int]], sel: np.ndarray):
        """The model's inputs for the items ``sel`` of ``ids``: right-padded int64 token ids and attention mask."""
        return pad_batch([ids[i] for i in sel], self.tokenizer.pad_id)

    def batches(self, lengths: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        """Index arrays of the batches, by length. A given batch size means fixed, length-sorted batches."""
        if batch_size or self.on_gpu:
            bs = batch_size or self.batch_size
            order = np.argsort(lengths, kind="stable")
            return [order[lo : lo + bs] for lo in range(0, len(order), bs)]
        return length_batches(lengths, CPU_MAX_BATCH, self.batch_cost, self.max_tokens)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        ids = self.tokenizer.encode_for_model(list(texts), self.config.max_chunk_length, num_threads=1)
        return self.embed_ids(ids, batch_size)


@functools.lru_cache(maxsize=4)
def get_embedder(config: EmbedConfig, device: str | None = None) -> Embedder:
    """This process's Embedder for ``config``: the model is loaded once per worker."""
    return Embedder(config, device)


def choose_here(config: EmbedConfig, threads: int | None = None, log=None) -> dict:
    """``--embed-backend auto`` measured in this process (a build runs it on a worker): ``backends.choose_backend``."""
    from .backends import choose_backend

    return choose_backend(config, Embedder, default_device(), threads, log=log)


@functools.lru_cache(maxsize=4)
def choice_in_process(config: EmbedConfig) -> dict:
    """``auto`` outside a build (a notebook's Embedder): measured once per process."""
    return choose_here(config)


def embed_texts(texts: Sequence[str], config: EmbedConfig | None = None) -> np.ndarray:
    """Embed strings with the configured BERT (for notebooks and ad-hoc queries)."""
    return get_embedder(config or EmbedConfig()).embed_texts(list(texts))
