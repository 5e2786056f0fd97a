"""Chunk texts: the GPT detokenization of database chunks and of pretraining-sample chunks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..formats.indexed_dataset import IndexedDataset, open_dataset
from .gpt import GPTTokenizerSpec, get_gpt_tokenizer


def read_chunk_runs(ds: IndexedDataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokens of chunks ``rows`` (columns document, start, end), read one run of a document's chunks at a time.

    Returns the tokens of all chunks end to end, and where each chunk starts and
    ends in them. Consecutive chunks of a document are adjacent in the file, so
    a block of 1,024 chunks is a few dozen reads instead of 1,024.
    """
    docs, begin, end = rows[:, 0], rows[:, 1], rows[:, 2]
    new_run = np.ones(len(rows), dtype=bool)
    new_run[1:] = (docs[1:] != docs[:-1]) | (begin[1:] != end[:-1])
    firsts = np.flatnonzero(new_run)
    lasts = np.append(firsts[1:], len(rows)) - 1
    parts = [ds.get(int(docs[f]), int(begin[f]), int(end[last] - begin[f]))
             for f, last in zip(firsts.tolist(), lasts.tolist())]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Offset of each chunk in ``tokens``: its run's offset plus its start within the run.
    run_offset = np.zeros(len(firsts), dtype=np.int64)
    np.cumsum([len(p) for p in parts[:-1]], out=run_offset[1:])
    run_of = np.cumsum(new_run) - 1
    starts = run_offset[run_of] + begin - begin[firsts][run_of]
    return tokens, starts, starts + (end - begin)


def chunk_texts_of_rows(gpt, prefixes: Sequence[str], rows: np.ndarray, trim_eod: bool = False) -> list[str]:
    """GPT detokenization of chunks (rows of chunks.zarr or candidates), read and decoded one document run at a time.

    With ``trim_eod`` a row that ends its document loses a trailing end-of-document
    token: its end (``rows[:, 3]``) is lowered in place (db-build's length pass).
    """
    texts: list[str] = [""] * len(rows)
    for d in np.unique(rows[:, 0]):
        sel = np.flatnonzero(rows[:, 0] == d)
        ds = open_dataset(prefixes[int(d)])
        tokens, starts, ends = read_chunk_runs(ds, rows[sel, 1:4])
        if trim_eod:
            at_doc_end = np.flatnonzero(rows[sel, 3] == ds.sizes[rows[sel, 1]])
            trim = at_doc_end[(ends[at_doc_end] > starts[at_doc_end]) & (tokens[ends[at_doc_end] - 1] == gpt.eod)]
            ends[trim] -= 1
            rows[sel[trim], 3] -= 1
        for i, text in zip(sel.tolist(), gpt.decode_runs(tokens, starts, ends)):
            texts[i] = text
    return texts


def chunk_texts(gpt_spec: GPTTokenizerSpec, token_arrays: Sequence[np.ndarray]) -> list[str]:
    """GPT detokenization of chunks; end-of-document tokens inside a chunk are dropped.

    Database chunks never hold one (db-build trims it); a pretraining sample's
    chunk can span a document boundary, and the marker is not text.
    """
    gpt = get_gpt_tokenizer(gpt_spec)
    return [gpt.decode(t[t != gpt.eod] if len(t) and (t == gpt.eod).any() else t) for t in token_arrays]
