"""The cached sample maps of a split (``W/query/<split>/samples/``) and the reader of its samples.

``prepare_samples`` computes the maps (``plan/samples.py``) and writes them as
``.npy`` with ``maps.json`` (their hash), unless the cached ones have the same
hash. ``Samples`` reads them memory-mapped and returns any sample's tokens and
the documents it spans.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..plan.samples import SplitPlan, build_split_maps, split_plan
from .indexed_dataset import open_dataset
from .workdir import atomic_path, atomic_write_json, query_meta_path, read_json, samples_dir


def prepare_samples(workdir: str, config, split: str) -> SplitPlan:
    """Compute and cache the split's maps unless the cached ones have the same hash."""
    sizes_of = [open_dataset(p).sizes for p in config.chunk.data.prefixes]
    plan = split_plan(config, split, sizes_of)
    folder = samples_dir(workdir, split)
    meta = plan.to_dict()
    try:
        if read_json(folder / "maps.json")["hash"] == meta["hash"]:
            return plan
    except (OSError, ValueError, KeyError):
        pass
    maps = build_split_maps(plan, sizes_of)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for name, arr in maps.items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        atomic_write_json(tmp / "maps.json", meta)
    return plan


# ---------------------------------------------------------------- reading samples


class Samples:
    """One split's samples, read through the cached maps (memory-mapped)."""

    def __init__(self, workdir: str | Path, split: str):
        self.workdir = str(workdir)
        self.split = split
        folder = samples_dir(workdir, split)
        try:
            self.meta = read_json(folder / "maps.json")
        except OSError:
            raise InputError(f"{folder} has no sample maps: run --tasks query-neighbors on {workdir} first") from None
        self.seq_length = int(self.meta["seq_length"])
        self.chunk_length = int(self.meta["chunk_length"])
        self.prefixes = [p for _, p in self.meta["data_blend"]]
        load = functools.partial(_load, folder)
        self.dataset_index = load("dataset_index")
        self.dataset_sample_index = load("dataset_sample_index")
        k = len(self.prefixes)
        self.doc_idx = [load(f"doc_idx_{i}") for i in range(k)]
        self.sample_idx = [load(f"sample_idx_{i}") for i in range(k)]
        self.shuffle_idx = [load(f"shuffle_idx_{i}") for i in range(k)]

    def __len__(self) -> int:
        return len(self.dataset_index)

    @property
    def chunks_per_sample(self) -> int:
        return self.seq_length // self.chunk_length

    def locate(self, i: int) -> tuple[int, int, int, int, int]:
        """Dataset, and (position, offset) of the sample's first and last tokens."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: the {self.split} split has {len(self)} samples")
        k = int(self.dataset_index[i])
        s = int(self.shuffle_idx[k][int(self.dataset_sample_index[i])])
        (p0, o0), (p1, o1) = self.sample_idx[k][s], self.sample_idx[k][s + 1]
        return k, int(p0), int(o0), int(p1), int(o1)

    def documents(self, i: int) -> tuple[int, np.ndarray]:
        """The sample's dataset and every document it spans (in order, repeats possible)."""
        k, p0, _, p1, _ = self.locate(i)
        return k, np.asarray(self.doc_idx[k][p0 : p1 + 1], dtype=np.int64)

    def tokens(self, i: int) -> np.ndarray:
        """The sample's ``seq_length + 1`` tokens."""
        k, p0, o0, p1, o1 = self.locate(i)
        ds = open_dataset(self.prefixes[k])
        docs = self.doc_idx[k]
        parts = []
        for p in range(p0, p1 + 1):
            d = int(docs[p])
            start = o0 if p == p0 else 0
            stop = o1 + 1 if p == p1 else int(ds.sizes[d])
            parts.append(ds.get(d, start, stop - start))
        out = np.concatenate(parts).astype(np.int64)
        assert len(out) == self.seq_length + 1, (len(out), self.seq_length)
        return out


def _load(folder: Path, name: str) -> np.ndarray:
    return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)


def write_query_meta(workdir: str, plan: SplitPlan) -> None:
    atomic_write_json(query_meta_path(workdir, plan.split), plan.to_dict())
