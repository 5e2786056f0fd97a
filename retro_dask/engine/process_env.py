"""What every process that runs block tasks needs: its environment, allocator, threads and memory figures."""

from __future__ import annotations

import os
import resource

WORKER_ENV = {
    # The Rust tokenizers would otherwise start a thread pool in every single-thread worker.
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

# oneDNN's and PyTorch's kernel caches keep an entry per batch shape; capped, a
# worker's memory stays flat at the same speed (RESULTS.md, notes 11 and 18).
MODEL_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "8"}

# Dask's own monitors wake less often than its defaults on the embedded cluster:
# at the defaults they took ~6% of each core from the forward passes (RESULTS.md, note 20).
MONITOR_CONFIG = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "250ms",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.profile.interval": "50ms",
    "distributed.worker.profile.cycle": "5s",
}


def spawn_environ() -> dict:
    """The environment the embedded cluster's nannies start workers with: Dask's own, ``MODEL_ENV`` and
    ``MALLOC_ARENA_MAX=1`` (a thread's own malloc arena slowed BERT by 3-9%: RESULTS.md, notes 6 and 10),
    which must be set before the process starts."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    for key, value in {"MALLOC_ARENA_MAX": 1, **MODEL_ENV}.items():
        env.setdefault(key, value)
    return env


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> bool:
    """Keep large temporary buffers (BERT activations, Faiss distance tiles) in the heap.

    Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which freezes glibc's mmap
    threshold at 128 KiB: every larger buffer is then a fresh mmap that faults
    its pages in again (RESULTS.md, notes 6 and 21). Set at run time, so it holds on any cluster.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def prepare_process() -> None:
    """``WORKER_ENV`` and the allocator thresholds, for a process about to run block tasks."""
    os.environ.update(WORKER_ENV)
    tune_allocator()


def current_worker():
    """The Dask worker running this task, or None outside one (synchronous runs, plain processes)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def block_task_threads() -> int:
    """Threads for a block task's own pool (Faiss's OpenMP): one in a Dask worker, which runs a task
    per thread; every core in a plain process, which runs one task at a time."""
    return 1 if current_worker() is not None else os.cpu_count() or 1


def worker_threads() -> int:
    """Threads a task that runs alone may use: the Dask worker's thread count, else every core."""
    worker = current_worker()
    return max(1, worker.state.nthreads) if worker is not None else os.cpu_count() or 1


def task_identity() -> str:
    """Which process runs this: the Dask worker's address, or ``pid:N``."""
    worker = current_worker()
    return worker.address if worker is not None else f"pid:{os.getpid()}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: Linux's ``VmHWM``, not ``ru_maxrss``,
    which exec carries over from the process image it replaces (a nanny's, a benchmark's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def process_memory() -> dict[str, float]:
    """This process's peak RSS, and its resident memory now: anonymous (its own) and file-backed (mapped files)."""
    out = {"rss_mb": round(peak_rss_mb(), 1)}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key = "rss_anon_mb" if line.startswith("RssAnon") else "rss_file_mb"
                    out[key] = round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return out
