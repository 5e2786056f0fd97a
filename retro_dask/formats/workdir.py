"""The workdir: where every output lives, and how it is written safely.

Paths are pure functions of the workdir (they are a public contract: see the
README). Files are written under a temporary name and moved into place with
``os.replace``; what is finished is recorded in the ledger (``ledger.py``). A
lock file keeps a second build off a workdir while one runs, and a folder that
holds something else is never taken for one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ..errors import WorkdirError

# ---------------------------------------------------------------- paths (contract)


def config_path(w: str | Path) -> Path:
    return Path(w) / "config.json"


def db_dir(w) -> Path:
    return Path(w) / "db"


def infos_path(w) -> Path:
    return db_dir(w) / "infos.json"


def chunks_path(w) -> Path:
    return db_dir(w) / "chunks.zarr"


def sampled_path(w) -> Path:
    return db_dir(w) / "sampled.zarr"


def embeddings_path(w) -> Path:
    return db_dir(w) / "embeddings.zarr"


def index_dir(w, tag: str) -> Path:
    return Path(w) / "index" / tag


def trained_index_path(w, tag: str) -> Path:
    return index_dir(w, tag) / "trained.faissindex"


def added_index_path(w, tag: str) -> Path:
    return index_dir(w, tag) / "added.faissindex"


def added_ivfdata_path(w, tag: str) -> Path:
    return index_dir(w, tag) / "added.ivfdata"


def query_dir(w, split: str) -> Path:
    return Path(w) / "query" / split


def neighbors_path(w, split: str) -> Path:
    return query_dir(w, split) / "neighbors.zarr"


def query_meta_path(w, split: str) -> Path:
    return query_dir(w, split) / "meta.json"


def tune_dir(w) -> Path:
    """The query chunks the tune measured recall on, and their embeddings (reused by query-neighbors)."""
    return Path(w) / "query" / "tune"


def stats_dir(w) -> Path:
    return Path(w) / "stats"


# ---------------------------------------------------------------- paths (internal)


def candidates_path(w) -> Path:
    """Every candidate chunk with its trimmed end and BERT length (before dropping)."""
    return db_dir(w) / "candidates.zarr"


def doc_starts_path(w) -> Path:
    """First chunks.zarr row of each document that has chunks (for the neighbour filter)."""
    return db_dir(w) / "doc_first_row.npy"


def doc_keys_path(w) -> Path:
    """``dataset_idx << 40 | document_idx`` of each document in ``doc_first_row.npy``."""
    return db_dir(w) / "doc_key.npy"


def index_partials_dir(w, tag: str) -> Path:
    return index_dir(w, tag) / "partials"


def samples_dir(w, split: str) -> Path:
    return query_dir(w, split) / "samples"


def state_dir(w) -> Path:
    """Ledgers, the lock and fault-injection marks: nothing a user reads."""
    return Path(w) / ".retro"


def lock_path(w) -> Path:
    return state_dir(w) / "lock"


def ledger_path(w, stage: str) -> Path:
    return state_dir(w) / "ledger" / f"{stage}.jsonl"


# ---------------------------------------------------------------- atomic writes

TMP_MARK = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def write_error(path: Path, exc: OSError) -> WorkdirError:
    hint = "free some space and rerun the same command" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (
        "make the workdir writable or choose another --workdir" if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
        else "fix the cause and rerun the same command")
    return WorkdirError(f"could not write {path}: {exc.strerror or exc} (errno {exc.errno}); nothing of it was kept; {hint}")


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``fsync`` also makes it durable before the rename (a machine crash keeps it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from exc


def atomic_write_json(path: str | Path, obj: Any, fsync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), fsync)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); move it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = temporary_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_leftover_temporaries(root: str | Path) -> int:
    """Delete temporaries that a killed process left behind; return how many."""
    removed = 0
    root = Path(root)
    if not root.exists():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if TMP_MARK in name:
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
                removed += 1
        for name in filenames:
            # zarr's own LocalStore writes chunks to NAME.<hex>.partial, then renames.
            if TMP_MARK in name or name.endswith(".partial"):
                with contextlib.suppress(OSError):
                    (Path(dirpath) / name).unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------- lock and checks


class WorkdirLock:
    """An exclusive ``flock`` on ``.retro/lock``; the kernel drops it if the holder dies.

    The file holds the holder's pid, host and start time so that a refused run
    can say who holds the workdir.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = lock_path(workdir)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another build: pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, running since {since} ({holder.get('command', '')}). "
                "Wait for it to finish or stop it; then rerun this command, which resumes where it stopped."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(os.sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(workdir: str | Path) -> None:
    """Fail early, with the fix, if the workdir cannot be created or written."""
    w = Path(workdir)
    try:
        w.mkdir(parents=True, exist_ok=True)
        probe = w / f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WorkdirError(
            f"workdir {w} is not writable ({exc.strerror or exc}): choose a writable --workdir "
            "or fix its permissions"
        ) from None


# What a workdir holds at its top level (README, "The workdir"); anything else means the folder is not one.
WORKDIR_ENTRIES = frozenset({"config.json", "db", "index", "query", "stats", ".retro"})


def check_is_workdir_or_new(workdir: str | Path) -> None:
    """Refuse a folder that exists, is not empty and holds no workdir: a build would write beside its files."""
    w = Path(workdir)
    if not w.is_dir():
        if w.exists():
            raise WorkdirError(f"--workdir {w} is a file, not a folder: choose a new or empty folder")
        return
    entries = sorted(p.name for p in w.iterdir())
    if not entries or config_path(w).exists() or state_dir(w).is_dir():
        return
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    raise WorkdirError(
        f"--workdir {w} is not empty and holds no retro-dask workdir (it has {shown}; a workdir has config.json "
        f"and .retro/): choose a new or empty folder, e.g. --workdir {w / 'retro-workdir'}"
    )
