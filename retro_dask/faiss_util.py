"""Faiss, imported in one place, with the install hint when it is missing.

BLAS kernel: the faiss-cpu wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu
1.15), which predates Sapphire/Emerald Rapids and falls back to its generic SSE3
("Prescott") kernels on them. Every IVF step runs through that BLAS (k-means in
index-train, the coarse assignment in index-add, the search in query-neighbors),
and the fallback is about 4.5x slower: assigning 1,024 vectors to 4,096
centroids on one thread takes 141 ms with Prescott and 30 ms with SkylakeX on
the development machine. OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the
library is loaded, so :func:`faiss` sets it from the CPU's flags just before the
first ``import faiss``, unless the user has set it. NumPy's own OpenBLAS is loaded
earlier and is not affected.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

from .errors import MissingDependencyError

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
