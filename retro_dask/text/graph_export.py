"""BERT's encoder as an ONNX graph: exported once per model and library versions, checked, cached per user.

Reads a local Hugging Face BERT directory (``config.json``, ``*.safetensors``;
nothing is downloaded) and writes ``<cache>/graphs/<fingerprint>/``:
``model.onnx`` (the fp32 forward pass ``(input_ids, attention_mask) -> last
hidden states`` with dynamic batch and sequence axes and the mask a real input),
``export.json`` (what it was made from and its check), and the graphs the
backends derive from it (``onnx_backend``, ``openvino_backend``). The cache is
``$RETRO_DASK_CACHE``, else ``$XDG_CACHE_HOME/retro-dask``, else
``~/.cache/retro-dask``. The fingerprint is the sha256 of the model files, the
versions of torch, onnx, onnxscript, onnxruntime and openvino, and the export
settings, so a change to any of them makes a new folder. Every file is built
under an exclusive lock and moved into place with ``os.replace``: two workers
exporting at once wait for one another, and none ever reads a half-written graph.

An export is checked before it is kept: on real sample-corpus text, batches of
several shapes with padded rows, its pooled embeddings must have cosine >=
``EXPORT_MIN_COSINE`` to the eager model's (a traced mask or a fixed shape gives
embeddings that look fine and are wrong).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MissingDependencyError, RetroError
from .batch_arrays import mean_pool, pad_batch

# Bump when the exported graph changes for the same model and libraries (wrapper, opset, settings).
EXPORT_VERSION = 1
OPSET = 18
EXPORT_MIN_COSINE = 0.9999
# Graphs over protobuf's 2 GB limit keep their weights in a companion file.
EXTERNAL_DATA_BYTES = 1_800_000_000
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino")
FAST_EXTRA = "pip install 'retro-dask[fast]'"


def cache_root() -> Path:
    root = os.environ.get("RETRO_DASK_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "retro-dask"


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def model_files(model_dir: str | Path) -> list[Path]:
    """The files the graph is made from: the config and the weights (the tokenizer is not in the graph)."""
    path = Path(model_dir)
    return [path / "config.json", *sorted(path.glob("*.safetensors"))]


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(model_dir: str | Path) -> str:
    """sha256 of the model files, the library versions and the export settings (first 24 hex digits)."""
    h = hashlib.sha256()
    for f in model_files(model_dir):
        st = f.stat()
        h.update(f"{f.name}:{_file_sha256(str(f), st.st_size, st.st_mtime_ns)}\n".encode())
    settings = {"export_version": EXPORT_VERSION, "opset": OPSET, "libraries": library_versions()}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def graph_dir(model_dir: str | Path) -> Path:
    return cache_root() / "graphs" / fingerprint(model_dir)


def large_model(model_dir: str | Path) -> bool:
    return sum(f.stat().st_size for f in model_files(model_dir)) > EXTERNAL_DATA_BYTES


@contextlib.contextmanager
def locked(folder: Path):
    """An exclusive lock on ``folder`` across processes (released when the holder exits, even killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_file(folder: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``folder/name``, made by ``build(tmp)`` (which writes ``tmp/name`` and any companion files) if missing.

    The companions are moved into place first and ``name`` last, each with
    ``os.replace``: a reader that sees ``name`` sees all of it.
    """
    path = folder / name
    if path.exists():
        return path
    try:
        with locked(folder):
            if path.exists():  # made by another process while this one waited
                return path
            for stale in folder.glob("build.tmp-*"):  # left by a killed build: none runs while the lock is held
                shutil.rmtree(stale, ignore_errors=True)
            tmp = folder / f"build.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                build(tmp)
                for f in sorted(tmp.iterdir(), key=lambda p: p.name == name):
                    os.replace(f, folder / f.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise RetroError(f"could not write the exported graph {path}: {exc.strerror or exc}; free some space or "
                         "point RETRO_DASK_CACHE at a writable folder") from exc
    return path


def require(module: str, package: str):
    """Import an optional package of the exported backends, or say what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed: {FAST_EXTRA} (or pip install {package}) for --embed-backend onnx/openvino"
        ) from None


# ---------------------------------------------------------------- probe text


def probe_ids(model_dir: str, n: int, seed: int = 0, max_length: int = 256) -> list[list[int]]:
    """[CLS] ... [SEP] ids of ``n`` pieces of the packaged sample corpus, 6 to 60 words long (seeded)."""
    from ..formats.sample_corpus import iter_sample_documents
    from .bert import BertTokenizerSpec, get_bert_tokenizer

    docs = [d.split() for d in iter_sample_documents()]
    rng = np.random.default_rng(seed)
    texts = []
    for i in rng.choice(len(docs), size=n, replace=n > len(docs)):
        words = docs[int(i)]
        width = int(rng.integers(6, 61))
        lo = int(rng.integers(0, max(1, len(words) - width)))
        texts.append(" ".join(words[lo : lo + width]) or "empty")
    return get_bert_tokenizer(BertTokenizerSpec(model_dir)).encode_for_model(texts, max_length)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def check_batches(model_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of several shapes, padded rows included: one row, one unpadded batch, ragged batches."""
    max_length = min(256, int(json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]))
    ids = probe_ids(model_dir, 64, seed=1, max_length=max_length)
    by_length = sorted(ids, key=len)
    same = [x for x in ids if len(x) == len(by_length[len(ids) // 2])]
    groups = [ids[:1], same[:3], ids[1:5], ids[5:22], by_length[-9:], ids[22:64]]
    return [pad_batch(g) for g in groups if g]


# ---------------------------------------------------------------- the export


def exported_graph(model_dir: str) -> Path:
    """The checked fp32 ONNX graph of ``model_dir``'s encoder, exported on first use."""
    folder = graph_dir(model_dir)
    path = cached_file(folder, "model.onnx", lambda tmp: export(model_dir, tmp / "model.onnx"))
    return path


def export(model_dir: str, out: Path) -> dict[str, Any]:
    """Export the fp32 encoder to ``out`` and check it against the eager model; write ``export.json`` beside it."""
    import logging
    import warnings

    torch = require("torch", "torch")
    require("onnxscript", "onnxscript")  # torch.onnx's exporter builds the graph with it
    from .bert_encoder import export_module

    t0 = time.perf_counter()
    module = export_module(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1, max=int(config["max_position_embeddings"]))
    # Example inputs with two rows and a padded one: the graph is traced with the mask really applied.
    ids = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, (ids, mask), str(out), dynamo=True, opset_version=OPSET, verbose=False,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                          external_data=large_model(model_dir), report=False)
    seconds = time.perf_counter() - t0
    check = check_graph(model_dir, out, module)
    record = {"model_dir": str(Path(model_dir).resolve()), "fingerprint": fingerprint(model_dir),
              "libraries": library_versions(), "export_version": EXPORT_VERSION, "opset": OPSET,
              "export_seconds": round(seconds, 2), "check": check}
    (out.parent / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def run_graph_fn(path: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Something that runs an ONNX graph on this machine: ONNX Runtime, else OpenVINO (for the export check)."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # Only the inputs the graph has: a careless export may have dropped the mask (the check then fails).
        names = {i.name for i in session.get_inputs()}
        return lambda ids, mask: session.run(None, {k: v for k, v in (("input_ids", ids), ("attention_mask", mask))
                                                    if k in names})[0]
    except ImportError:
        pass
    ov = require("openvino", "openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
    return lambda ids, mask: compiled({"input_ids": ids, "attention_mask": mask})[compiled.output(0)]


def check_graph(model_dir: str, path: Path, module=None, run: Callable | None = None,
                min_cosine: float | None = EXPORT_MIN_COSINE) -> dict[str, Any]:
    """Cosines of a graph's pooled embeddings to the eager fp32 model's on ``check_batches``; raise below
    ``min_cosine`` (None: a lossy graph, only measured)."""
    import torch

    from .bert_encoder import export_module

    module = module or export_module(model_dir)
    run = run or run_graph_fn(path)
    cos, shapes = [], []
    for ids, mask in check_batches(model_dir):
        with torch.inference_mode():
            want = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = np.asarray(run(ids, mask))
        lengths = mask.sum(1)
        cos.append(cosines(mean_pool(got, lengths), mean_pool(want, lengths)))
        shapes.append(list(ids.shape))
    cos = np.concatenate(cos)
    result = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "rows": int(cos.size), "shapes": shapes}
    if min_cosine is not None and cos.min() < min_cosine:
        raise RetroError(f"the exported graph {path} of {model_dir} gives embeddings with cosine {cos.min():.6f} "
                         f"(< {min_cosine}) to the eager model on batches {shapes}: it is not kept. Use "
                         "--embed-backend torch, and report the torch/onnx versions in export.json")
    return result
