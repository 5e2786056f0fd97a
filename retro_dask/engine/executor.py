"""The executor: stores a stage's lazy Dask array into its target, only for the blocks not yet finished.

A stage hands it :class:`StoreJob`s: a target (a block grid over rows that
``dask.array.store`` writes into, ``targets.py``) and the stage's lazy array as
a function of a row range. The executor reads the stage's ledger, cuts the
missing blocks into spans (several blocks per Dask task where blocks take
milliseconds; ``plan.blocks.spans``), and for each span stores the lazy array of
those rows with ``da.store``. Spans are submitted in windows, so a stage of a
million blocks never builds a million-task graph, with a progress bar; when a
span's task is done, the executor records its blocks in the ledger: completion
has this one form. Without a client every task runs in this process on Dask's
synchronous scheduler: the reference executor. It also computes lazy results
that come back to the driver (``gather``: counts, checks) in the same windows.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import dask

from ..formats.ledger import Ledger
from ..formats.workdir import atomic_write_json, stats_dir
from ..plan.blocks import spans
from . import faults, figures
from .process_env import peak_rss_mb

# A task of a spanned stage computes at most this many blocks, unless the job says otherwise.
MAX_SPAN = 16
# Graphs are computed as built (``optimize_graph=False``): a stage fuses its own expression (StoreJob.task),
# so the dashboard's task stream names each stage's tasks (embed, index-encode, query-train) beside store-map.


@dataclass(frozen=True)
class StoreJob:
    """A stage's lazy array and where it is stored.

    ``expression(lo, hi)`` is the lazy array of rows ``lo:hi`` (one Dask chunk);
    ``span`` the most blocks one task computes; ``fingerprint`` what the blocks
    are computed from, beyond the workdir's config (a ledger of another
    fingerprint is void).
    """

    stage: str
    target: Any
    expression: Callable[[int, int], Any]
    span: int = 1
    fingerprint: str = ""

    def rows(self, blocks: list[int]) -> tuple[int, int]:
        return self.target.rows(blocks[0])[0], self.target.rows(blocks[-1])[1]

    def task(self, blocks: list[int]):
        """The Dask collection that computes and stores ``blocks`` (consecutive)."""
        import dask.array as da

        lo, hi = self.rows(blocks)
        # The expression's steps fuse into one task named by its last layer (the stage's own: embed,
        # index-encode, ...), with no separate read task holding its input; Dask's store-map task stays apart.
        (source,) = dask.optimize(self.expression(lo, hi))
        return da.store(source, self.target, regions=self.target.region(lo, hi), lock=False, compute=False)


@dataclass
class StageRun:
    """What one stage's store did."""

    stage: str
    n_blocks: int
    skipped: int
    rows: int = 0
    seconds: float = 0.0

    @property
    def computed(self) -> int:
        return self.n_blocks - self.skipped


@dataclass
class Executor:
    """Runs a build's tasks: on a ``distributed.Client``, or in this process without one."""

    workdir: str
    client: Any = None
    progress: bool = True
    log: Callable[[str], None] = print
    embed_batch_size: int | None = None
    stage_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_threads(self) -> int:
        """Task slots of the cluster: the sum of the workers' threads."""
        if self.client is None:
            return 1
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers))

    def window(self) -> int:
        """Tasks in flight at once: enough to keep every thread busy, few enough to keep the graph small."""
        return max(8, 4 * self.n_threads)

    # -- storing lazy arrays

    def store(self, jobs: list[StoreJob], desc: str, unit: str = "rows") -> dict[str, StageRun]:
        """Compute and store every block the ledgers do not record as done, in one stream of tasks
        (stages run together keep every worker busy to the end)."""
        todo: list[tuple[StoreJob, list[int]]] = []
        runs: dict[str, StageRun] = {}
        ledgers: dict[str, Ledger] = {}
        threads = self.n_threads
        for job in jobs:
            ledger = ledgers[job.stage] = Ledger(self.workdir, job.stage, job.fingerprint)
            ledger.start()
            n = job.target.n_blocks
            done = ledger.done_blocks(n, job.target.rows)
            missing = [b for b in range(n) if b not in done]
            runs[job.stage] = StageRun(job.stage, n, n - len(missing))
            if done:
                self.log(f"[{job.stage}] {len(done)} of {n} blocks already done: skipped")
            todo += [(job, s) for s in spans(missing, threads, job.span)]
            figures.reset(self.client, job.stage)
        total = sum(r.n_blocks for r in runs.values())
        bar = self._bar(desc, total, sum(r.skipped for r in runs.values()))
        start = time.perf_counter()
        rows = 0
        try:
            for job, blocks in self._run(todo, lambda item: item[0].task(item[1])):
                ledgers[job.stage].append(job.target.record(b) for b in blocks)
                lo, hi = job.rows(blocks)
                runs[job.stage].rows += hi - lo
                rows += hi - lo
                if bar is not None:
                    bar.update(len(blocks))
                    bar.set_postfix_str(f"{rows / max(time.perf_counter() - start, 1e-9):,.0f} {unit}/s")
                for b in blocks:
                    faults.after_block(self.workdir, job.stage, b)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        for run in runs.values():
            run.seconds = seconds
        return runs

    # -- completion records written outside store()

    def record(self, stage: str, records: Iterable[dict[str, Any]], fingerprint: str = "", fresh: bool = False) -> None:
        """Record blocks that a stage finished as one task or on the driver (a trained index, the document
        index, the sample): the ledger is written here and in ``store`` only. ``fresh`` drops earlier records."""
        ledger = Ledger(self.workdir, stage, fingerprint)
        if fresh:
            ledger.clear()
        ledger.append(records)

    def forget(self, stage: str, blocks: Iterable[int] | None = None, fingerprint: str = "") -> None:
        """Drop the records of ``blocks`` of a stage (all of them when None): they are computed again."""
        ledger = Ledger(self.workdir, stage, fingerprint)
        ledger.clear() if blocks is None else ledger.forget(blocks)

    # -- computing lazy results for the driver

    def gather(self, tasks: Iterable[Any], desc: str | None = None, total: int | None = None) -> Iterator[Any]:
        """Compute Dask collections (small results), a window at a time; yield their results in order."""
        bar = self._bar(desc, total or 0, 0, unit="task") if desc and total else None
        try:
            for _, result in self._run(((None, t) for t in tasks), lambda item: dask.optimize(item[1])[0],
                                       ordered=True):
                if bar is not None:
                    bar.update(1)
                yield result
        finally:
            if bar is not None:
                bar.close()

    def compute(self, collection: Any) -> Any:
        """Compute one collection (a task, or a reduction tree) on the cluster; return its result."""
        if self.client is None:
            return dask.compute(collection, scheduler="synchronous", optimize_graph=False)[0]
        future = self.client.compute(collection, optimize_graph=False)
        try:
            return future.result()
        finally:
            future.release()

    # -- the loop

    def _run(self, items: Iterable[Any], make: Callable[[Any], Any], ordered: bool = False) -> Iterator[Any]:
        """Yield ``item`` (or ``(item, result)`` when ``ordered``) as the task ``make(item)`` of each
        finishes (in ``items`` order when ``ordered``), a window of tasks in flight at a time."""
        if self.client is None:
            for item in items:
                result = dask.compute(make(item), scheduler="synchronous", optimize_graph=False)[0]
                yield (item, result) if ordered else item
            return
        from distributed import as_completed

        pending = iter(items)
        window = self.window()
        live: dict[Any, Any] = {}  # future -> item
        in_order: deque = deque()
        finished = None if ordered else as_completed()

        def submit(k: int) -> None:
            batch = [item for _, item in zip(range(k), pending)]
            if batch:  # one graph for the batch: one round trip to the scheduler
                for fut, item in zip(self.client.compute([make(item) for item in batch], optimize_graph=False), batch):
                    live[fut] = item
                    (in_order.append if ordered else finished.add)(fut)

        def done(fut) -> tuple[Any, Any]:
            result = fut.result()  # raises the task's error
            item = live.pop(fut)
            fut.release()
            if len(live) <= window // 2:
                submit(window - len(live))
            return item, result

        submit(window)
        try:
            if ordered:
                while in_order:
                    yield done(in_order.popleft())
            else:
                for fut in finished:
                    yield done(fut)[0]
        except BaseException:
            for fut in live:
                fut.cancel()
            raise

    def take_max_scheduler_tasks(self) -> int | None:
        """The most tasks the scheduler held since the last call (``plugins.TaskCounter``), or None."""
        if self.client is None:
            return None
        from .plugins import take_max_tasks

        try:
            return self.client.run_on_scheduler(take_max_tasks)
        except Exception:  # a scheduler without retro-dask: no figure
            return None

    def _bar(self, desc: str, total: int, initial: int, unit: str = "block"):
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    # -- figures

    def collect(self, *stages: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The block figures of ``stages``, summed over every process, and each process's memory."""
        sums: dict[str, float] = {}
        memory: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(stages):
            part, mem = figures.collect(self.client, name)
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
            for who, m in mem.items():
                mine = memory.setdefault(who, {})
                for k, v in m.items():
                    mine[k] = max(mine.get(k, 0.0), v)
        return sums, memory

    def write_stats(self, stage: str, run: StageRun | None, seconds: float,
                    collected: tuple[dict[str, float], dict[str, dict[str, float]]] | None = None,
                    **figures_: Any) -> dict[str, Any]:
        """Write ``W/stats/<stage>.json``: time, counts, throughput, the block figures (``collected``, by
        default those of ``run``'s stage) and the peak memory of the driver and of each worker."""
        stats: dict[str, Any] = {"stage": stage, "seconds": round(seconds, 3),
                                 "driver_peak_rss_mb": round(peak_rss_mb(), 1)}
        if run is not None:
            stats.update(blocks=run.n_blocks, blocks_skipped=run.skipped, blocks_computed=run.computed)
        if collected is None and run is not None:
            collected = self.collect(run.stage)
        if collected is not None:
            sums, memory = collected
            stats.update({f"{k}_total": round(v, 3) for k, v in sorted(sums.items())})
            for key, label in (("rss_mb", "worker_peak_rss_mb"), ("rss_anon_mb", "worker_rss_anon_mb"),
                               ("rss_file_mb", "worker_rss_file_mb")):
                stats[label] = {who: m[key] for who, m in sorted(memory.items()) if key in m}
        stats.update(figures_)
        if "scheduler_tasks_max" not in stats:
            tasks = self.take_max_scheduler_tasks()
            if tasks is not None:
                stats["scheduler_tasks_max"] = tasks
        atomic_write_json(stats_dir(self.workdir) / f"{stage}.json", stats)
        self.stage_stats[stage] = stats
        return stats


def _scheduler_task_count(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)
