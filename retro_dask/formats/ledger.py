"""The ledger: what is finished, one record per block, written by the executor alone.

``.retro/ledger/<stage>.jsonl`` holds a header line (the stage and a
fingerprint of what its blocks were computed from) and one JSON record per
finished block, appended by the driver after the block's files are in place:
``{"block": 3, "rows": [768, 1024], "files": {"db/embeddings.zarr/c/3/0": 98308}}``.
A block is done when its record is there, names the rows the stage now
expects, and every file it names still has the recorded size. A record torn
by a crash, a header with another fingerprint, or a file of another size
reads as not done. Records are not fsynced: the data files are not either, so
a durable record would not make its block survive a machine crash.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .workdir import atomic_write_bytes, ledger_path

FORMAT = 1


def file_sizes(workdir: str | Path, paths: Iterable[str | Path]) -> dict[str, int]:
    """``{path relative to the workdir: size}`` of files just written."""
    return {os.path.relpath(p, workdir): os.stat(p).st_size for p in paths}


def files_match(workdir: str | Path, files: dict[str, int]) -> bool:
    for rel, size in files.items():
        try:
            if os.stat(os.path.join(workdir, rel)).st_size != size:
                return False
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Ledger:
    """The completion records of one stage (see the module doc)."""

    workdir: str
    stage: str
    fingerprint: str = ""

    @property
    def path(self) -> Path:
        return ledger_path(self.workdir, self.stage)

    def _header(self) -> dict[str, Any]:
        return {"ledger": FORMAT, "stage": self.stage, "fingerprint": self.fingerprint}

    def records(self) -> dict[int, dict[str, Any]]:
        """The last record of each block, if the file's fingerprint is this ledger's."""
        try:
            lines = self.path.read_bytes().splitlines()
        except OSError:
            return {}
        if not lines:
            return {}
        try:
            if json.loads(lines[0]) != self._header():
                return {}
        except ValueError:
            return {}
        out: dict[int, dict[str, Any]] = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                block = int(rec["block"])
            except (ValueError, KeyError, TypeError):
                continue  # torn by a crash mid-write
            if rec.get("forgotten"):
                out.pop(block, None)
            else:
                out[block] = rec
        return out

    def stored_fingerprint(self) -> str | None:
        """The fingerprint the file on disk was written under (None without a file)."""
        try:
            with open(self.path, "rb") as f:
                return json.loads(f.readline()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def record(self, block: int) -> dict[str, Any] | None:
        return self.records().get(block)

    def done_blocks(self, n_blocks: int, rows_of: Callable[[int], tuple[int, int]] | None = None) -> set[int]:
        """Blocks whose record names the expected rows and whose files are as recorded."""
        done = set()
        for block, rec in self.records().items():
            if not 0 <= block < n_blocks:
                continue
            if rows_of is not None and tuple(rec.get("rows", ())) != tuple(rows_of(block)):
                continue
            if files_match(self.workdir, rec.get("files", {})):
                done.add(block)
        return done

    def complete(self, n_blocks: int) -> bool:
        """Every block has a record (files are not checked: ``done_blocks`` does that)."""
        records = self.records()
        return all(b in records for b in range(n_blocks))

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
        if not lines:
            return
        self.start()
        with open(self.path, "ab") as f:
            f.write(lines)

    def start(self) -> None:
        """A file with this ledger's header (a file of another fingerprint is replaced); a stage of no
        blocks is complete once it has one."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
            if json.loads(first) == self._header():
                return
        except (OSError, ValueError):
            pass
        atomic_write_bytes(self.path, json.dumps(self._header(), sort_keys=True).encode() + b"\n", fsync=False)

    def forget(self, blocks: Iterable[int]) -> None:
        self.append({"block": int(b), "forgotten": True} for b in blocks)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
