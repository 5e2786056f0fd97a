"""Where a build runs: an embedded LocalCluster, an existing cluster, or CUDA workers.

- default: ``distributed.LocalCluster``, one process per core, one thread each,
  scheduler and dashboard bound to 127.0.0.1;
- ``--scheduler tcp://HOST:PORT`` (or ``tls://``): a cluster started with
  ``dask scheduler`` / ``dask worker``; every worker must see the workdir at the
  same path, which is checked before any work is sent;
- ``--cluster cuda``: dask-cuda's ``LocalCUDACluster``, one worker per GPU;
- ``--cluster synchronous``: no cluster, every task in this process (tests, debugging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

from .config import RunOptions
from .errors import MissingDependencyError, RetroError, WorkdirError

WORKER_ENV = {
    # The Rust tokenizers would otherwise start their own thread pool in every
    # single-thread worker and fight the other workers for the cores.
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# The embedded cluster's scheduler fails a task that has had no worker to run on for this long.
# Its nannies restart a killed worker within seconds; twice a test run saw both workers killed
# within 0.4 s, their replacements die at once and no further restart: the driver then waited
# forever on a cluster of no workers. Failing lets the command end with an error, and the same
# command resumes from the finished blocks. Paused workers (Dask pauses one at 80% of its memory
# limit) count as none, hence minutes rather than seconds.
NO_WORKERS_TIMEOUT = "600s"


def security_from(options: RunOptions):
    """``distributed.Security`` from the TLS files, or None for plain TCP."""
    if not (options.tls_ca_file or options.tls_cert or options.tls_key):
        return None
    missing = [f"{flag} {path}" for flag, path in (("--tls-ca-file", options.tls_ca_file), ("--tls-cert", options.tls_cert),
                                                   ("--tls-key", options.tls_key)) if path and not os.path.isfile(path)]
    if missing:
        raise RetroError(f"TLS file not found: {', '.join(missing)}")
    if not (options.tls_ca_file and options.tls_cert):
        raise RetroError("TLS needs at least --tls-ca-file and --tls-cert (and --tls-key unless the key is in the cert file)")
    from distributed.security import Security

    return Security(
        tls_ca_file=options.tls_ca_file,
        tls_client_cert=options.tls_cert,
        tls_client_key=options.tls_key,
        require_encryption=True,
    )


def _probe_workdir(path: str, token: str) -> str | None:
    """Run on each worker: can it read the probe the driver wrote, and write beside it?"""
    probe = Path(path) / ".retro" / f"probe-{token}"
    try:
        if probe.read_text() != token:
            return f"sees {probe} with other contents (another filesystem at the same path?)"
        reply = probe.with_name(probe.name + f"-{os.getpid()}")
        reply.write_text("ok")
        reply.unlink()
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror or exc}"
    return None


def check_workers_see_workdir(client, workdir: str) -> None:
    """Refuse to start unless every worker reads and writes the workdir at the same path."""
    token = uuid.uuid4().hex
    probe = Path(workdir) / ".retro" / f"probe-{token}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)
    try:
        answers = client.run(_probe_workdir, str(workdir), token)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    bad = {addr: msg for addr, msg in answers.items() if msg}
    if bad:
        lines = "\n".join(f"  {addr}: {msg}" for addr, msg in sorted(bad.items()))
        raise WorkdirError(
            f"some Dask workers cannot use the workdir {workdir}:\n{lines}\n"
            "Every worker must see the workdir at the same path (a shared filesystem); mount it there "
            "on those machines or start the workers where it is visible."
        )


# Two caches keep compiled matmul kernels per input shape, and BERT batches cut
# by length rarely repeat a shape: oneDNN's primitive cache (1,024 shapes by
# default) and PyTorch's ideep cache in front of it (LRU_CACHE_CAPACITY, also
# 1,024). With the defaults a worker's memory grew with every block (one process:
# 591 -> 837 MB over 8 blocks of fp32, 660 -> 1,430 MB over 12 of bf16); with
# only oneDNN's capped, bf16 still grew 757 -> 1,080 MB over 10 blocks. Eight
# entries each keep it flat (fp32 ~700 MB, bf16 ~880 MB from the fifth block on)
# at the same speed within the noise (RESULTS.md, profiling notes 11 and 18).
# What bf16 still adds, PyTorch's flash-attention kernels, is one set per chunk
# width, so bounded by --bert-max-chunk-length (note 19).
MODEL_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "8"}

# How often Dask's own monitors wake the embedded cluster's processes. At Dask's
# defaults (an event-loop tick every 20 ms, the memory monitor every 100 ms, the
# system monitor every 500 ms, a stack sample every 10 ms) each worker's event
# loop took 6% of a core and the scheduler another 6% during the embed stage, on
# the cores the forward passes run on (sample corpus, bf16, per-thread CPU time
# from /proc: worker main threads 3.1-3.4 CPU-s and the driver 3.1 CPU-s of a
# 53-s stage). At these settings: 1.9 and 1.3 CPU-s (RESULTS.md, profiling note
# 20). The dashboard keeps every page, sampled less often; a blocked event loop
# is still reported after 3 s, and memory limits are still checked 4 times a second.
MONITOR_CONFIG = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "250ms",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.profile.interval": "50ms",
    "distributed.worker.profile.cycle": "5s",
}


def spawn_environ() -> dict:
    """The environment the nannies of the embedded cluster start worker processes with.

    Dask's own (``distributed.nanny.pre-spawn-environ``), ``MODEL_ENV``, and ``MALLOC_ARENA_MAX=1``:
    glibc gives every thread but the main one its own malloc arena, and BERT's
    forward passes on a Dask task thread ran 3-9% slower than on a main thread,
    with 7x the page faults (RESULTS.md, profiling notes 6 and 10). It has to be in the
    environment when the process starts, hence here and not in ``WORKER_ENV``;
    for ``dask worker``, export it in the shell that starts them. (The nanny
    also leaves these variables in the driver's own environment.)
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    for key, value in {"MALLOC_ARENA_MAX": 1, **MODEL_ENV}.items():
        env.setdefault(key, value)
    return env


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> bool:
    """Keep a task's large temporary buffers in the heap instead of fresh mmaps on every call.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also
    freezes glibc's mmap threshold at 128 KiB: every larger buffer (BERT's
    activations, Faiss's distance tiles and normalized copies in index-add and
    the search) is then a new mmap whose pages fault in again on every call. A
    quarter of an embed worker's CPU time went to the kernel (RESULTS.md,
    profiling notes 6 and 21). Raising both thresholds lets the heap reuse those
    pages. Set at run time (``worker_plugin.ProcessSetup``), so it holds on any cluster.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def prepare_process() -> None:
    """What every process that runs block tasks needs: ``WORKER_ENV`` and the allocator thresholds."""
    os.environ.update(WORKER_ENV)
    tune_allocator()


@contextlib.contextmanager
def open_client(options: RunOptions, workdir: str, log=print) -> Iterator[object]:
    """Yield a ``distributed.Client`` for the build (or None for synchronous runs)."""
    os.environ.update(WORKER_ENV)  # inherited by LocalCluster workers
    if options.cluster == "synchronous" and not options.scheduler:
        yield None
        return
    from distributed import Client

    from .worker_plugin import ProcessSetup

    if options.scheduler:
        security = security_from(options)
        if options.scheduler.startswith("tls://") and security is None:
            raise RetroError(
                f"--scheduler {options.scheduler} speaks TLS: give --tls-ca-file, --tls-cert and --tls-key "
                "(the files `dask scheduler` and `dask worker` were started with)"
            )
        try:
            client = Client(options.scheduler, security=security, timeout="30s")
        except (OSError, TimeoutError, TypeError, ValueError) as exc:
            raise RetroError(
                f"could not connect to the Dask scheduler at {options.scheduler} ({exc}): is `dask scheduler` "
                "running there, and do the TLS settings match?"
            ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise RetroError(
                    f"no Dask worker joined the scheduler at {options.scheduler} within 60 s: start some with "
                    f"`dask worker {options.scheduler}`"
                ) from None
            client.register_plugin(ProcessSetup())
            check_workers_see_workdir(client, workdir)
            log(f"Dask scheduler {options.scheduler}: {len(client.scheduler_info(n_workers=-1)['workers'])} workers; "
                f"dashboard {client.dashboard_link}")
            yield client
        finally:
            client.close()
        return

    import dask

    if options.cluster == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise MissingDependencyError(
                "--cluster cuda needs dask-cuda: pip install 'retro-dask[gpu]' (or conda install -c rapidsai dask-cuda)"
            ) from None
        with dask.config.set(MONITOR_CONFIG):
            cluster = LocalCUDACluster(
                n_workers=options.n_workers, memory_limit=options.memory_limit or "auto",
                dashboard_address=options.dashboard_address, host="127.0.0.1",
            )
    else:
        from distributed import LocalCluster

        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_environ(),
                              "distributed.scheduler.no-workers-timeout": NO_WORKERS_TIMEOUT, **MONITOR_CONFIG}):
            cluster = LocalCluster(
                n_workers=options.n_workers or os.cpu_count() or 1,
                threads_per_worker=options.threads_per_worker,
                processes=True,
                memory_limit=options.memory_limit or "auto",
                host="127.0.0.1",
                dashboard_address=options.dashboard_address,
                silence_logs=logging.ERROR,
            )
    try:
        client = Client(cluster)
        try:
            client.register_plugin(ProcessSetup())
            log(f"Dask dashboard: {client.dashboard_link}  ({len(cluster.workers)} workers x "
                f"{options.threads_per_worker if options.cluster != 'cuda' else 1} thread)")
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
