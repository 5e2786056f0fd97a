"""The plugins every build registers on its cluster (apart from cluster.py: processes that never
start a cluster, such as notebooks and synchronous runs, do not import distributed)."""

from __future__ import annotations

from distributed import SchedulerPlugin, WorkerPlugin

from .process_env import prepare_process


class ProcessSetup(WorkerPlugin):
    """Runs ``process_env.prepare_process`` on every worker of the cluster, including workers that join
    or are restarted later (the scheduler hands registered plugins to new workers)."""

    name = "retro-dask-process-setup"

    def setup(self, worker) -> None:
        prepare_process()


class TaskCounter(SchedulerPlugin):
    """The largest number of tasks the scheduler has held since the last ``take_max``: the executor's
    windows must keep it bounded whatever the corpus size."""

    name = "retro-dask-task-counter"

    def __init__(self) -> None:
        self.max_tasks = 0
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        n = len(self.scheduler.tasks)
        if n > self.max_tasks:
            self.max_tasks = n


def take_max_tasks(dask_scheduler) -> int | None:
    """Run on the scheduler: the counter's maximum, reset to the tasks held now (None without the plugin)."""
    plugin = dask_scheduler.plugins.get(TaskCounter.name)
    if plugin is None:
        return None
    out, plugin.max_tasks = plugin.max_tasks, len(dask_scheduler.tasks)
    return out
