"""A built workdir as lazy Dask arrays, for notebooks and your own Dask code.

    import retro_dask as rd
    w = rd.open_workdir("demo/workdir")
    w.chunks                              # int64 [n_chunks, 5], db/chunks.zarr
    w.embeddings                          # float [n_chunks, d], db/embeddings.zarr
    w.neighbors["train"]                  # int64 [n_samples * chunks_per_sample, K]
    rd.embed(w.chunks[:2048]).compute()   # embeds just those chunks

Every array is ``dask.array.from_zarr`` of the workdir's Zarr v3 arrays: slice
it, compose it, ``.visualize()`` it; ``.compute()`` runs on the Dask client of
your session if one is running (``distributed.Client``), else on Dask's local
scheduler. :func:`embed` is the embed stage's own ``map_blocks`` (the model
loaded once per worker process), applied to any chunk boundaries or texts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import BuildConfig, EmbedConfig
from ..errors import InputError
from ..formats.workdir import (
    chunks_path,
    config_path,
    embeddings_path,
    infos_path,
    neighbors_path,
    read_json,
    sampled_path,
)
from ..plan.chunks import SPLIT_NAMES

# The name of a workdir's lazy chunk array -> the workdir, so that embed() of any slice of it knows its corpora.
_ORIGINS: dict[str, str] = {}


def _lazy(path: Path, label: str):
    import dask.array as da
    from dask.base import tokenize

    st = os.stat(path / "zarr.json")
    return da.from_zarr(str(path), name=f"{label}-{tokenize(str(path), st.st_mtime_ns)}")


@dataclass
class Workdir:
    """A built workdir: its settings, its infos, and its arrays as lazy Dask arrays (see the module doc)."""

    path: str
    config: BuildConfig
    infos: list[dict[str, Any]]
    chunks: Any
    sampled: Any = None
    embeddings: Any = None
    neighbors: dict[str, Any] = field(default_factory=dict)

    def embed(self, x, batch_size: int | None = None):
        """Lazy embeddings of chunk boundaries (rows of ``chunks``) or texts, with this workdir's BERT."""
        return embed(x, workdir=self, batch_size=batch_size)

    def chunk_texts(self, rows) -> list[str]:
        """The texts of chunks (their chunks.zarr rows, as a NumPy or Dask array)."""
        from ..text.chunk_texts import chunk_texts_of_rows
        from ..text.gpt import get_gpt_tokenizer

        rows = np.asarray(rows.compute() if hasattr(rows, "compute") else rows, np.int64).reshape(-1, 5)
        return chunk_texts_of_rows(get_gpt_tokenizer(self.config.chunk.gpt_spec()), self.config.chunk.data.prefixes, rows)

    def __repr__(self) -> str:
        arrays = {"chunks": self.chunks, "embeddings": self.embeddings, "sampled": self.sampled,
                  **{f"neighbors[{s!r}]": a for s, a in self.neighbors.items()}}
        shown = ", ".join(f"{k}={a.shape} {a.dtype}" for k, a in arrays.items() if a is not None)
        return f"Workdir({self.path!r}: {shown})"


def open_workdir(path: str | os.PathLike) -> Workdir:
    """Open a workdir built by ``scripts/build.py``: every finished array as a lazy Dask array."""
    from ..stages.db import db_complete
    from ..stages.embed import embed_complete
    from ..stages.query import query_complete

    w = os.path.abspath(path)
    try:
        config = BuildConfig.from_dict(read_json(config_path(w)))
        infos = read_json(infos_path(w))
    except OSError as exc:
        raise InputError(f"{w} is not a built workdir ({exc.strerror or exc}): run scripts/build.py on it first") from None
    if not db_complete(w):
        raise InputError(f"{w}: db-build has not finished: run scripts/build.py --workdir {w} --tasks db-build")
    chunks = _lazy(chunks_path(w), "chunks")
    _ORIGINS[chunks.name] = w
    out = Workdir(w, config, infos, chunks, sampled=_lazy(sampled_path(w), "sampled"))
    if embed_complete(w):
        out.embeddings = _lazy(embeddings_path(w), "embeddings")
    for split in SPLIT_NAMES:
        if query_complete(w, split):
            out.neighbors[split] = _lazy(neighbors_path(w, split), f"neighbors-{split}")
    return out


def _workdir_of(x) -> str | None:
    """The workdir whose lazy chunk array ``x`` was sliced or computed from, if any."""
    for name in getattr(getattr(x, "dask", None), "layers", {}):
        if name in _ORIGINS:
            return _ORIGINS[name]
    return None


def _embed_texts(texts: np.ndarray, config: EmbedConfig, batch_size: int | None) -> np.ndarray:
    from ..text.embedder import get_embedder

    emb = get_embedder(config).embed_texts([str(t) for t in np.asarray(texts).ravel()], batch_size)
    return emb.astype(config.store_dtype, copy=False)


def embed(x, workdir: Workdir | str | None = None, config: EmbedConfig | None = None,
          batch_size: int | None = None, texts_per_task: int = 1024):
    """Lazy embeddings (float ``[n, d]``) of chunks or texts, with the embed stage's model and pooling.

    ``x`` is one of:

    - chunk boundaries: a Dask or NumPy int array ``[n, 5]`` of chunks.zarr rows
      (``open_workdir(W).chunks[a:b]``); their corpora and model come from the
      workdir they were read from, or from ``workdir``;
    - texts: a sequence of strings (or a Dask/NumPy array of them), embedded
      with ``config`` (default: the workdir's model if ``workdir`` is given, else
      all-MiniLM-L6-v2), ``texts_per_task`` a task.

    The result is lazy: ``.compute()`` it, on your own ``distributed.Client`` if one runs.
    """
    import dask.array as da
    from dask.base import tokenize

    from ..stages.embed import embeddings
    from ..text.embedder import embedding_dim

    if isinstance(workdir, (str, os.PathLike)):
        workdir = open_workdir(workdir)
    is_array = hasattr(x, "dtype") and hasattr(x, "shape")
    if is_array and np.dtype(x.dtype).kind in "iu":
        if x.ndim != 2 or x.shape[1] < 4:
            raise InputError(f"embed() takes chunk boundaries as int rows [n, 5] of chunks.zarr; got shape {x.shape}")
        path = workdir.path if workdir is not None else _workdir_of(x)
        if path is None:
            raise InputError("embed(): these chunk boundaries do not come from a workdir opened with "
                             "open_workdir; pass workdir=open_workdir(W) (its corpora hold the chunks' tokens)")
        wd = workdir if workdir is not None else open_workdir(path)
        lazy = x if isinstance(x, da.Array) else da.from_array(np.asarray(x, np.int64), chunks=(1024, -1))
        cfg = config or wd.config.embed
        return embeddings(lazy, cfg, wd.config.chunk.gpt_spec(), tuple(wd.config.chunk.data.prefixes), batch_size)
    if isinstance(x, str):
        raise InputError("embed() takes a sequence of texts, not one string: embed([text])")
    cfg = config or (workdir.config.embed if workdir is not None else EmbedConfig())
    texts = x if isinstance(x, da.Array) else np.asarray(list(x) if not is_array else x, dtype=object)
    lazy = texts if isinstance(texts, da.Array) else da.from_array(texts, chunks=texts_per_task)
    if lazy.ndim != 1:
        raise InputError(f"embed() takes a 1-D sequence of texts; got shape {lazy.shape}")
    dim = embedding_dim(cfg.bert_model)
    return lazy.map_blocks(_embed_texts, cfg, batch_size, chunks=(lazy.chunks[0], (dim,)), new_axis=1,
                           dtype=np.dtype(cfg.store_dtype), name=f"embed-texts-{tokenize(lazy.name, cfg, batch_size)}",
                           meta=np.empty((0, 0), np.dtype(cfg.store_dtype)))


def embed_texts(texts: Sequence[str], config: EmbedConfig | None = None) -> np.ndarray:
    """Embeddings of a few strings, computed now in this process (notebooks, ad-hoc queries)."""
    from ..text.embedder import get_embedder

    return get_embedder(config or EmbedConfig()).embed_texts(list(texts))
