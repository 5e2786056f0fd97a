"""jsonl input: line-aligned byte ranges of a file, and the texts of a range, with errors that name the line.

One JSON object a line, the text under a key; blank lines are skipped. A range
starts at a line start, so each can be read by its own task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

from ..errors import InputError

# Bytes read at a time when looking for the next line end (small: lines are
# usually short, and a range may be small) and when counting lines.
_SCAN_BYTES = 64 << 10
_COUNT_BYTES = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, stop)`` of ``path``; ``start`` is a line start, ``stop`` a line start or EOF."""

    path: str
    start: int
    stop: int


def _next_line_start(f, pos: int, size: int) -> int:
    """The first line start at or after ``pos`` (``size`` if none), scanning in blocks."""
    if pos <= 0:
        return 0
    # Look from pos - 1: if the byte before pos is a newline, pos is itself a line start.
    f.seek(pos - 1)
    offset = pos - 1
    while offset < size:
        block = f.read(_SCAN_BYTES)
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return offset + i + 1
        offset += len(block)
    return size


def line_aligned_ranges(path: str, target: int) -> list[ByteRange]:
    """Cut a file into ranges of about ``target`` bytes that start at line starts.

    Only a block at each cut is read (never a whole line or file), so a file
    with very long lines costs the driver no memory.
    """
    if target <= 0:
        raise InputError(f"range size {target} bytes must be positive")
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + target < size:
            pos = _next_line_start(f, cuts[-1] + target, size)
            if pos >= size:
                break
            cuts.append(pos)
    cuts.append(size)
    return [ByteRange(path, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line that starts at byte ``offset`` (counted blockwise)."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(_COUNT_BYTES, remaining))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (for messages about the input)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def _where(path: str, offset: int) -> str:
    return f"{path}, line {_line_number(path, offset)}"


def iter_jsonl_texts(rng: ByteRange, key: str) -> Iterator[str]:
    """Yield the texts of the lines in a byte range, one line in memory at a time.

    Blank lines are skipped. Raises :class:`InputError` naming the file, the
    line number and the problem for a line that is not UTF-8, not JSON, not an
    object, lacks ``key``, or holds a non-string there.
    """
    with open(rng.path, "rb") as f:
        f.seek(rng.start)
        offset = rng.start
        while offset < rng.stop:
            raw = f.readline()
            if not raw:
                break
            line_offset = offset
            offset += len(raw)
            if line_offset == 0 and raw.startswith(_UTF8_BOM):
                # Windows tools often start UTF-8 files with a byte-order mark;
                # it is not part of the first object.
                raw = raw[len(_UTF8_BOM):]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{_where(rng.path, line_offset)}: bytes that are not UTF-8 at byte {line_offset + exc.start} "
                    f"({raw[exc.start:exc.start + 4]!r}); jsonl must be UTF-8: re-encode the file "
                    f"(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            # raw_decode skips json.loads' wrapper (a few % of a task's CPU); a
            # line it refuses (leading spaces, or bad JSON) goes through
            # json.loads, which accepts it or gives the standard message.
            try:
                obj, end = _DECODER.raw_decode(line)
                parsed = end == len(line) or not line[end:].strip()
            except ValueError:
                parsed = False
            try:
                if not parsed:
                    obj = json.loads(line)
            except ValueError as exc:
                raise InputError(
                    f"{_where(rng.path, line_offset)}: not JSON ({getattr(exc, 'msg', exc)}): "
                    f"{line.rstrip()[:80]!r}; every line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{_where(rng.path, line_offset)}: a JSON {_json_type(obj)}, not an object; every line "
                    f"must be one JSON object with the text under {key!r}"
                )
            if key not in obj:
                raise InputError(
                    f"{_where(rng.path, line_offset)}: no key {key!r} (keys found: {sorted(obj)}); "
                    f"choose the text's key with --json-keys"
                )
            text = obj[key]
            if not isinstance(text, str):
                raise InputError(
                    f"{_where(rng.path, line_offset)}: the value of {key!r} is a JSON {_json_type(text)} "
                    f"({json.dumps(text)[:40]}), not a string; the text must be a string"
                )
            yield text


def read_jsonl_texts(rng: ByteRange, key: str) -> list[str]:
    """The texts of the lines in a byte range (see :func:`iter_jsonl_texts`)."""
    return list(iter_jsonl_texts(rng, key))
