"""The executor: runs a stage's block tasks on Dask, skipping finished blocks.

A stage hands the runner a number of blocks and a function that builds the
Dask task (a ``dask.delayed`` object) of one block. The runner checks the
stage's ledger, submits only the missing blocks (a bounded number in flight,
so a stage of a million blocks builds no million-task graph), shows a progress
bar, and collects each block's record. Without a client it computes each block
with Dask's synchronous scheduler in this process: the reference executor.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import dask

from . import faults
from .workdir import Ledger, atomic_write_json, stats_dir


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``VmHWM``. Not ``getrusage``'s ``ru_maxrss``, which exec carries over
    from the process image it replaces: a driver started by a 500 MB benchmark
    process, or a worker started by its ~80 MB nanny, reported that as its own
    peak (a child of a 400 MB parent: ru_maxrss 409 MB, VmHWM 14 MB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_breakdown_mb() -> dict[str, float]:
    """This process's resident memory now: anonymous (its own) and file-backed (mapped files, e.g. an index)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key = "rss_anon_mb" if line.startswith("RssAnon") else "rss_file_mb"
                    out[key] = round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return out


def task_identity() -> str:
    """Which process ran a task: the Dask worker's address, or ``pid:N``."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid:{os.getpid()}"


def current_worker():
    """The Dask worker running this task, or None outside one (synchronous runs, plain processes)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def block_task_threads() -> int:
    """Threads for a block task's own pool (Faiss's OpenMP).

    A Dask worker runs one block task per thread, so each gets one: more would
    put threads x threads on the cores. Without a cluster (synchronous runs)
    tasks run one at a time and get every core.
    """
    return 1 if current_worker() is not None else os.cpu_count() or 1


def worker_threads() -> int:
    """Threads a task that runs alone may use: the Dask worker's thread count, else every core."""
    worker = current_worker()
    return max(1, worker.state.nthreads) if worker is not None else os.cpu_count() or 1


PEAK_KEYS = ("rss_mb", "rss_anon_mb", "rss_file_mb")


@dataclass
class StageResult:
    """What the computed blocks of a stage reported, summed as they arrive.

    The driver keeps totals and per-worker peaks, not the records: a stage of
    a million blocks would otherwise hold a million dicts (~7 KB per block in
    db-build, measured with tracemalloc).
    """

    stage: str
    n_blocks: int
    skipped: int
    seconds: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.totals[key] = self.totals.get(key, 0.0) + float(value)
        worker = record.get("worker")
        if worker is not None:
            for key in PEAK_KEYS:
                if key in record:
                    per = self.peaks.setdefault(key, {})
                    per[worker] = max(per.get(worker, 0.0), float(record[key]))

    @property
    def computed(self) -> int:
        return self.n_blocks - self.skipped

    def total(self, key: str) -> float:
        return self.totals.get(key, 0.0)

    def worker_peak_rss(self, key: str = "rss_mb") -> dict[str, float]:
        """Per worker, the largest ``key`` its tasks reported (``rss_mb``: peak RSS so far;
        ``rss_anon_mb`` / ``rss_file_mb``: anonymous / file-backed RSS at the end of a task)."""
        return dict(self.peaks.get(key, {}))


# A task of a spanned stage computes at most this many blocks (unless the stage
# says otherwise); spans shrink toward the end of the stage so that no worker
# waits long for the last one.
MAX_SPAN = 16
SPANS_PER_THREAD = 4


@dataclass(frozen=True)
class BlockStage:
    """A block stage to run: its name (the ledger), block count, and task maker.

    ``make_span_task(blocks)``, if given, makes one task that computes several
    blocks in turn (at most ``max_span``) and returns their records as a list:
    for stages whose blocks take milliseconds, where Dask's cost per task would
    dominate.
    """

    stage: str
    n_blocks: int
    make_task: Callable[[int], Any]
    desc: str | None = None
    make_span_task: Callable[[list[int]], Any] | None = None
    max_span: int = MAX_SPAN


def run_each(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple]) -> list[dict[str, Any]]:
    """``[fn(*args) for args in calls]``: the body of a span task (``BlockStage.make_span_task``)."""
    return [fn(*args) for args in calls]


def guided_spans(blocks: list[int], n_threads: int, max_span: int = MAX_SPAN) -> list[list[int]]:
    """Cut ``blocks`` (in order) into spans of ``ceil(remaining / (4 x threads))`` blocks, at most ``max_span``.

    Guided self-scheduling: large spans while much is left, single blocks at
    the end. 334 blocks on 2 threads: 39 tasks instead of 334.
    """
    spans: list[list[int]] = []
    i = 0
    while i < len(blocks):
        size = max(1, min(max_span, -(-(len(blocks) - i) // (SPANS_PER_THREAD * max(1, n_threads)))))
        spans.append(blocks[i : i + size])
        i += size
    return spans


class Runner:
    """Runs tasks for one build: on a Dask client, or synchronously without one."""

    def __init__(self, workdir: str, client=None, progress: bool = True, log=print,
                 embed_batch_size: int | None = None):
        self.workdir = str(workdir)
        self.embed_batch_size = embed_batch_size
        self.client = client
        self.progress = progress
        self.log = log
        self.stage_stats: dict[str, dict[str, Any]] = {}

    # -- cluster facts

    @property
    def n_workers(self) -> int:
        if self.client is None:
            return 1
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    @property
    def n_threads(self) -> int:
        """Task slots of the cluster: the sum of the workers' threads."""
        if self.client is None:
            return 1
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers))

    def max_in_flight(self) -> int:
        return max(8, 4 * self.n_threads)

    # -- running

    def compute_one(self, obj):
        """Compute one delayed object (on a worker when there is a client)."""
        if self.client is None:
            return dask.compute(obj, scheduler="synchronous")[0]
        return self.client.compute(obj).result()

    def map_ordered(self, tasks):
        """Compute an iterable of delayed objects; yield results in order, few in flight."""
        if self.client is None:
            for t in tasks:
                yield dask.compute(t, scheduler="synchronous")[0]
            return
        from collections import deque

        window: deque = deque()
        in_flight = self.max_in_flight()  # asks the scheduler: once, not per task
        for t in tasks:
            window.append(self.client.compute(t))
            if len(window) >= in_flight:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def run_blocks(
        self,
        stage: str,
        n_blocks: int,
        make_task: Callable[[int], Any],
        *,
        desc: str | None = None,
        unit: str = "rows",
        rows_key: str = "n_rows",
        make_span_task: Callable[[list[int]], Any] | None = None,
        max_span: int = MAX_SPAN,
    ) -> StageResult:
        """Compute every block of ``stage`` that its ledger does not record as done.

        ``make_task(block)`` returns a ``dask.delayed`` whose result is the
        block's ledger record (written by the task itself after its data);
        ``make_span_task(blocks)``, if given, one whose result is the list of
        their records, used on a cluster to run several blocks per task
        (``guided_spans``, at most ``max_span`` blocks a task).
        Every block still has its own record, so a resumed run skips exactly the
        blocks that were finished.
        """
        spec = BlockStage(stage, n_blocks, make_task, desc, make_span_task, max_span)
        return self.run_stages([spec], desc=desc or stage, unit=unit, rows_key=rows_key)[stage]

    def run_stages(self, specs: list["BlockStage"], desc: str, unit: str = "rows",
                   rows_key: str = "n_rows") -> dict[str, StageResult]:
        """Run the missing blocks of several block stages as one stream of tasks.

        Stages run together keep every worker busy to the end, where running
        them one after another would leave workers idle at each stage's tail.
        """
        todo: list[tuple[str, list[int]]] = []
        skipped: dict[str, int] = {}
        for spec in specs:
            done = Ledger(self.workdir, spec.stage).done_blocks(spec.n_blocks)
            missing = [b for b in range(spec.n_blocks) if b not in done]
            skipped[spec.stage] = spec.n_blocks - len(missing)
            if skipped[spec.stage]:
                self.log(f"[{spec.desc or spec.stage}] {skipped[spec.stage]} of {spec.n_blocks} blocks already "
                         "done: skipped")
            if spec.make_span_task is not None and self.client is not None:
                spans = guided_spans(missing, self.n_threads, spec.max_span)
                todo += [(spec.stage, span) for span in spans]
            else:
                todo += [(spec.stage, [b]) for b in missing]
        by_stage = {spec.stage: spec for spec in specs}
        total = sum(spec.n_blocks for spec in specs)
        start = time.perf_counter()
        results = {spec.stage: StageResult(spec.stage, spec.n_blocks, skipped[spec.stage]) for spec in specs}
        bar = self._bar(desc, total, sum(skipped.values()), unit)
        rows_done = 0.0
        try:
            for stage, record in self._iterate(todo, by_stage):
                results[stage].add(record)
                rows_done += float(record.get(rows_key, 0) or 0)
                if bar is not None:
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rows_done / elapsed:,.0f} {unit}/s")
                faults.after_block(self.workdir, stage, int(record["block"]))
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        for result in results.values():
            result.seconds = seconds
        return results

    def _iterate(self, todo: list[tuple[str, list[int]]], specs: dict[str, BlockStage]):
        """Yield ``(stage, record)`` as tasks finish, keeping a bounded number in flight."""
        if not todo:
            return

        def task(stage: str, blocks: list[int]):
            if len(blocks) == 1:
                return specs[stage].make_task(blocks[0])
            return specs[stage].make_span_task(blocks)

        def records(result) -> list:
            return result if isinstance(result, list) else [result]

        if self.client is None:
            for stage, blocks in todo:
                for record in records(dask.compute(task(stage, blocks), scheduler="synchronous")[0]):
                    yield stage, record
            return
        from distributed import as_completed

        pending = iter(todo)
        stage_of: dict[str, str] = {}
        live: set = set()

        def submit(item):
            fut = self.client.compute(task(*item))
            stage_of[fut.key] = item[0]
            live.add(fut)
            return fut

        queue = as_completed([submit(item) for _, item in zip(range(self.max_in_flight()), pending)])
        try:
            for fut in queue:
                record = fut.result()
                live.discard(fut)
                stage = stage_of.pop(fut.key)
                fut.release()
                nxt = next(pending, None)
                if nxt is not None:
                    queue.add(submit(nxt))
                for r in records(record):
                    yield stage, r
        except BaseException:
            for f in live:
                f.cancel()
            raise

    def _bar(self, desc: str, total: int, initial: int, unit: str):
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="block", dynamic_ncols=True, file=sys.stderr)

    # -- figures

    def write_stats(self, stage: str, result: StageResult | None, seconds: float, **figures: Any) -> dict[str, Any]:
        """Write ``W/stats/<stage>.json``: time, counts, throughput, peak memory."""
        stats: dict[str, Any] = {
            "stage": stage,
            "seconds": round(seconds, 3),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            **figures,
        }
        if result is not None:
            stats.update(
                blocks=result.n_blocks,
                blocks_skipped=result.skipped,
                blocks_computed=result.computed,
                worker_peak_rss_mb={k: round(v, 1) for k, v in sorted(result.worker_peak_rss().items())},
                worker_rss_anon_mb={k: round(v, 1) for k, v in sorted(result.worker_peak_rss("rss_anon_mb").items())},
                worker_rss_file_mb={k: round(v, 1) for k, v in sorted(result.worker_peak_rss("rss_file_mb").items())},
            )
        atomic_write_json(stats_dir(self.workdir) / f"{stage}.json", stats)
        self.stage_stats[stage] = stats
        return stats


def block_record(n_rows: int, t0: float, **extra: Any) -> dict[str, Any]:
    """The figures every block task reports alongside its ledger record."""
    return {
        "n_rows": int(n_rows),
        "seconds": round(time.perf_counter() - t0, 4),
        "worker": task_identity(),
        "rss_mb": round(peak_rss_mb(), 1),
        **rss_breakdown_mb(),
        **extra,
    }
