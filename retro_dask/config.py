"""Settings: one small frozen dataclass per stage, plus the build that holds them.

Each class holds values only (numbers, strings, paths) and validates them in
``__post_init__`` with errors that name the value. Live models, tokenizers and
indexes are built from these inside the workers, never stored here.

``BuildConfig`` is what ``W/config.json`` records: every setting that shapes an
output, and a fingerprint of them. Settings that only change how fast or where
the work runs (workers, scheduler, batch size) live in ``RunOptions`` and are
not recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ConfigMismatchError, InputError
from .plan.chunks import SPLIT_NAMES, parse_split
from .text.bert import BertTokenizerSpec
from .text.gpt import GPTTokenizerSpec

CONFIG_VERSION = 1
DEFAULT_BLOCK_SIZE = 1024
EMBED_DTYPES = ("fp32", "bf16", "fp16", "int8")
# What runs BERT's forward pass (text/backends.py): eager torch, or the graph exported once and run by
# ONNX Runtime or OpenVINO; auto measures them on this CPU at a workdir's first run and records the pick.
EMBED_BACKENDS = ("torch", "onnx", "openvino", "auto")
BACKEND_DTYPES = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnx": ("fp32", "int8"),  # ONNX Runtime's CPU kernels have no fast bf16/fp16 path
    "openvino": ("fp32", "bf16", "int8"),
    "auto": EMBED_DTYPES,
}
STORE_DTYPES = ("float32", "float16")
INDEX_METRICS = ("cosine", "l2")


def parse_bytes(value: str | int | float) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1e9"`` or a number of bytes, as an int."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not m:
        raise InputError(f"{value!r} is not a size: write it as 4GB, 512MiB or a number of bytes")
    number = float(m.group(1))
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(number * base**power)


@dataclass(frozen=True)
class DataBlend:
    """Megatron's ``--data-path W1 PREFIX1 W2 PREFIX2 ...``: weights and prefixes."""

    weights: tuple[float, ...]
    prefixes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.prefixes:
            raise InputError("--data-path is empty: give WEIGHT PREFIX pairs, as in --data-path 1 data/wiki_text_document")
        if len(self.weights) != len(self.prefixes):
            raise InputError(f"--data-path has {len(self.weights)} weights for {len(self.prefixes)} prefixes")
        for w, p in zip(self.weights, self.prefixes):
            if not (w > 0 and math.isfinite(w)):
                raise InputError(f"--data-path weight {w!r} for {p}: weights must be positive numbers")

    @classmethod
    def from_args(cls, args: Sequence[str]) -> "DataBlend":
        """Parse ``["1", "PREFIX", ...]``; a single bare prefix means weight 1."""
        args = [str(a) for a in args]
        if len(args) == 1:
            return cls((1.0,), (os.path.abspath(args[0]),))
        if len(args) % 2:
            raise InputError(
                f"--data-path has {len(args)} values ({' '.join(args)}): give WEIGHT PREFIX pairs, "
                "as in --data-path 0.7 data/wiki 0.3 data/books"
            )
        weights, prefixes = [], []
        for w, p in zip(args[0::2], args[1::2]):
            try:
                weights.append(float(w))
            except ValueError:
                raise InputError(
                    f"--data-path weight {w!r} (before {p!r}) is not a number: give WEIGHT PREFIX pairs, "
                    "as in --data-path 1 data/wiki_text_document"
                ) from None
            prefixes.append(os.path.abspath(p))
        return cls(tuple(weights), tuple(prefixes))

    @property
    def ratios(self) -> tuple[float, ...]:
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    def to_args(self) -> list[str]:
        out: list[str] = []
        for w, p in zip(self.weights, self.prefixes):
            out += [repr(w), p]
        return out


@dataclass(frozen=True)
class ChunkConfig:
    """db-build: how the corpora become chunks (the BERT that measures them is EmbedConfig's)."""

    data: DataBlend
    split: tuple[float, float, float] = (0.98, 0.02, 0.0)
    chunk_length: int = 64
    block_size: int = DEFAULT_BLOCK_SIZE
    gpt_vocab_file: str | None = None
    gpt_merge_file: str | None = None
    gpt_tokenizer_json: str | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if isinstance(self.split, str):
            object.__setattr__(self, "split", parse_split(self.split))
        if not isinstance(self.chunk_length, int) or self.chunk_length <= 0:
            raise InputError(f"--chunk-length {self.chunk_length!r} must be a positive integer (Megatron uses 64)")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise InputError(f"--block-size {self.block_size!r} must be a positive integer number of chunks")

    def gpt_spec(self) -> GPTTokenizerSpec:
        return GPTTokenizerSpec(vocab_file=self.gpt_vocab_file, merge_file=self.gpt_merge_file,
                                tokenizer_json=self.gpt_tokenizer_json)


@dataclass(frozen=True)
class EmbedConfig:
    """embed: which BERT, how chunks are tokenized for it, and the precisions."""

    bert_model: str | None = None
    max_chunk_length: int = 256
    embed_dtype: str = "fp32"
    store_dtype: str = "float32"
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.embed_dtype not in EMBED_DTYPES:
            raise InputError(f"--embed-dtype {self.embed_dtype!r}: choose one of {', '.join(EMBED_DTYPES)}")
        if self.backend not in EMBED_BACKENDS:
            raise InputError(f"--embed-backend {self.backend!r}: choose one of {', '.join(EMBED_BACKENDS)}")
        if self.embed_dtype not in BACKEND_DTYPES[self.backend]:
            runs = [b for b, dtypes in BACKEND_DTYPES.items() if self.embed_dtype in dtypes and b != "auto"]
            raise InputError(
                f"--embed-dtype {self.embed_dtype} with --embed-backend {self.backend}: {self.backend} runs "
                f"{', '.join(BACKEND_DTYPES[self.backend])}; use --embed-backend {' or '.join(runs + ['auto'])} "
                f"for {self.embed_dtype}")
        if self.store_dtype not in STORE_DTYPES:
            raise InputError(f"--store-dtype {self.store_dtype!r}: choose one of {', '.join(STORE_DTYPES)}")
        if not isinstance(self.max_chunk_length, int) or self.max_chunk_length < 3:
            raise InputError(f"--bert-max-chunk-length {self.max_chunk_length!r} must be an integer of at least 3")

    def bert_spec(self) -> BertTokenizerSpec:
        return BertTokenizerSpec(model_dir=self.bert_model)


@dataclass(frozen=True)
class IndexConfig:
    """index-train / index-add: which Faiss index, its metric and its size budget."""

    index_str: str = "auto"
    metric: str = "cosine"
    memory: int = 8 * 1000**3
    ntrain: int | None = None
    on_disk: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.index_str, str) or not self.index_str.strip():
            raise InputError(f"--index-str {self.index_str!r}: give a Faiss index_factory string or auto")
        if self.metric not in INDEX_METRICS:
            raise InputError(f"--index-metric {self.metric!r}: choose one of {', '.join(INDEX_METRICS)}")
        if self.memory <= 0:
            raise InputError(f"--index-memory {self.memory!r} must be positive")
        if self.ntrain is not None and self.ntrain <= 0:
            raise InputError(f"--index-ntrain {self.ntrain!r} must be positive")


@dataclass(frozen=True)
class QueryConfig:
    """query-neighbors: the pretraining samples and the search."""

    seq_length: int = 2048
    train_samples: int | None = None
    valid_samples: int | None = None
    test_samples: int | None = None
    num_neighbors_query: int = 200
    num_neighbors_save: int = 20
    # "auto": the smallest nprobe whose recall@10 reaches target_recall (stages/tune.py); an int: that
    # many lists; None: nlist / 8 (what workdirs made before "auto" recorded).
    nprobe: int | str | None = "auto"
    ef_search: int = 64
    target_recall: float = 0.95
    tune_queries: int = 2000

    def __post_init__(self) -> None:
        for name in ("seq_length", "num_neighbors_query", "num_neighbors_save", "ef_search", "tune_queries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"--{name.replace('_', '-')} {v!r} must be a positive integer")
        for name in ("train_samples", "valid_samples", "test_samples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise InputError(f"--{name.replace('_', '-')} {v!r} must be a non-negative integer")
        if not (self.nprobe is None or self.nprobe == "auto" or (isinstance(self.nprobe, int) and self.nprobe > 0)):
            raise InputError(f"--query-nprobe {self.nprobe!r}: give a positive number of lists, or auto (the "
                             "smallest that reaches --target-recall)")
        if not (isinstance(self.target_recall, (int, float)) and 0 < self.target_recall <= 1):
            raise InputError(f"--target-recall {self.target_recall!r} must be a recall@10 in (0, 1], e.g. 0.95")
        if self.num_neighbors_save > self.num_neighbors_query:
            raise InputError(
                f"--num-neighbors-save {self.num_neighbors_save} is larger than --num-neighbors-query "
                f"{self.num_neighbors_query}: query at least as many neighbours as you save"
            )

    def samples(self, split: str) -> int | None:
        return getattr(self, f"{split}_samples")


@dataclass(frozen=True)
class BuildConfig:
    """Every setting that shapes an output of the workdir."""

    chunk: ChunkConfig
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    def __post_init__(self) -> None:
        if self.query.seq_length % self.chunk.chunk_length:
            raise InputError(
                f"--seq-length {self.query.seq_length} is not a multiple of --chunk-length "
                f"{self.chunk.chunk_length}: RETRO cuts every sample into whole chunks; use for example "
                f"--seq-length {max(1, self.query.seq_length // self.chunk.chunk_length) * self.chunk.chunk_length}"
            )

    @property
    def chunks_per_sample(self) -> int:
        return self.query.seq_length // self.chunk.chunk_length

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chunk"]["split"] = list(self.chunk.split)
        d["chunk"]["data"] = {"weights": list(self.chunk.data.weights), "prefixes": list(self.chunk.data.prefixes)}
        return {"version": CONFIG_VERSION, **d}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({**self.to_dict(), "fingerprint": self.fingerprint()}, indent=2, sort_keys=True) + "\n"

    def to_json_with(self, **extra: Any) -> str:
        """config.json with more top-level sections (``tuned``: what --query-nprobe auto chose) beside the settings."""
        return json.dumps({**self.to_dict(), "fingerprint": self.fingerprint(), **extra}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        if d.get("version") != CONFIG_VERSION:
            raise InputError(f"config version {d.get('version')!r} is not {CONFIG_VERSION}: this workdir was made by another retro-dask")
        c = dict(d["chunk"])
        c["data"] = DataBlend(tuple(c["data"]["weights"]), tuple(c["data"]["prefixes"]))
        c["split"] = tuple(c["split"])
        return cls(
            chunk=ChunkConfig(**c),
            embed=EmbedConfig(**d["embed"]),
            index=IndexConfig(**d["index"]),
            query=QueryConfig(**d["query"]),
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(recorded: BuildConfig, wanted: BuildConfig) -> list[tuple[str, Any, Any]]:
    """``(field, recorded value, wanted value)`` for every field that differs."""
    a, b = flatten(recorded.to_dict()), flatten(wanted.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def keep_recorded_backend(wanted: BuildConfig, recorded: BuildConfig | None) -> BuildConfig:
    """``--embed-backend auto`` on a workdir that has recorded what auto picked means that pick."""
    if recorded is None or wanted.embed.backend != "auto":
        return wanted
    return dataclasses.replace(wanted, embed=dataclasses.replace(wanted.embed, backend=recorded.embed.backend))


def check_same_config(recorded: BuildConfig, wanted: BuildConfig, config_path: str) -> None:
    diffs = config_differences(recorded, wanted)
    if diffs:
        lines = "\n".join(f"  {k}: workdir has {a!r}, this run asks for {b!r}" for k, a, b in diffs)
        raise ConfigMismatchError(
            f"{config_path} records other settings than this run:\n{lines}\n"
            "These settings shape the outputs, so the workdir cannot mix them. Rerun with the "
            "workdir's settings (or leave those options out: they are read from config.json), "
            "or use a new --workdir."
        )


@dataclass(frozen=True)
class RunOptions:
    """How and where a build runs; none of these shape the outputs."""

    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    scheduler: str | None = None
    cluster: str = "local"
    dashboard_address: str = "127.0.0.1:8787"
    embed_batch_size: int | None = None
    verify_fraction: float = 0.05
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.cluster not in ("local", "cuda", "synchronous"):
            raise InputError(f"--cluster {self.cluster!r}: choose local, cuda or synchronous")
        if self.n_workers is not None and self.n_workers <= 0:
            raise InputError(f"--n-workers {self.n_workers} must be positive")
        if not 0 < self.verify_fraction <= 1:
            raise InputError(f"--verify-fraction {self.verify_fraction} must be in (0, 1]")


def split_names() -> tuple[str, ...]:
    return SPLIT_NAMES
