"""Faiss, imported in one place (with the install hint when it is missing), and index files.

BLAS kernel: the faiss-cpu wheel bundles an OpenBLAS (0.3.15) that does not know
recent Xeons and falls back to SSE3 kernels there, ~4.5x slower for every IVF
step (README, "The index"). OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it
is loaded, so :func:`faiss` sets it from the CPU's flags before the first
``import faiss``, unless the user has set it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

from ..errors import MissingDependencyError

# The widest OpenBLAS kernel family each instruction set can run, widest first.
_KERNELS = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags, or an empty set where /proc/cpuinfo has none (not Linux x86)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_kernel_for(flags: set[str]) -> str | None:
    """The OpenBLAS core type to force for a CPU with ``flags``, or None to leave OpenBLAS's own choice."""
    for name, needs in _KERNELS:
        if needs <= flags:
            return name
    return None


def choose_openblas_kernel() -> None:
    """Set ``OPENBLAS_CORETYPE`` from the CPU flags, unless the user has set it (call before importing faiss)."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    kernel = openblas_kernel_for(cpu_flags())
    if kernel is not None:
        os.environ["OPENBLAS_CORETYPE"] = kernel


@functools.lru_cache(maxsize=1)
def faiss():
    choose_openblas_kernel()
    try:
        import faiss as _faiss
    except ImportError:
        raise MissingDependencyError(
            "Faiss is not installed: pip install 'retro-dask[cpu]' (faiss-cpu), or 'retro-dask[gpu]' for faiss-gpu"
        ) from None
    return _faiss


def faiss_blas_kernel() -> str | None:
    """The kernel family the OpenBLAS bundled with faiss-cpu runs, or None if there is no such library."""
    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(faiss().__file__)), "faiss_cpu.libs", "libopenblas*"))
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def has_gpu() -> bool:
    f = faiss()
    return hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0


def ivf_of(index):
    """The IndexIVF inside ``index`` (through pre-transforms), or None."""
    try:
        return faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def index_chain(index) -> list:
    """``[index, ..., innermost]`` through IndexPreTransform wrappers.

    Callers keep the whole list alive: a SWIG proxy of a sub-index does not
    keep its parent (the owner of the sub-index) alive.
    """
    f = faiss()
    chain = [f.downcast_index(index)]
    while isinstance(chain[-1], f.IndexPreTransform):
        chain.append(f.downcast_index(chain[-1].index))
    return chain


def read_index_file(path, mmap: bool = False, search_tables: bool = True):
    """Read an index file; on-disk inverted lists (``.ivfdata``) are found next to it, so the workdir can move.

    ``search_tables=False`` skips IVFPQ's precomputed search table (``nlist x m x 256`` floats, 537 MB for
    IVF8192 with PQ64), which encoding and assembly never use.
    """
    from pathlib import Path

    f = faiss()
    flags = 0
    if Path(path).with_suffix(".ivfdata").exists():
        flags |= f.IO_FLAG_ONDISK_SAME_DIR
    elif mmap:
        flags |= f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY
    if search_tables:
        return f.read_index(str(path), flags)
    saved = f.cvar.precomputed_table_max_bytes
    f.cvar.precomputed_table_max_bytes = 0
    try:
        return f.read_index(str(path), flags)
    finally:
        f.cvar.precomputed_table_max_bytes = saved


def write_index_atomic(index, path) -> None:
    from .workdir import atomic_path

    with atomic_path(path) as tmp:
        faiss().write_index(index, str(tmp))


@functools.lru_cache(maxsize=4)
def _cached_index(path: str, mtime_ns: int, size: int, mmap: bool, search_tables: bool):
    return read_index_file(path, mmap=mmap, search_tables=search_tables)


def load_index(path, mmap: bool = False, search_tables: bool = True):
    """This process's copy of the index file (read once per worker while the file is unchanged)."""
    st = os.stat(path)
    return _cached_index(str(path), st.st_mtime_ns, st.st_size, mmap, search_tables)
