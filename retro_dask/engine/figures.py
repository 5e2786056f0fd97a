"""Per-block figures (seconds of each step, tokens, rows), summed in each process and collected per stage.

A block function calls :func:`add` with its numbers; the executor collects the
sums of every worker at the end of the stage (``client.run``) with each
process's memory at its largest block end, for ``W/stats/<stage>.json``. Figures
are for people, not for completion: a worker that died takes its sums with it.
"""

from __future__ import annotations

import threading
from typing import Any

from .process_env import process_memory, task_identity

_SUMS: dict[str, dict[str, float]] = {}
_MEMORY: dict[str, dict[str, float]] = {}
_LOCK = threading.Lock()


def add(stage: str, **numbers: float) -> None:
    """Add a block's numbers to this process's sums for ``stage``, and note its memory now."""
    memory = process_memory()
    with _LOCK:
        sums = _SUMS.setdefault(stage, {})
        for key, value in numbers.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        peaks = _MEMORY.setdefault(stage, {})
        for key, value in memory.items():
            peaks[key] = max(peaks.get(key, 0.0), value)


def take(stage: str) -> dict[str, Any]:
    """This process's sums and memory for ``stage``, and forget them (plus its peak RSS now)."""
    with _LOCK:
        sums = _SUMS.pop(stage, {})
        memory = _MEMORY.pop(stage, {})
    return {"sums": sums, "memory": {**memory, "rss_mb": process_memory()["rss_mb"]}}


def collect(client, stage: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Sums over every process, and the memory of each (by worker address; ``pid:N`` without a cluster)."""
    answers = {task_identity(): take(stage)} if client is None else client.run(take, stage)
    sums: dict[str, float] = {}
    for a in answers.values():
        for key, value in a["sums"].items():
            sums[key] = sums.get(key, 0.0) + value
    return sums, {who: a["memory"] for who, a in answers.items()}


def reset(client, stage: str) -> None:
    """Forget what an earlier run left in the processes for ``stage``."""
    take(stage)
    if client is not None:
        client.run(take, stage)
