"""Crashes, lost workers, corrupt blocks, bad input, concurrent runs, security."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, build_args, run_build, tree_bytes

WORKERS = ["--n-workers", "2", "--dashboard-address", "127.0.0.1:0"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under a folder (hidden state included), for 'left as it was' checks."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def records(workdir: Path, stage: str) -> dict[int, list[bytes]]:
    """Every record line of a stage's ledger, by block (a block computed twice has two)."""
    import json

    path = workdir / ".retro" / "ledger" / f"{stage}.jsonl"
    out: dict[int, list[bytes]] = {}
    for line in (path.read_bytes().splitlines()[1:] if path.exists() else []):
        out.setdefault(json.loads(line)["block"], []).append(line)
    return out


# ---------------------------------------------------------------- crashes


def test_killing_a_worker_in_every_stage(tmp_path, built_workdir, small_corpus_prefix, tiny_bert):
    """kill -9 of one worker in the middle of each stage: the run finishes, with identical outputs."""
    # db-build's length pass (db-candidates) has one block here: 4 x --block-size candidates.
    crash = ",".join(f"{stage}:1:kill-worker" for stage in ("db-chunks", "embed", "index-encode", "query-train")) + (
        ",db-candidates:0:kill-worker,index-train:0:kill-worker,index-assemble:0:kill-worker")
    w = tmp_path / "w"
    run_build(build_args(w, small_corpus_prefix, tiny_bert, *WORKERS), env={"RETRO_DASK_CRASH_AT": crash})
    marks = {p.name for p in (w / ".retro" / "faults").iterdir()}
    assert len(marks) == 7  # every kill happened
    assert tree_bytes(w) == tree_bytes(built_workdir)


def test_killing_the_driver_in_every_stage_then_resuming(tmp_path, built_workdir, small_corpus_prefix, tiny_bert):
    """kill -9 of the driver mid-stage, then the same command: it resumes and ends with identical bytes."""
    stages = ["db-candidates", "db-chunks", "embed", "index-encode", "query-train"]
    # db-build's length pass (db-candidates) has one block here: 4 x --block-size candidates.
    crash = ",".join(f"{s}:{0 if s == 'db-candidates' else 1}:kill-driver" for s in stages)
    w = tmp_path / "w"
    cmd = [sys.executable, str(ROOT / "scripts" / "build.py"), "--no-progress",
           *map(str, build_args(w, small_corpus_prefix, tiny_bert, *WORKERS))]
    env = {**os.environ, "RETRO_DASK_CRASH_AT": crash}
    killed = []
    for attempt in range(len(stages) + 2):
        before = {s: records(w, s) for s in stages}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        out = proc.communicate(timeout=600)[0]
        # The driver died alone; its workers would linger until they notice: stop them too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if attempt:
            assert "already done: skipped" in out, out
        for s in stages:  # blocks finished before the kill are not recomputed
            after = records(w, s)
            # index-encode's records go with its partials once the final index is recorded.
            gone_ok = s == "index-encode"
            assert all(after.get(block) == recs or (gone_ok and block not in after)
                       for block, recs in before[s].items()), (s, out)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, out
        killed.append(attempt)
    assert len(killed) == len(stages)
    assert tree_bytes(w) == tree_bytes(built_workdir)


def test_injected_fault_then_rerun(tmp_path, built_workdir, small_corpus_prefix, tiny_bert):
    w = tmp_path / "w"
    args = build_args(w, small_corpus_prefix, tiny_bert, *WORKERS)
    proc = run_build(args, env={"RETRO_DASK_CRASH_AT": "embed:2"}, check=False)
    assert proc.returncode != 0 and "injected fault at block 2 of stage embed" in proc.stdout + proc.stderr
    proc = run_build(args)
    assert "already done: skipped" in proc.stdout
    assert tree_bytes(w) == tree_bytes(built_workdir)


def test_full_disk_during_a_block_write_leaves_no_half_block(tmp_path, built_workdir, small_corpus_prefix, tiny_bert):
    w = tmp_path / "w"
    args = build_args(w, small_corpus_prefix, tiny_bert, "--cluster", "synchronous")
    proc = run_build(args, env={"RETRO_DASK_CRASH_AT": "embed:1:disk-full"}, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "No space left on device" in proc.stderr and "embeddings.zarr/c/1/0" in proc.stderr
    emb = w / "db" / "embeddings.zarr"
    assert not (emb / "c" / "1" / "0").exists()
    assert not [p for p in w.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert 1 not in records(w, "embed")
    run_build(args)
    assert tree_bytes(w) == tree_bytes(built_workdir)


# ---------------------------------------------------------------- verify


def test_verify_rebuilds_changed_and_truncated_blocks(tmp_path, built_workdir):
    w = tmp_path / "w"
    shutil.copytree(built_workdir, w)
    emb_chunk = w / "db" / "embeddings.zarr" / "c" / "1" / "0"
    emb_chunk.write_bytes(emb_chunk.read_bytes()[:100])  # truncated
    nb_chunk = w / "query" / "train" / "neighbors.zarr" / "c" / "0" / "0"
    data = bytearray(nb_chunk.read_bytes())
    data[-3] ^= 0xFF  # changed in place, same size
    nb_chunk.write_bytes(bytes(data))
    proc = run_build(["--workdir", w, "--tasks", "verify", "--verify-fraction", "1", "--n-workers", "2",
                      "--dashboard-address", "127.0.0.1:0"])
    assert "embed: " in proc.stdout and "block 1: file missing or truncated" in proc.stdout
    assert "query-train" in proc.stdout and "block 0:" in proc.stdout
    assert "recall@10 of the index" in proc.stdout and "recall@10 of the saved neighbours" in proc.stdout
    assert tree_bytes(w) == tree_bytes(built_workdir)
    proc = run_build(["--workdir", w, "--tasks", "verify", "--verify-fraction", "1", "--cluster", "synchronous"])
    assert "bad" not in proc.stdout.replace("bad=", "")


def flip_byte(path: Path, at: float = 0.5) -> None:
    """Change one byte in place: same size, another value."""
    data = bytearray(path.read_bytes())
    i = min(len(data) - 5, int(len(data) * at))
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


ARRAYS = {  # ledger stage -> array, whose last block gets one byte changed
    "db-candidates": "db/candidates.zarr", "db-chunks": "db/chunks.zarr", "db-sampled": "db/sampled.zarr",
    "embed": "db/embeddings.zarr", "query-train": "query/train/neighbors.zarr",
    "query-valid": "query/valid/neighbors.zarr",
}


def test_verify_finds_one_changed_byte_in_any_block_of_every_array(tmp_path, built_workdir):
    """One byte changed in the last block of every array (and in the document index and the index
    file), sizes unchanged: verify recomputes only one block per stage, yet reports every change from
    its checksum, rebuilds it, and the workdir ends with the bytes it had."""
    import zarr

    w = tmp_path / "w"
    shutil.copytree(built_workdir, w)
    last = {}
    for stage, rel in ARRAYS.items():
        arr = zarr.open_array(str(w / rel), mode="r")
        last[stage] = -(-arr.shape[0] // arr.chunks[0]) - 1
        chunk = w / rel / "c" / str(last[stage])
        flip_byte(chunk / "0" if arr.ndim == 2 else chunk)
    flip_byte(w / "db" / "doc_key.npy", 0.9)
    (index_file,) = w.glob("index/*/added.faissindex")
    flip_byte(index_file, 0.99)
    proc = run_build(["--workdir", w, "--tasks", "verify", "--verify-fraction", "0.01", "--n-workers", "2",
                      "--dashboard-address", "127.0.0.1:0"])
    import re

    for stage in ARRAYS:
        n_blocks, recomputed = map(int, re.search(rf"\] {stage}: (\d+) blocks, every checksum read, (\d+) recomputed",
                                                  proc.stdout).groups())
        assert recomputed <= 1 and n_blocks == last[stage] + 1, (stage, proc.stdout)
        assert f"block {last[stage]}: its crc32c checksum does not match" in proc.stdout, (stage, proc.stdout)
    assert sum(last.values()) >= 6  # most arrays have blocks that no recomputation looked at
    assert "db-docs: changed on disk" in proc.stdout
    assert "final index missing, truncated or changed on disk" in proc.stdout
    assert tree_bytes(w) == tree_bytes(built_workdir)
    proc = run_build(["--workdir", w, "--tasks", "verify", "--verify-fraction", "1", "--cluster", "synchronous"])
    assert " bad" not in proc.stdout and "rebuilding" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------- bad input


def corpus_args(w, corpus, bert, *extra):
    return ["--workdir", w, "--tasks", "build", "--data-path", "1", corpus, "--bert-model", bert,
            "--seq-length", "256", "--cluster", "synchronous", *extra]


BAD_INPUTS = [
    # (flags replacing the good ones, text the error must contain)
    (["--data-path", "1", "{corpus}", "2"], "--data-path has 3 values"),               # odd count
    (["--data-path", "one", "{corpus}"], "weight 'one'"),                              # weight not a number
    (["--data-path", "1", "/nonexistent/wiki"], "/nonexistent/wiki"),                  # no such prefix
    (["--index-str", "IVF16,Blat"], "Faiss rejects the index string"),                 # Faiss rejects it
    (["--index-str", "IVF4096,Flat"], "4096 inverted lists"),                          # lists beyond the sample
    (["--seq-length", "100"], "not a multiple of --chunk-length 64"),                  # seq vs chunk length
    (["--split", "99.9,0.1,0"], "cannot fill"),                                        # valid split too small
    (["--bert-model", "/nonexistent/bert"], "/nonexistent/bert: no such directory"),   # missing BERT
    (["--bert-model", "{notbert}"], "is not a BERT model"),                            # not a BERT
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, small_corpus_prefix, tiny_bert, flags, message):
    notbert = tmp_path / "notbert"
    notbert.mkdir()
    (notbert / "config.json").write_text('{"model_type": "gpt2"}')
    flags = [f.format(corpus=small_corpus_prefix, notbert=notbert) for f in flags]
    args = corpus_args(tmp_path / "w", small_corpus_prefix, tiny_bert)
    for flag in {f for f in flags if f.startswith("--")}:  # the bad flag replaces the good one
        i = args.index(flag) if flag in args else None
        if i is not None:
            del args[i : i + (3 if flag == "--data-path" else 2)]
    proc = run_build(args + flags, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_settings_that_differ_from_config_json_are_refused(tmp_path, small_corpus_prefix, tiny_bert):
    w = tmp_path / "w"
    run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"))
    before = snapshot(w)
    proc = run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build", "--chunk-length", "32",
                                 "--embed-dtype", "bf16"), check=False)
    assert proc.returncode == 2
    assert "chunk.chunk_length: workdir has 64, this run asks for 32" in proc.stderr
    assert "embed.embed_dtype: workdir has 'fp32', this run asks for 'bf16'" in proc.stderr
    assert snapshot(w) == before


def test_a_second_build_on_the_same_workdir_is_refused(tmp_path, small_corpus_prefix, tiny_bert):
    w = tmp_path / "w"
    run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"))
    from retro_dask.formats.workdir import WorkdirLock

    with WorkdirLock(w):
        proc = run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"), check=False)
    assert proc.returncode == 2
    assert f"in use by another build: pid {os.getpid()}" in proc.stderr


def test_read_only_workdir(tmp_path, small_corpus_prefix, tiny_bert):
    w = tmp_path / "w"
    run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"))
    before = snapshot(w)
    if os.geteuid() == 0:
        # Root ignores permissions: make the folder immutable for the run instead.
        if subprocess.run(["chattr", "+i", str(w)], capture_output=True).returncode != 0:
            pytest.skip("neither a non-root user nor chattr is available to make a read-only folder")
        try:
            proc = run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"), check=False)
        finally:
            subprocess.run(["chattr", "-i", str(w)])
    else:
        w.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            proc = run_build(corpus_args(w, small_corpus_prefix, tiny_bert, "--tasks", "db-build"), check=False)
        finally:
            w.chmod(stat.S_IRWXU)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"workdir {w} is not writable" in proc.stderr
    assert snapshot(w) == before


# ---------------------------------------------------------------- security


def test_nothing_in_a_workdir_is_unpickled():
    sources = [p for p in (ROOT / "retro_dask").rglob("*.py")]
    text = "\n".join(p.read_text() for p in sources)
    for forbidden in ("pickle.load", "torch.load", "allow_pickle=True", "joblib.load"):
        assert forbidden not in text
    for piece in text.split("np.load(")[1:]:  # numpy files are read with pickles refused
        assert "allow_pickle=False" in piece[:200]


def test_dashboard_binds_to_localhost(built_workdir, small_corpus_prefix, tiny_bert, tmp_path):
    proc = run_build(["--workdir", built_workdir, "--tasks", "db-build", "--n-workers", "1",
                      "--dashboard-address", "127.0.0.1:0"])
    assert "Dask dashboard: http://127.0.0.1:" in proc.stdout


def make_certificates(folder: Path) -> dict[str, str]:
    """A CA and a certificate it signs for 127.0.0.1 (openssl), for a TLS scheduler."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=retro-dask-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "node.pem", "-days", "2", "-extfile", "ext.cnf")
    return {k: str(folder / v) for k, v in (("ca", "ca.pem"), ("cert", "node.pem"), ("key", "node.key"))}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_scheduler(tmp_path, small_corpus_prefix, tiny_bert):
    from test_e2e import free_port

    certs = make_certificates(tmp_path)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    tls = ["--tls-ca-file", certs["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--protocol", "tls", "--dashboard-address", "127.0.0.1:0", *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--host", "127.0.0.1", *tls],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        w = tmp_path / "w"
        proc = run_build(["--workdir", w, "--tasks", "db-build", "--data-path", "1", small_corpus_prefix,
                          "--bert-model", tiny_bert, "--seq-length", "256", "--scheduler", address, *tls])
        assert f"Dask scheduler {address}" in proc.stdout
        assert (w / "db" / "chunks.zarr").exists()
        # Without the certificates: a clear error, not a hang.
        proc = run_build(["--workdir", w, "--tasks", "db-build", "--scheduler", address], check=False, timeout=120)
        assert proc.returncode == 2 and "speaks TLS: give --tls-ca-file" in proc.stderr
        # With a certificate the scheduler's CA did not sign: refused with the address named.
        other = make_certificates(tmp_path / "other") if (tmp_path / "other").mkdir() is None else None
        proc = run_build(["--workdir", w, "--tasks", "db-build", "--scheduler", address, "--tls-ca-file", other["ca"],
                          "--tls-cert", other["cert"], "--tls-key", other["key"]], check=False, timeout=120)
        assert proc.returncode == 2 and f"could not connect to the Dask scheduler at {address}" in proc.stderr
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def _can_hide_a_folder() -> bool:
    """A worker in its own mount namespace can have the workdir hidden under a tmpfs (needs root)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_hide_a_folder(), reason="needs unshare and mount (root) to hide the workdir from a worker")
def test_a_worker_that_cannot_see_the_workdir_gets_a_clear_error(tmp_path, small_corpus_prefix, tiny_bert):
    from test_e2e import free_port

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    shared = tmp_path / "shared"
    shared.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # This worker sees an empty folder where the workdir is: another filesystem at the same path.
        procs.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                       f"mount -t tmpfs tmpfs {shared} && exec {sys.executable} -m "
                                       f"distributed.cli.dask_worker {address} --nthreads 1 --host 127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        w = shared / "w"
        deadline = time.time() + 60
        from distributed import Client

        with Client(address, timeout=30) as client:  # wait until both workers joined
            client.wait_for_workers(2, timeout=60)
        t0 = time.time()
        proc = run_build(["--workdir", w, "--tasks", "db-build", "--data-path", "1", small_corpus_prefix,
                          "--bert-model", tiny_bert, "--seq-length", "256", "--scheduler", address],
                         check=False, timeout=120)
        assert time.time() < deadline + 120 and time.time() - t0 < 100
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "some Dask workers cannot use the workdir" in proc.stderr and "same path" in proc.stderr
        assert not (w / "db").exists()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_a_cluster_without_workers_ends_the_build_with_an_error(tmp_path, monkeypatch, capsys):
    """The embedded scheduler fails a task that waits for a worker past NO_WORKERS_TIMEOUT, and the
    command says what happened and how to go on, instead of waiting forever on a cluster of none."""
    from retro_dask import cli
    from retro_dask.engine import cluster
    from retro_dask.config import RunOptions

    monkeypatch.setattr(cluster, "NO_WORKERS_TIMEOUT", "3s")
    options = RunOptions(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0", progress=False)
    with cluster.open_client(options, str(tmp_path), log=lambda m: None) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.no_workers_timeout) == 3
        client.cluster.scale(0)
        while client.scheduler_info()["workers"]:
            time.sleep(0.1)
        error = client.submit(abs, -1).exception(timeout=60)
    assert type(error).__name__ in ("NoWorkerError", "NoValidWorkerError")

    def lost(args):
        raise error

    monkeypatch.setattr(cli, "run_build_command", lost)
    assert cli.build_main(["--workdir", str(tmp_path / "w")]) == 3
    assert "Rerun the same command" in capsys.readouterr().err
