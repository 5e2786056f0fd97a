"""RetroDataset: pretraining samples with their retrieved neighbours, for PyTorch.

An item of split ``split`` holds:

- ``text``: int64 ``[seq_length + 1]``, the sample's tokens;
- ``dataset_idx``: the blend dataset it comes from;
- ``document_ids``: int64, every document the sample spans;
- ``neighbor_chunks``: int64 ``[n_chunks, K, R]``, chunks.zarr rows of each
  neighbour and its continuations (-1 where there is none);
- ``neighbor_tokens``: int64 ``[n_chunks, K, R * chunk_length]``, their tokens,
  padded with the end-of-document token;
- ``neighbor_mask``: bool ``[n_chunks, K]``, False where a neighbour is missing.

A continuation chunk is the next row of chunks.zarr only if it belongs to the
same document; otherwise it is padding (never a chunk of the next document).
An item reads only the rows of neighbors.zarr and chunks.zarr it needs; the
Zarr arrays are opened lazily in each process, so the dataset works with a
multi-worker DataLoader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import BuildConfig
from ..errors import InputError
from ..formats import zarr_blocks
from ..formats.chunk_tokens import neighbor_tokens
from ..formats.sample_maps import Samples
from ..formats.workdir import chunks_path, config_path, neighbors_path, read_json
from ..plan.chunks import SPLIT_NAMES
from ..plan.ngrams import overlap_shares

try:  # the dataset is a torch Dataset when torch is there (it always is with retro-dask)
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


class RetroDataset(_TorchDataset):
    """Map-style dataset of one split's samples and their neighbours (see the module doc)."""

    def __init__(self, workdir: str | Path, split: str, num_neighbors: int = 2, num_retrieved_chunks: int = 2,
                 max_overlap: float | None = None):
        if split not in SPLIT_NAMES:
            raise InputError(f"split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
        self.workdir = str(Path(workdir).absolute())
        from ..stages.query import query_complete

        if not query_complete(self.workdir, split):
            raise InputError(f"{self.workdir}: the {split} neighbours are not built; run --tasks query-neighbors")
        self.split = split
        self.config = BuildConfig.from_dict(read_json(config_path(self.workdir)))
        self.samples = Samples(self.workdir, split)
        self.chunk_length = self.samples.chunk_length
        self.chunks_per_sample = self.samples.chunks_per_sample
        saved = self.config.query.num_neighbors_save
        if not 1 <= num_neighbors <= saved:
            raise InputError(f"num_neighbors {num_neighbors}: the workdir saved {saved} neighbours per chunk")
        if num_retrieved_chunks < 1:
            raise InputError(f"num_retrieved_chunks {num_retrieved_chunks} must be at least 1")
        if max_overlap is not None and not 0 <= max_overlap <= 1:
            raise InputError(f"max_overlap {max_overlap}: give the share of a chunk's 13-grams (0 to 1) above "
                             "which a neighbour is masked, or None")
        self.max_overlap = max_overlap
        self.num_neighbors = num_neighbors
        self.num_retrieved_chunks = num_retrieved_chunks
        from ..text.gpt import get_gpt_tokenizer

        self.pad = get_gpt_tokenizer(self.config.chunk.gpt_spec()).eod
        self._open: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        state.pop("samples")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.samples = Samples(self.workdir, self.split)

    def _array(self, name: str):
        if name not in self._open:
            path = neighbors_path(self.workdir, self.split) if name == "neighbors" else chunks_path(self.workdir)
            self._open[name] = zarr_blocks.open_read(path)
        return self._open[name]

    def __len__(self) -> int:
        return len(self.samples)

    def chunk_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._array("chunks").get_orthogonal_selection((np.asarray(ids, np.int64), slice(None)))

    def neighbor_rows(self, i: int) -> np.ndarray:
        cps = self.chunks_per_sample
        return self._array("neighbors")[i * cps : (i + 1) * cps, : self.num_neighbors]

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch items for a DataLoader: stack tensors, pad ``document_ids`` with -1."""
        import torch

        width = max(len(it["document_ids"]) for it in items)
        docs = torch.full((len(items), width), -1, dtype=torch.int64)
        for i, it in enumerate(items):
            docs[i, : len(it["document_ids"])] = it["document_ids"]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("text", "neighbor_chunks", "neighbor_tokens",
                                                                   "neighbor_mask")}
        batch["dataset_idx"] = torch.tensor([it["dataset_idx"] for it in items])
        batch["document_ids"] = docs
        return batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: the {self.split} split has {len(self)} samples")
        text = self.samples.tokens(i)
        dataset_idx, docs = self.samples.documents(i)
        nb = self.neighbor_rows(i)
        rows, tokens = neighbor_tokens(nb, self.chunk_rows, self._array("chunks").shape[0], self.num_retrieved_chunks,
                                       self.config.chunk.data.prefixes, self.chunk_length, self.pad)
        mask = nb >= 0
        if self.max_overlap is not None:
            # The paper's filtered evaluation: a neighbour holding more than max_overlap of the chunk's
            # 13-grams is masked and padded, as a missing one is.
            chunks = text[: self.chunks_per_sample * self.chunk_length].reshape(self.chunks_per_sample, -1)
            leaked = mask & (overlap_shares(chunks, tokens, self.pad) > self.max_overlap)
            mask &= ~leaked
            rows[leaked] = -1
            tokens[leaked] = self.pad
        return {
            "text": torch.from_numpy(text),
            "dataset_idx": int(dataset_idx),
            "document_ids": torch.from_numpy(docs.copy()),
            "neighbor_chunks": torch.from_numpy(rows),
            "neighbor_tokens": torch.from_numpy(tokens),
            "neighbor_mask": torch.from_numpy(mask),
        }
