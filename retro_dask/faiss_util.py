"""Faiss, imported in one place, with the install hint when it is missing."""

from __future__ import annotations

import functools

from .errors import MissingDependencyError


@functools.lru_cache(maxsize=1)
def faiss():
    try:
        import faiss as _faiss
    except ImportError:
        raise MissingDependencyError(
            "Faiss is not installed: pip install 'retro-dask[cpu]' (faiss-cpu), or 'retro-dask[gpu]' for faiss-gpu"
        ) from None
    return _faiss


def has_gpu() -> bool:
    f = faiss()
    return hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0
