"""Pure arithmetic of blocks: how many, which rows, and how the executor cuts missing blocks into tasks."""

from __future__ import annotations

from typing import Iterable

# Spans shrink toward the end of a stage (guided self-scheduling) so that no
# worker waits long for the last one: each is 1/SPANS_PER_THREAD of what is left per thread.
SPANS_PER_THREAD = 4


def n_blocks(n_rows: int, block_size: int) -> int:
    return -(-int(n_rows) // int(block_size))


def block_rows(block: int, n_rows: int, block_size: int) -> tuple[int, int]:
    start = block * block_size
    return start, min(start + block_size, n_rows)


def iter_blocks(n_rows: int, block_size: int) -> Iterable[tuple[int, int, int]]:
    for b in range(n_blocks(n_rows, block_size)):
        yield (b, *block_rows(b, n_rows, block_size))


def spans(blocks: list[int], n_threads: int, max_span: int) -> list[list[int]]:
    """Cut ``blocks`` (ascending) into spans of consecutive blocks for one task each.

    A span never crosses a gap (a finished block) and holds
    ``ceil(remaining / (SPANS_PER_THREAD x threads))`` blocks, at most ``max_span``:
    large spans while much is left, single blocks at the end (334 blocks on 2
    threads, at most 16 a span: 39 tasks instead of 334).
    """
    out: list[list[int]] = []
    i = 0
    while i < len(blocks):
        size = max(1, min(max_span, -(-(len(blocks) - i) // (SPANS_PER_THREAD * max(1, n_threads)))))
        span = [blocks[i]]
        while len(span) < size and i + len(span) < len(blocks) and blocks[i + len(span)] == span[-1] + 1:
            span.append(blocks[i + len(span)])
        out.append(span)
        i += len(span)
    return out
