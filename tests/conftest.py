"""Shared fixtures: small corpora, a tiny random BERT, seeded synthetic vectors."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def gpt():
    from retro_dask.text.gpt import get_gpt_tokenizer

    return get_gpt_tokenizer()


@pytest.fixture(scope="session")
def sample_texts():
    from retro_dask.formats.sample_corpus import iter_sample_documents

    return list(iter_sample_documents())


def write_corpus(prefix: Path, texts, gpt) -> str:
    from retro_dask.formats.indexed_writer import write_indexed_dataset

    docs = [np.asarray(ids + [gpt.eod], dtype=np.uint16) for ids in gpt.encode_batch(list(texts))]
    write_indexed_dataset(str(prefix), docs, np.uint16)
    return str(prefix)


@pytest.fixture(scope="session")
def sample_corpus_prefix(tmp_path_factory, sample_texts, gpt) -> str:
    """The whole packaged sample corpus as an indexed dataset."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "wiki", sample_texts, gpt)


@pytest.fixture(scope="session")
def small_corpus_prefix(tmp_path_factory, sample_texts, gpt) -> str:
    """400 sample documents (about 900 chunks): enough for every stage, fast."""
    return write_corpus(tmp_path_factory.mktemp("small") / "wiki400", sample_texts[:400], gpt)


@pytest.fixture(scope="session")
def second_corpus_prefix(tmp_path_factory, sample_texts, gpt) -> str:
    """Another 300 documents, for blends."""
    return write_corpus(tmp_path_factory.mktemp("second") / "wiki300", sample_texts[5000:5300], gpt)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with seeded random weights and all-MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from retro_dask.text.bert import default_bert_dir

    out = tmp_path_factory.mktemp("tiny_bert")
    src = Path(default_bert_dir())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture
def synthetic_vectors():
    """Seeded clustered vectors (not uniform), like embeddings: ``make(n, d)``."""

    def make(n: int, d: int = 32, n_clusters: int = 50, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
        which = rng.integers(0, n_clusters, size=n)
        return (centers[which] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)

    return make


def run_build(args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run scripts/build.py in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--no-progress", *map(str, args)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)  # the build and its workers: none may linger into other tests
            out, err = popen.communicate()
            # Say where it stood: the stage it was in and what it logged last.
            raise AssertionError(f"build did not finish in {timeout} s:\n--- stdout\n{out[-6000:]}\n"
                                 f"--- stderr\n{err[-6000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(root: Path, include=("config.json", "db", "index", "query")) -> dict[str, bytes]:
    """Every output file under the contract folders, by relative path (for identical-bytes checks)."""
    out = {}
    root = Path(root)
    for top in include:
        p = root / top
        if p.is_file():
            out[top] = p.read_bytes()
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    out[str(f.relative_to(root))] = f.read_bytes()
    return out


def build_args(workdir, corpus, bert, *extra):
    return ["--workdir", workdir, "--tasks", "build", "--data-path", "1", corpus, "--bert-model", bert,
            "--seq-length", "256", "--block-size", "256", "--split", "90,10,0", *extra]


@pytest.fixture(scope="session")
def built_workdir(tmp_path_factory, small_corpus_prefix, tiny_bert) -> Path:
    """The whole build of 400 sample documents with the tiny BERT, on 2 embedded workers."""
    w = tmp_path_factory.mktemp("e2e") / "w"
    proc = run_build(build_args(w, small_corpus_prefix, tiny_bert, "--n-workers", "2",
                                "--dashboard-address", "127.0.0.1:0"))
    assert "Dask dashboard: http://127.0.0.1:" in proc.stdout
    return w


def page_faults_of_large_buffers(n: int = 50, nbytes: int = 1 << 20) -> int:
    """Minor page faults of allocating, filling and freeing ``n`` buffers of ``nbytes`` in turn."""
    import resource

    np.ones(nbytes // 8)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.ones(nbytes // 8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
