"""The worker plugin every build registers on its cluster, apart from cluster.py so that
processes that never start a cluster (notebooks, synchronous runs) do not import distributed."""

from __future__ import annotations

from distributed import WorkerPlugin

from .cluster import prepare_process


class ProcessSetup(WorkerPlugin):
    """Runs ``cluster.prepare_process`` on every worker of the cluster, including workers that join
    or are restarted later (the scheduler hands registered plugins to new workers)."""

    name = "retro-dask-process-setup"

    def setup(self, worker) -> None:
        prepare_process()
