"""The reference build: a fixed input and fixed flags, and the hashes of every output's contents.

The lazy-array redesign had to keep every workdir array and file the same. Its
hashes were taken from a build by the code before the redesign
(``tests/fixtures/reference_hashes.json``); ``test_reference_build`` rebuilds
with the same input and flags and compares. Regenerate (only when an output is
meant to change) with ``python tests/reference_build.py --write``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "reference_hashes.json"
N_DOCS = 400

# Outputs that come from floating-point BERT and Faiss arithmetic: their bytes hold on
# the machine (CPU kind, torch, faiss) that recorded them; the integer ones hold anywhere.
FLOAT_DERIVED = ("db/embeddings.zarr", "index/", "query/train/neighbors.zarr", "query/valid/neighbors.zarr",
                 "query/test/neighbors.zarr")


def machine_signature() -> dict:
    import faiss
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "faiss": faiss.__version__, "machine": platform.machine()}


def build_flags(workdir, corpus, bert, nprobe_flag: bool = True) -> list[str]:
    """The reference build's flags. ``--query-nprobe default`` is what the code that recorded the hashes did
    without the flag (nlist / 8, at least 16); later code tunes nprobe by default."""
    return ["--workdir", str(workdir), "--tasks", "build", "--data-path", "1", str(corpus), "--bert-model", str(bert),
            "--seq-length", "256", "--block-size", "256", "--split", "90,10,0", "--n-workers", "2",
            "--dashboard-address", "127.0.0.1:0", "--no-progress"] + (["--query-nprobe", "default"] if nprobe_flag else [])


def _array_hash(path: Path) -> str:
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    data = np.ascontiguousarray(arr[:])
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(data.tobytes())
    return h.hexdigest()


def _file_hash(path: Path, replace: dict[str, str]) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        text = data.decode()
        for old, new in replace.items():
            text = text.replace(old, new)
        obj = json.loads(text)
        if isinstance(obj, dict):
            obj.pop("fingerprint", None)  # a hash of paths
            obj.pop("hash", None)  # likewise (meta.json): its inputs are compared here instead
        data = json.dumps(obj, sort_keys=True).encode()
    elif path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        data = f"{arr.dtype.str}{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes()
    return hashlib.sha256(data).hexdigest()


def normalized_config(workdir: Path, replace: dict[str, str]) -> dict:
    """config.json flattened (``section.field``), paths replaced, fingerprint left out: later versions may add
    settings, and the reference test checks only the ones it recorded."""
    text = (Path(workdir) / "config.json").read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    out = {}
    for section, values in json.loads(text).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        elif section != "fingerprint":
            out[section] = values
    return out


def content_hashes(workdir: Path, replace: dict[str, str]) -> dict[str, str]:
    """sha256 of every output's contents: Zarr arrays by value, .npy by value, JSON with paths replaced
    (in the order of ``replace``), other files (Faiss indexes) by bytes. Stats and the pipeline's own
    state are left out."""
    workdir = Path(workdir)
    out = {}
    for p in sorted(workdir.rglob("*")):
        rel = p.relative_to(workdir).as_posix()
        if rel.startswith((".retro", "stats")):
            continue
        if rel == "config.json":
            continue  # compared setting by setting: normalized_config
        if p.is_dir() and p.suffix == ".zarr":
            out[rel] = _array_hash(p)
        elif p.is_file() and ".zarr/" not in rel + "/" and not any(part.endswith(".zarr") for part in p.parts):
            out[rel] = _file_hash(p, replace)
    return out


def make_inputs(folder: Path) -> tuple[str, str]:
    """The corpus (the sample corpus's first 400 documents) and the tiny seeded BERT, as the tests make them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_corpus  # noqa: E402

    from retro_dask.formats.sample_corpus import iter_sample_documents
    from retro_dask.text.gpt import get_gpt_tokenizer

    texts = list(iter_sample_documents())[:N_DOCS]
    corpus = write_corpus(folder / "wiki400", texts, get_gpt_tokenizer())
    bert = folder / "tiny_bert"
    bert.mkdir()
    make_tiny_bert(bert)
    return corpus, str(bert)


def make_tiny_bert(out: Path) -> None:
    """A 2-layer, 32-wide BERT with seeded random weights and all-MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from retro_dask.text.bert import default_bert_dir

    src = Path(default_bert_dir())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out, safe_serialization=True)


def reference_build(folder: Path, corpus: str, bert: str) -> dict[str, str]:
    w = folder / "w"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py"), *build_flags(w, corpus, bert)],
                   check=True, capture_output=True, text=True, env=env)
    replace = {bert: "BERT", str(Path(corpus).parent): "CORPUS"}
    return content_hashes(w, replace), normalized_config(w, replace)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, bert = make_inputs(Path(tmp))
        hashes, config = reference_build(Path(tmp), corpus, bert)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {"commit": commit, "machine": machine_signature(), "flags": build_flags("W", "CORPUS", "BERT"),
              "float_derived": list(FLOAT_DERIVED), "hashes": hashes, "config": config}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
