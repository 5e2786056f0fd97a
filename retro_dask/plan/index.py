"""Which Faiss index to build, and how many chunks to train it on: pure arithmetic.

``--index-str auto`` picks the index from the number of chunks, the embedding
dimension and ``--index-memory`` (a budget for the final index):

- fewer than ``39 * 16`` chunks: ``Flat`` (exact search; too few points to cluster);
- the raw vectors fit the budget: ``IVF{nlist},Flat`` with ``nlist`` the power of
  two nearest ``4 * sqrt(n)`` (exact distances inside the probed lists);
- otherwise ``OPQ{m}_{4m},IVF{nlist}_HNSW32,PQ{m}``: an HNSW coarse quantizer
  over ``nlist`` (nearest power of two to ``4 * sqrt(n)``, at least 1024) lists,
  OPQ rotation and ``m``-byte PQ codes, ``m`` the largest of 64, 48, 32, 16, 8
  whose codes and ids fit the budget.

``nlist`` ~ ``4 * sqrt(n)`` is the low end of Faiss's advice (4 to 16 sqrt(n)).
Training is k-means on ``POINTS_PER_LIST * nlist`` points against ``nlist``
centroids, so its cost is ``64 * nlist**2 * d`` per iteration: with
``4 * sqrt(n)`` it grows linearly with the database (``1024 * n * d``), and 5M
chunks train in about two minutes on two CPU cores; ``16 * sqrt(n)`` would
cost 16 times more (about half an hour there). Search cost per query does not
depend on the choice: the default ``nprobe`` scans an eighth of the lists.

Every IVF gets at least 39 training points per list (Faiss's own minimum), so
``nlist`` is also capped by ``n / 39``.

The metric: ``cosine`` (the default) prepends Faiss's ``L2norm`` transform, so
the index holds unit vectors and L2 ranking equals cosine ranking; the model
(all-MiniLM-L6-v2) is trained for cosine similarity, and unit vectors stop
chunk length from leaking into the vector norm. ``l2`` is Megatron's choice:
raw vectors, L2 distance. The transform lives inside the index, so every
search (queries, ``verify``, the notebook's ``search``) uses the same metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIN_POINTS_PER_LIST = 39
# index-add's reduction reads at most FAN_IN partials in one merge or in the final
# assembly (streamed a slice of lists at a time: memory does not grow with it).
FAN_IN = 256
# index-add's encode tasks: each encodes a span of consecutive embedding blocks
# (at most ENCODE_ROWS rows), so that a task's fixed cost (scheduling, reading
# the block, writing its partial, its ledger record) stays small against Faiss's
# work, and the partials come out large enough to be assembled without a merge
# level; but there are at least MIN_ENCODE_TASKS tasks when the blocks allow it.
ENCODE_ROWS = 32768
MIN_ENCODE_TASKS = 16
# Training points per list for the default sample: within Faiss's advice
# (30 to 256 per centroid) and affordable: k-means costs n_train x nlist x d.
POINTS_PER_LIST = 64
ID_BYTES = 8


def pow2_near(x: float) -> int:
    return 1 << max(0, int(round(math.log2(max(x, 1.0)))))


def pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


@dataclass(frozen=True)
class IndexPlan:
    factory: str       # the full index_factory string, metric transform included
    core: str          # the string without the metric transform
    metric: str        # "cosine" or "l2"
    nlist: int         # 0 when the index has no inverted lists
    ntrain: int        # chunks to train on

    @property
    def tag(self) -> str:
        """Folder name under ``W/index``: the core string, made filesystem-safe."""
        safe = re.sub(r"[^A-Za-z0-9]+", "_", self.core).strip("_")
        return f"{safe}.{self.metric}"


def nlist_of(core: str) -> int:
    m = re.search(r"IVF(\d+)", core)
    return int(m.group(1)) if m else 0


def auto_core(n_chunks: int, dim: int, memory: int) -> str:
    if n_chunks < MIN_POINTS_PER_LIST * 16:
        return "Flat"
    cap = pow2_floor(n_chunks / MIN_POINTS_PER_LIST)
    if n_chunks * (dim * 4 + ID_BYTES) <= memory:
        nlist = min(pow2_near(4 * math.sqrt(n_chunks)), cap)
        return f"IVF{nlist},Flat"
    nlist = min(max(pow2_near(4 * math.sqrt(n_chunks)), 1024), cap)
    m = 8
    for cand in (64, 48, 32, 16, 8):
        if n_chunks * (cand + ID_BYTES) <= memory and (4 * cand) <= max(dim, 32):
            m = cand
            break
    return f"OPQ{m}_{4 * m},IVF{nlist}_HNSW32,PQ{m}"


def default_ntrain(core: str, n_chunks: int) -> int:
    nlist = nlist_of(core)
    if nlist == 0:
        return min(n_chunks, 65536) if "PQ" in core else 0
    want = POINTS_PER_LIST * nlist
    if "PQ" in core:
        want = max(64 * nlist, 65536)
    return min(n_chunks, want)


def plan_index(index_str: str, metric: str, n_chunks: int, dim: int, memory: int, ntrain: int | None) -> IndexPlan:
    """Resolve ``--index-str`` (``auto`` or a factory string) for this database."""
    core = index_str.strip()
    if core.lower() == "auto":
        core = auto_core(n_chunks, dim, memory)
    if core.startswith("L2norm,"):
        core = core[len("L2norm,"):]
    factory = f"L2norm,{core}" if metric == "cosine" else core
    n = default_ntrain(core, n_chunks) if ntrain is None else min(int(ntrain), n_chunks)
    return IndexPlan(factory=factory, core=core, metric=metric, nlist=nlist_of(core), ntrain=n)


def training_problem(plan: IndexPlan, n_chunks: int) -> str | None:
    """Why the training sample cannot train this index, with the fix; None if it can."""
    if plan.nlist == 0:
        return None
    need = MIN_POINTS_PER_LIST * plan.nlist
    if plan.ntrain >= need:
        return None
    ok_lists = pow2_floor(max(plan.ntrain, 1) / MIN_POINTS_PER_LIST)
    fix = (
        f"raise --index-ntrain to at least {need}" if n_chunks >= need
        else f"the database has only {n_chunks} chunks"
    )
    return (
        f"index {plan.core!r} has {plan.nlist} inverted lists, which needs at least "
        f"{MIN_POINTS_PER_LIST} x {plan.nlist} = {need} training chunks, but the training sample has "
        f"{plan.ntrain}: {fix}, or use fewer lists (e.g. IVF{ok_lists} in --index-str), or --index-str auto"
    )


def default_nprobe(nlist: int) -> int:
    """Lists to probe per query: an eighth of them, at least 16, at most all."""
    if nlist == 0:
        return 1
    return min(nlist, max(16, nlist // 8))


def encode_span(n_blocks: int, block_size: int) -> int:
    """Embedding blocks per index-add encode task: a function of the database alone, so a rerun
    on any cluster finds the same tasks."""
    return max(1, min(ENCODE_ROWS // max(block_size, 1), n_blocks // max(MIN_ENCODE_TASKS, 1)))
