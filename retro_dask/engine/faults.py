"""Fault injection for tests, in the spirit of Faiss's ``crash_at``.

Set ``RETRO_DASK_CRASH_AT`` to ``STAGE:BLOCK[:MODE]`` (several separated by
commas) before starting a build. Modes:

- ``raise`` (default): the task of that block raises ``InjectedFault``.
- ``kill-worker``: the worker process running that block kills itself with
  SIGKILL, once (a mark in ``.retro/faults`` makes the retry on another worker
  go through), as ``kill -9`` of one worker would.
- ``kill-driver``: the driver kills itself with SIGKILL right after that block
  is recorded as done, as ``kill -9`` of the build command would.
- ``disk-full``: the block's data write fails half-way with ENOSPC, into the
  temporary file the write renames into place, as a full disk would.

Environment variables reach LocalCluster workers because they are started
after the variable is set; for a ``--scheduler`` cluster, set it on the workers.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

ENV = "RETRO_DASK_CRASH_AT"
MODES = ("raise", "kill-worker", "kill-driver", "disk-full")


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` mode of the fault hook."""


def _armed(stage: str, block: int) -> list[str]:
    spec = os.environ.get(ENV, "")
    modes = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) < 2:
            continue
        mode = parts[2] if len(parts) > 2 else "raise"
        if parts[0] == stage and parts[1] == str(block):
            modes.append(mode)
    return modes


def _first_time(workdir: str, stage: str, block: int, mode: str) -> bool:
    """True once per (stage, block, mode) and workdir: later attempts go through."""
    mark = Path(workdir) / ".retro" / "faults" / f"{stage}-{block}-{mode}"
    mark.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def before_block(workdir: str, stage: str, block: int) -> None:
    """Called by a task before it writes its block."""
    for mode in _armed(stage, block):
        if mode == "raise":
            raise InjectedFault(f"injected fault at block {block} of stage {stage} ({ENV})")
        if mode == "kill-worker" and _first_time(workdir, stage, block, mode):
            os.kill(os.getpid(), signal.SIGKILL)


def after_block(workdir: str, stage: str, block: int) -> None:
    """Called by the driver after it has seen a block recorded as done."""
    for mode in _armed(stage, block):
        if mode == "kill-driver" and _first_time(workdir, stage, block, mode):
            os.kill(os.getpid(), signal.SIGKILL)


def atomic_file_write_hook(workdir: str, stage: str, block: int, path: Path, data: bytes) -> None:
    """Called before a block's data file is written to its temporary ``path``: under ``disk-full``,
    write half of ``data`` there and fail as a full disk would."""
    if "disk-full" in _armed(stage, block) and _first_time(workdir, stage, block, "disk-full"):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (simulated by RETRO_DASK_CRASH_AT)")
