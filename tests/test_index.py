"""index-train / index-add: the merged index equals a single-process add."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, EmbedConfig, IndexConfig, QueryConfig
from retro_dask.engine.executor import Executor, StoreJob
from retro_dask.engine.targets import ZarrTarget
from retro_dask.formats.faiss_index import faiss, ivf_of, read_index_file
from retro_dask.formats.workdir import (
    added_index_path,
    added_ivfdata_path,
    embeddings_path,
    index_partials_dir,
    sampled_path,
    trained_index_path,
)
from retro_dask.plan import index as index_plan
from retro_dask.stages.index import add_to_index, train_index

N, D, BLOCK = 3000, 32, 256


def executor(w) -> Executor:
    return Executor(str(w), None, progress=False, log=lambda m: None)


def workdir_with_embeddings(tmp_path, tiny_bert, vectors, index_str, metric="cosine", on_disk=False):
    """A workdir holding only synthetic embeddings and a training sample, stored and recorded as embed
    and db-build store theirs."""
    import dask.array as da

    w = tmp_path / "w"
    config = BuildConfig(
        ChunkConfig(DataBlend((1.0,), ("/nonexistent",)), block_size=BLOCK),
        embed=EmbedConfig(bert_model=tiny_bert),
        index=IndexConfig(index_str=index_str, metric=metric, on_disk=on_disk),
        query=QueryConfig(seq_length=128),
    )
    target = ZarrTarget.create(str(w), "embed", embeddings_path(w), vectors.shape, np.float32, BLOCK, compressed=False)
    executor(w).store([StoreJob("embed", target, lambda lo, hi: da.from_array(vectors[lo:hi]))], "embed")
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(vectors), size=2000, replace=False))
    sampled = ZarrTarget.create(str(w), "db-sampled", sampled_path(w), sample.shape, np.int64, BLOCK)
    for b in range(sampled.n_blocks):
        sampled.write_block(b, sample[b * BLOCK : (b + 1) * BLOCK])
    return str(w), config


def single_process_index(w, tag, vectors):
    index = read_index_file(trained_index_path(w, tag))
    if ivf_of(index) is not None:
        index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    else:
        index.add(vectors)
    return index


@pytest.mark.parametrize("index_str, metric, on_disk, fan_in, span", [
    ("IVF16,Flat", "cosine", False, 64, 1),          # exact IVF, everything in the final assembly
    ("IVF16,Flat", "l2", False, 3, 1),               # Megatron's metric; a 2-level merge tree
    ("OPQ4_16,IVF16,PQ4", "cosine", False, 3, 1),    # rotation + PQ codes through the tree
    ("IVF16,Flat", "cosine", True, 3, 1),            # on-disk inverted lists
    ("OPQ4_16,IVF16_HNSW8,PQ4", "l2", True, 64, 1),  # HNSW coarse quantizer, on disk
    ("Flat", "cosine", False, 3, 1),                 # no inverted lists: codes appended in row order
    ("IVF16,Flat", "cosine", False, 2, 5),           # encode tasks of 5 blocks, the last one ragged
    ("OPQ4_16,IVF16,PQ4", "l2", True, 64, 5),        # the same, on disk
])
def test_merged_index_equals_single_add(tmp_path, tiny_bert, synthetic_vectors, monkeypatch,
                                        index_str, metric, on_disk, fan_in, span):
    monkeypatch.setattr(index_plan, "FAN_IN", fan_in)
    monkeypatch.setattr(index_plan, "ENCODE_ROWS", span * BLOCK)
    monkeypatch.setattr(index_plan, "MIN_ENCODE_TASKS", 2)
    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, index_str, metric, on_disk)
    ex = executor(w)
    train_index(ex, config, log=lambda m: None)
    stats = add_to_index(ex, config, log=lambda m: None)
    tag = stats["tag"]
    n_partials = -(-12 // span)  # 12 blocks
    assert stats["blocks"] == stats["partials"] == n_partials
    assert (stats["merge_levels"] > 0) == (fan_in < n_partials)  # a tree only under a small fan-in
    assert not index_partials_dir(w, tag).exists()  # spent once the final index is recorded
    # The workdir can move: on-disk lists are found next to the index file.
    moved = tmp_path / "moved"
    shutil.move(w, moved)
    index = read_index_file(added_index_path(moved, tag))
    assert added_ivfdata_path(moved, tag).exists() == on_disk
    reference = single_process_index(str(moved), tag, vectors)
    queries = synthetic_vectors(200, D, seed=7)
    for name, value in (("nprobe", 4), ("quantizer_efSearch", 32)):
        ps = faiss().ParameterSpace()
        for ix in (index, reference):
            try:
                ps.set_index_parameter(ix, name, value)
            except RuntimeError:
                pass
    d1, i1 = index.search(queries, 10)
    d2, i2 = reference.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert index.ntotal == N


def test_every_chunk_id_exactly_once(tmp_path, tiny_bert, synthetic_vectors, monkeypatch):
    monkeypatch.setattr(index_plan, "FAN_IN", 2)
    monkeypatch.setattr(index_plan, "ENCODE_ROWS", 3 * BLOCK)
    monkeypatch.setattr(index_plan, "MIN_ENCODE_TASKS", 2)
    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, "IVF16,Flat")
    ex = executor(w)
    train_index(ex, config, log=lambda m: None)
    tag = add_to_index(ex, config, log=lambda m: None)["tag"]
    index = read_index_file(added_index_path(w, tag))
    ivf = ivf_of(index)  # a view into ``index``, which must stay alive
    f = faiss()
    ids = np.concatenate([f.rev_swig_ptr(ivf.invlists.get_ids(l), ivf.invlists.list_size(l)).copy()
                          for l in range(ivf.nlist) if ivf.invlists.list_size(l)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(N))


def test_rerun_skips_finished_index(tmp_path, tiny_bert, synthetic_vectors):
    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, "IVF16,Flat")
    ex = executor(w)
    train_index(ex, config, log=lambda m: None)
    tag = add_to_index(ex, config, log=lambda m: None)["tag"]
    before = added_index_path(w, tag).read_bytes()
    messages = []
    train_index(ex, config, log=messages.append)
    add_to_index(ex, config, log=messages.append)
    assert any("already trained" in m for m in messages) and any("already built" in m for m in messages)
    assert added_index_path(w, tag).read_bytes() == before


def test_too_few_training_points_is_refused(tmp_path, tiny_bert, synthetic_vectors):
    from retro_dask.errors import InputError

    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, "IVF128,Flat")
    with pytest.raises(InputError, match=r"128 inverted lists.*39 x 128 = 4992.*2000"):
        train_index(executor(w), config, log=lambda m: None)
    assert not trained_index_path(w, "IVF128_Flat.cosine").exists()


def test_block_tasks_do_not_oversubscribe_a_multithread_worker(tmp_path):
    """A worker with 2 threads runs 2 block tasks at once: each gets one Faiss thread, and the
    runner keeps enough tasks in flight for every thread of the cluster."""
    from distributed import Client, LocalCluster

    from retro_dask.engine.process_env import block_task_threads

    assert block_task_threads() == (os.cpu_count() or 1)  # no cluster: one task at a time
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(block_task_threads, pure=False).result() == 1
        ex = Executor(str(tmp_path), client, progress=False, log=lambda m: None)
        assert ex.n_threads == 2
        assert ex.window() >= 2 * ex.n_threads


def test_openblas_kernel_is_chosen_from_the_cpu_flags():
    from retro_dask.formats.faiss_index import openblas_kernel_for

    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "sse3"}
    assert openblas_kernel_for(avx512) == "SkylakeX"
    assert openblas_kernel_for({"avx2", "fma", "sse3"}) == "Haswell"
    assert openblas_kernel_for({"sse3"}) is None
    assert openblas_kernel_for(set()) is None  # not x86 Linux: OpenBLAS keeps its own choice


def test_faiss_runs_the_widest_blas_kernel_this_cpu_has():
    """faiss-cpu's bundled OpenBLAS falls back to SSE3 kernels on CPUs newer than it
    (about 4.5x slower for the coarse assignment); faiss() must load it with the right one."""
    import subprocess
    import sys

    from retro_dask.formats.faiss_index import cpu_flags, openblas_kernel_for

    want = openblas_kernel_for(cpu_flags())
    if want is None:
        pytest.skip("no AVX2 on this CPU: OpenBLAS's own choice is kept")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = "from retro_dask.formats.faiss_index import faiss_blas_kernel; print(faiss_blas_kernel())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if out.strip() == "None":
        pytest.skip("this faiss build has no bundled OpenBLAS")
    assert out.strip() == want
    # The user's own setting wins.
    env["OPENBLAS_CORETYPE"] = "Haswell"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Haswell"


def test_encode_spans_depend_on_the_database_alone():
    assert index_plan.encode_span(21, 1024) == 1          # sample corpus: a task per block
    assert index_plan.encode_span(4883, 1024) == 32       # 5M chunks: 32,768 rows per task
    assert index_plan.encode_span(320, 1024) == 20        # at least 16 tasks while the blocks allow
    assert index_plan.encode_span(100_000, 256) == 128


def test_partials_of_other_spans_are_recomputed(tmp_path, tiny_bert, synthetic_vectors, monkeypatch):
    """Partials left by a run that cut the rows into other spans are not reused for the wrong rows."""
    from retro_dask.engine.faults import InjectedFault

    monkeypatch.setattr(index_plan, "MIN_ENCODE_TASKS", 2)
    monkeypatch.setattr(index_plan, "ENCODE_ROWS", BLOCK)
    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, "IVF16,Flat")
    ex = executor(w)
    tag = train_index(ex, config, log=lambda m: None)["tag"]
    monkeypatch.setenv("RETRO_DASK_CRASH_AT", "index-assemble:0")
    with pytest.raises(InjectedFault):  # an interrupted run: every span of one block encoded, no index
        add_to_index(ex, config, log=lambda m: None)
    assert len(list(index_partials_dir(w, tag).iterdir())) == 12
    monkeypatch.delenv("RETRO_DASK_CRASH_AT")
    monkeypatch.setattr(index_plan, "ENCODE_ROWS", 3 * BLOCK)
    stats = add_to_index(ex, config, log=lambda m: None)
    assert stats["blocks"] == 4 and stats["blocks_skipped"] == 0
    index = read_index_file(added_index_path(w, tag))
    reference = single_process_index(str(w), tag, vectors)
    queries = synthetic_vectors(50, D, seed=3)
    for ix in (index, reference):
        faiss().ParameterSpace().set_index_parameter(ix, "nprobe", 4)
    np.testing.assert_array_equal(index.search(queries, 10)[1], reference.search(queries, 10)[1])


def test_an_interrupted_add_resumes_from_its_partials(tmp_path, tiny_bert, synthetic_vectors, monkeypatch):
    """A crash in the reduction keeps the encoded partials: the rerun only reduces them."""
    from retro_dask.engine.faults import InjectedFault

    monkeypatch.setattr(index_plan, "MIN_ENCODE_TASKS", 2)
    monkeypatch.setattr(index_plan, "ENCODE_ROWS", 2 * BLOCK)
    monkeypatch.setattr(index_plan, "FAN_IN", 2)
    vectors = synthetic_vectors(N, D)
    w, config = workdir_with_embeddings(tmp_path, tiny_bert, vectors, "IVF16,Flat")
    ex = executor(w)
    tag = train_index(ex, config, log=lambda m: None)["tag"]
    monkeypatch.setenv("RETRO_DASK_CRASH_AT", "index-merge:1024")  # the merge of rows 1024 onwards
    with pytest.raises(InjectedFault):
        add_to_index(ex, config, log=lambda m: None)
    monkeypatch.delenv("RETRO_DASK_CRASH_AT")
    stats = add_to_index(ex, config, log=lambda m: None)
    assert stats["blocks"] == 6 and stats["blocks_skipped"] == 6 and stats["merge_levels"] == 2
    reference = single_process_index(str(w), tag, vectors)
    assert added_index_path(w, tag).read_bytes() == faiss().serialize_index(reference).tobytes()


def test_the_reduction_reads_partials_from_disk_not_from_encode_tasks(tmp_path):
    """The reduction's graph holds no encode task: a worker lost after encoding cannot make Dask encode
    again into a workdir whose index is already assembled (the partials are read from their folders)."""
    from retro_dask.formats.inverted_lists import IndexLayout
    from retro_dask.stages.index import index_reduction

    folders = [tmp_path / f"rows-{i:012d}-{i + 1:012d}" for i in range(600)]
    graph = dict(index_reduction(str(tmp_path), "IVF4_Flat.l2", folders, IndexLayout(4, 8, 1), False, 256).dask)
    names = {k[0] if isinstance(k, tuple) else k for k in graph}
    assert not any("encode" in n for n in names)
    # 600 partials, fan-in 256: 3 Dask chunks of partials (3 reads), each merged into one partial (3 merges),
    # then the final assembly; no task per partial, so a billion chunks do not make a million-task graph.
    assert len(graph) == 3 + 3 + 1
    many = [tmp_path / f"rows-{i:012d}-{i + 1:012d}" for i in range(100_000)]
    assert len(index_reduction(str(tmp_path), "IVF4_Flat.l2", many, IndexLayout(4, 8, 1), False, 256).dask) < 800


@pytest.mark.parametrize("used_lists", [16, 3])  # dense and sparse list tables
def test_assembled_file_is_faiss_own_serialization(tmp_path, monkeypatch, used_lists):
    """The assembly writes the final index file itself, list slice by list slice: its bytes
    must be exactly what Faiss writes for the same index filled in memory."""
    from retro_dask.formats import inverted_lists as ix

    monkeypatch.setattr(ix, "SLICE_BYTES", 300)  # many slices; big lists alone in theirs
    f = faiss()
    rng = np.random.default_rng(5)
    trained = f.index_factory(8, "L2norm,IVF16,Flat")
    trained.train(rng.standard_normal((16 * 39, 8)).astype(np.float32))
    layout = ix.IndexLayout.of(trained)
    folders, parts, row = [], [], 0
    for k, n in enumerate((40, 25, 1)):
        list_no = rng.choice(used_lists, size=n) * (16 // used_lists)
        codes = rng.integers(0, 256, size=(n, layout.code_size), dtype=np.uint8)
        p = ix.Partial.from_entries(list_no, np.arange(row, row + n, dtype=np.int64), codes)
        p.save(tmp_path / f"p{k}")
        folders.append(tmp_path / f"p{k}")
        parts.append(p)
        row += n
    reference = f.deserialize_index(f.serialize_index(trained))
    for p in parts:
        ix.fill_lists(ix.ivf_of(reference).invlists, p)
    ix.set_ntotal(reference, row)
    ours = f.deserialize_index(f.serialize_index(trained))
    ix.set_ntotal(ours, row)
    with ix.ListSlices(folders, layout) as lists:
        lists.write_file(tmp_path / "ours.faissindex",
                         ix.serialized_head(ours, layout) + ix.array_lists_header(lists.sizes, layout))
    assert (tmp_path / "ours.faissindex").read_bytes() == f.serialize_index(reference).tobytes()


def test_a_merge_streams_whatever_its_fan_in(tmp_path, monkeypatch):
    """Merging partials holds one slice of lists in memory, not the partials: the peak stays near the
    slice size while the merged data is 20x larger, and the merged partial equals an in-memory merge."""
    import tracemalloc

    from retro_dask.formats import inverted_lists as ix

    monkeypatch.setattr(ix, "SLICE_BYTES", 1 << 20)
    rng = np.random.default_rng(1)
    layout = ix.IndexLayout(64, 512, 1)
    folders, entries, row = [], [], 0
    for k in range(10):
        n = 4000
        list_no = rng.integers(0, 64, n)
        codes = rng.integers(0, 256, (n, 512), dtype=np.uint8)
        ix.Partial.from_entries(list_no, np.arange(row, row + n), codes).save(tmp_path / f"p{k}")
        folders.append(tmp_path / f"p{k}")
        entries.append((list_no, np.arange(row, row + n), codes))
        row += n
    tracemalloc.start()
    with ix.ListSlices(folders, layout) as lists:
        lists.write_partial(tmp_path / "merged")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 << 20, peak  # the partials hold 20 MB of codes
    merged = ix.Partial.load(tmp_path / "merged")
    expected = ix.Partial.from_entries(*(np.concatenate(x) for x in zip(*entries)))
    for name in ix.PARTIAL_FILES:
        np.testing.assert_array_equal(getattr(merged, name), getattr(expected, name))
