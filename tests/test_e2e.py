"""scripts/build.py end to end: the workdir contract, RetroDataset, clusters, dashboard."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import zarr

from conftest import ROOT, build_args, page_faults_of_large_buffers, run_build, tree_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workdir_contract(built_workdir):
    w = built_workdir
    config = json.loads((w / "config.json").read_text())
    assert config["fingerprint"] and config["chunk"]["chunk_length"] == 64
    infos = json.loads((w / "db" / "infos.json").read_text())
    assert set(infos[0]) == {"ratio", "prefix", "n_docs", "n_docs_train", "n_chunks", "n_chunks_train",
                             "n_chunks_invalid", "n_chunks_sampled"}
    chunks = zarr.open_array(str(w / "db" / "chunks.zarr"), mode="r")
    assert chunks.dtype == np.int64 and chunks.shape[1] == 5 and chunks.shape[0] == infos[0]["n_chunks_train"]
    emb = zarr.open_array(str(w / "db" / "embeddings.zarr"), mode="r")
    assert emb.shape == (chunks.shape[0], 32) and emb.chunks[0] == chunks.chunks[0]
    sampled = zarr.open_array(str(w / "db" / "sampled.zarr"), mode="r")[:]
    assert np.all(np.diff(sampled) > 0) and len(sampled) == infos[0]["n_chunks_sampled"]
    (tag,) = [p.name for p in (w / "index").iterdir()]
    assert (w / "index" / tag / "trained.faissindex").exists() and (w / "index" / tag / "added.faissindex").exists()
    for split in ("train", "valid", "test"):
        meta = json.loads((w / "query" / split / "meta.json").read_text())
        assert {"seq_length", "n_samples", "seed", "data_blend", "split", "chunk_length", "hash"} <= set(meta)
        nb = zarr.open_array(str(w / "query" / split / "neighbors.zarr"), mode="r")
        assert nb.dtype == np.int64 and nb.shape == (meta["n_samples"] * 4, 20)
    stats = {p.stem for p in (w / "stats").glob("*.json")}
    assert {"db-build", "embed", "index-train", "index-add", "query-neighbors"} <= stats
    embed_stats = json.loads((w / "stats" / "embed.json").read_text())
    assert embed_stats["seconds"] > 0 and embed_stats["worker_peak_rss_mb"]


def test_every_workdir_array_opens_with_dask_from_zarr(built_workdir):
    """Any Zarr v3 reader reads the workdir: dask.array.from_zarr gives every array, equal to zarr's read."""
    import dask.array as da

    found = sorted(built_workdir.rglob("*.zarr"))
    assert {p.relative_to(built_workdir).as_posix() for p in found} >= {
        "db/chunks.zarr", "db/candidates.zarr", "db/sampled.zarr", "db/embeddings.zarr",
        "query/train/neighbors.zarr", "query/valid/neighbors.zarr", "query/test/neighbors.zarr"}
    for path in found:
        lazy = da.from_zarr(str(path))
        stored = zarr.open_array(str(path), mode="r")
        assert lazy.shape == stored.shape and lazy.dtype == stored.dtype
        np.testing.assert_array_equal(lazy.compute(scheduler="synchronous"), stored[:])


def test_open_workdir_gives_lazy_arrays_and_embed_recomputes_them(built_workdir):
    """The notebook API: the workdir's arrays as Dask arrays; embed() of a slice of the chunks is the
    embed stage's map_blocks, equal to the stored embeddings."""
    import dask.array as da

    import retro_dask as rd

    w = rd.open_workdir(built_workdir)
    assert all(isinstance(a, da.Array) for a in (w.chunks, w.embeddings, w.sampled, *w.neighbors.values()))
    assert set(w.neighbors) == {"train", "valid", "test"}
    assert w.chunks.shape[0] == w.embeddings.shape[0] and w.chunks.dtype == np.int64
    lazy = rd.embed(w.chunks[100:400])
    assert isinstance(lazy, da.Array) and lazy.shape == (300, 32)
    assert any(name.startswith("embed-") for name in lazy.dask.layers)  # the stage's own map_blocks
    got, want = lazy.compute(), w.embeddings[100:400].compute()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    texts = w.chunk_texts(w.chunks[100:102])
    np.testing.assert_allclose(rd.embed(texts, workdir=w).compute(), want[:2], rtol=1e-4, atol=1e-5)


def test_embed_runs_on_the_users_own_client(built_workdir):
    """A notebook's own distributed.Client computes the lazy embeddings (the model loaded in its workers)."""
    from distributed import Client, LocalCluster

    import retro_dask as rd

    w = rd.open_workdir(built_workdir)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = rd.embed(w.chunks[:300]).compute()
        assert client.run(lambda: __import__("sys").modules.get("retro_dask.text.embedder") is not None)
        assert list(client.run(lambda: True).values()) == [True]
    want = w.embeddings[:300].compute()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999


def test_a_folder_that_holds_something_else_is_refused(tmp_path, small_corpus_prefix, tiny_bert):
    """A non-empty folder that is no workdir is never written into."""
    folder = tmp_path / "home"
    (folder / "usr" / "bin").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    proc = run_build(build_args(folder, small_corpus_prefix, tiny_bert, "--cluster", "synchronous"), check=False)
    assert proc.returncode == 2 and "is not empty and holds no retro-dask workdir" in proc.stderr
    assert "notes.txt, usr" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "usr"]


def test_no_neighbor_from_its_own_sample(built_workdir):
    """Checked over every row of every split."""
    from retro_dask.plan.chunks import doc_key
    from retro_dask.formats.sample_maps import Samples

    w = built_workdir
    chunks = zarr.open_array(str(w / "db" / "chunks.zarr"), mode="r")[:]
    key_of_row = doc_key(chunks[:, 0], chunks[:, 1])
    checked = 0
    for split in ("train", "valid", "test"):
        samples = Samples(w, split)
        nb = zarr.open_array(str(w / "query" / split / "neighbors.zarr"), mode="r")[:]
        cps = samples.chunks_per_sample
        for s in range(len(samples)):
            k, docs = samples.documents(s)
            own = set(doc_key(k, docs).tolist())
            rows = nb[s * cps : (s + 1) * cps]
            found = rows[rows >= 0]
            assert not (set(key_of_row[found].tolist()) & own)
            # Saved neighbours come first, -1 only after them.
            assert np.all((rows >= 0)[:, :-1] >= (rows >= 0)[:, 1:])
            checked += rows.size
    assert checked > 0


def test_retro_dataset_item(built_workdir):
    from retro_dask import RetroDataset
    from retro_dask.formats.sample_maps import Samples

    ds = RetroDataset(built_workdir, "train", num_neighbors=2, num_retrieved_chunks=2)
    item = ds[3]
    assert item["text"].shape == (257,) and item["text"].dtype.is_floating_point is False
    assert item["neighbor_chunks"].shape == (4, 2, 2)
    assert item["neighbor_tokens"].shape == (4, 2, 128)
    assert item["neighbor_mask"].shape == (4, 2)
    np.testing.assert_array_equal(item["text"].numpy(), Samples(built_workdir, "train").tokens(3))
    chunks = zarr.open_array(str(built_workdir / "db" / "chunks.zarr"), mode="r")[:]
    nb = item["neighbor_chunks"].numpy()
    for c in range(4):
        for k in range(2):
            first, cont = nb[c, k]
            if first >= 0 and cont >= 0:
                assert cont == first + 1 and (chunks[cont, :2] == chunks[first, :2]).all()
            if first >= 0 and cont < 0:  # the document ended: padding, not the next document
                assert first + 1 == len(chunks) or (chunks[first + 1, :2] != chunks[first, :2]).any()


def test_retro_dataset_in_a_multiworker_dataloader(built_workdir):
    import torch

    from retro_dask import RetroDataset

    ds = RetroDataset(built_workdir, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False, collate_fn=RetroDataset.collate)
    batches = [b for _, b in zip(range(3), loader)]
    for j, batch in enumerate(batches):
        assert batch["text"].shape == (3, 257) and batch["neighbor_tokens"].shape == (3, 4, 2, 128)
        for r in range(3):
            item = ds[3 * j + r]
            np.testing.assert_array_equal(batch["neighbor_chunks"][r].numpy(), item["neighbor_chunks"].numpy())
            n = len(item["document_ids"])
            np.testing.assert_array_equal(batch["document_ids"][r, :n].numpy(), item["document_ids"].numpy())
            assert (batch["document_ids"][r, n:] == -1).all()


@contextlib.contextmanager
def dask_scheduler_with_workers(n_workers: int, env: dict):
    """A `dask scheduler` and ``n_workers`` single-thread `dask worker` processes on 127.0.0.1; yields the address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        for _ in range(n_workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        yield address
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_same_bytes_on_a_dask_scheduler_with_two_workers(built_workdir, tmp_path, small_corpus_prefix, tiny_bert):
    """A cluster of one's own gives the same bytes; its dashboard's task stream names every stage's tasks."""
    from distributed import Client, get_task_stream

    with dask_scheduler_with_workers(2, {**os.environ, "TOKENIZERS_PARALLELISM": "false"}) as address:
        w = tmp_path / "w"
        with Client(address, timeout=30) as client, get_task_stream(client=client) as stream:
            client.wait_for_workers(2, timeout=60)
            run_build(build_args(w, small_corpus_prefix, tiny_bert, "--scheduler", address))
        assert tree_bytes(w) == tree_bytes(built_workdir)
    from dask.utils import key_split

    names = {key_split(t["key"]) for t in stream.data}
    assert {"db-candidates", "db-chunks", "db-docs", "embed", "index-train", "index-encode", "index-add", "tune",
            "query-train", "query-valid", "leakage-valid", "store-map"} <= names, names


def test_workers_of_a_dask_scheduler_get_the_allocator_settings(tmp_path):
    """The build's worker plugin tunes glibc in workers it did not start (RESULTS.md note 21):
    `dask worker` starts them with Dask's MALLOC_TRIM_THRESHOLD_, and 50 buffers of 1 MiB
    then fault ~12,800 pages in."""
    from retro_dask.engine.cluster import open_client
    from retro_dask.config import RunOptions

    # The worker can import conftest, for the probe.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    with dask_scheduler_with_workers(1, env) as address:
        options = RunOptions(scheduler=address, progress=False)
        with open_client(options, str(tmp_path), log=lambda m: None) as client:
            faults = client.run(page_faults_of_large_buffers)
        assert len(faults) == 1 and max(faults.values()) < 2_000, faults


def test_dashboard_answers_during_a_run(tmp_path, small_corpus_prefix, tiny_bert):
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--no-progress",
           *build_args(tmp_path / "w", small_corpus_prefix, tiny_bert, "--dashboard-address", f"127.0.0.1:{port}")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                    status = r.status
            except OSError:
                time.sleep(0.2)
    finally:
        out = proc.communicate(timeout=300)[0]
    assert status == 200, out
    assert proc.returncode == 0, out


def test_config_file_and_rerun_from_config_json(tmp_path, small_corpus_prefix, tiny_bert):
    """--config gives the options; a rerun needs only --workdir and --tasks."""
    cfg = tmp_path / "retro.yaml"
    cfg.write_text(f"data-path: [1, {small_corpus_prefix}]\nbert-model: {tiny_bert}\nseq-length: 256\n"
                   "block-size: 256\nsplit: 90,10,0\ncluster: synchronous\n")
    w = tmp_path / "w"
    run_build(["--workdir", w, "--tasks", "db-build", "--config", cfg])
    proc = run_build(["--workdir", w, "--tasks", "db-build", "--cluster", "synchronous"])
    assert "already done: skipped" in proc.stdout


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py"), "--help"], capture_output=True, text=True)
    from retro_dask.cli import RUNTIME, SHAPING

    for name in list(SHAPING) + list(RUNTIME):
        assert "--" + name.replace("_", "-") in proc.stdout
    assert "(default: 2048)" in proc.stdout


def test_example_notebook_runs_top_to_bottom(built_workdir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RETRO_WORKDIR", str(built_workdir))
    nb = nbformat.read(ROOT / "examples" / "inspect_workdir.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "neighbour 0: chunk" in outputs
    # The lazy API: embed() of the workdir's chunks gives back its stored embeddings.
    import re

    lowest = float(re.search(r"lowest cosine to the stored embeddings: ([0-9.]+)", outputs).group(1))
    assert lowest >= 0.9999, outputs
