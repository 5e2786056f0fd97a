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

from ..config import RunOptions
from ..errors import MissingDependencyError, RetroError, WorkdirError
from .process_env import MONITOR_CONFIG, WORKER_ENV, spawn_environ

# The embedded cluster's scheduler fails a task that has had no worker for this long, so that a
# cluster whose workers all died ends the command with an error (rerun resumes) instead of a
# wait forever. Paused workers (at 80% of their memory limit) count as none: minutes, not seconds.
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


def register_task_counter(client, log) -> None:
    """The scheduler plugin behind the ``scheduler_tasks_max`` figure; a scheduler that cannot load it
    (retro-dask not installed beside it) only loses the figure."""
    from .plugins import TaskCounter

    try:
        client.register_plugin(TaskCounter())
    except Exception as exc:  # the scheduler could not unpickle it
        log(f"note: the scheduler could not load retro-dask's task counter ({type(exc).__name__}); "
            "the stats will not say how many tasks it held")


@contextlib.contextmanager
def open_client(options: RunOptions, workdir: str, log=print) -> Iterator[object]:
    """Yield a ``distributed.Client`` for the build (or None for synchronous runs)."""
    os.environ.update(WORKER_ENV)  # inherited by LocalCluster workers
    if options.cluster == "synchronous" and not options.scheduler:
        yield None
        return
    from distributed import Client

    from .plugins import ProcessSetup

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
            register_task_counter(client, log)
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
            register_task_counter(client, log)
            log(f"Dask dashboard: {client.dashboard_link}  ({len(cluster.workers)} workers x "
                f"{options.threads_per_worker if options.cluster != 'cuda' else 1} thread)")
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
