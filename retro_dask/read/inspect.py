"""The notebook API: look at chunks, samples and neighbour texts of a workdir.

    from retro_dask import inspect as retro
    retro.init("demo-workdir")
    retro.print_neighbor_texts("train", 0, 0)
    retro.workdir().chunks          # the lazy Dask arrays of retro_dask.open_workdir

This module keeps the workdir opened by ``init`` (a notebook convenience, as in
Megatron's ``tools/retro/cli``); everything it shows is read through the same
library code the pipeline uses, and ``workdir()`` gives its lazy arrays.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass
class _State:
    workdir: Any  # retro_dask.read.lazy.Workdir
    datasets: dict[str, Any]

    @property
    def path(self) -> str:
        return self.workdir.path

    @property
    def config(self):
        return self.workdir.config

    @property
    def infos(self) -> list[dict[str, Any]]:
        return self.workdir.infos


_state: _State | None = None


def _w() -> _State:
    if _state is None:
        raise InputError("call retro.init(WORKDIR) first")
    return _state


def init(workdir: str, quiet: bool = False) -> None:
    """Open a workdir and print a short usage with live examples."""
    global _state
    from .lazy import open_workdir

    _state = _State(open_workdir(workdir), {})
    if not quiet:
        print_usage()


def workdir():
    """The opened workdir: ``.chunks``, ``.embeddings``, ``.neighbors[split]`` as lazy Dask arrays."""
    return _w().workdir


def print_usage() -> None:
    w = _w()
    n = get_db_num_chunks()
    lines = [
        f"retro-dask workdir {w.path}",
        f"  database: {get_db_num_indexed_datasets()} dataset(s), {n:,} chunks",
        "",
        "  get_db_num_indexed_datasets()        -> " + repr(get_db_num_indexed_datasets()),
        "  get_db_indexed_dataset_infos()       -> list of per-dataset records (infos.json)",
        "  get_db_num_chunks()                  -> " + repr(n),
        "  get_db_chunk_gpt(0)                  -> " + _short(get_db_chunk_gpt(0)),
        "  get_db_chunk_bert(0)                 -> " + _short(get_db_chunk_bert(0)),
        "  get_db_chunk_text(0)                 -> " + repr(_clip(get_db_chunk_text(0))),
        "  get_db_chunk_and_continuation_text(0)-> [chunk text, continuation text]",
    ]
    for split in ("train", "valid", "test"):
        try:
            ns = get_pt_num_samples(split)
        except InputError:
            continue
        lines.append(f"  get_pt_num_samples({split!r})         -> {ns}   get_pt_num_chunks({split!r}) -> "
                     f"{get_pt_num_chunks(split)}")
    lines += [
        "  get_pt_sample('train', 0)            -> dict: text, document_ids, neighbor_chunks, neighbor_tokens, ...",
        "  get_neighbor_tokens('train', 0, 0)   -> chunk tokens and its neighbours' tokens",
        "  print_neighbor_texts('train', 0, 0)  -> prints a sample chunk and its neighbours' texts",
        "  gpt_to_text(tokens), text_to_bert(text), search(text, k=5)",
        "  workdir().chunks, .embeddings, .neighbors['train']  -> lazy Dask arrays; retro_dask.embed(...) embeds",
        "  tune_report(), leakage_report()      -> recall against nprobe, and evaluation leakage (with their plots)",
    ]
    print("\n".join(lines))


def _short(tokens) -> str:
    t = list(map(int, tokens))
    return repr(t[:8])[:-1] + (", ...]" if len(t) > 8 else "]")


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _dataset(prefix: str):
    from ..formats.indexed_dataset import open_dataset

    return open_dataset(prefix)


def _gpt():
    from ..text.gpt import get_gpt_tokenizer

    return get_gpt_tokenizer(_w().config.chunk.gpt_spec())


def _bert():
    from ..text.bert import get_bert_tokenizer

    return get_bert_tokenizer(_w().config.embed.bert_spec())


# ---------------------------------------------------------------- database


def get_db_num_indexed_datasets() -> int:
    return len(_w().infos)


def get_db_indexed_dataset_infos() -> list[dict[str, Any]]:
    return [dict(i) for i in _w().infos]


def get_db_num_chunks() -> int:
    return int(_w().workdir.chunks.shape[0])


def get_db_chunk_row(idx: int) -> np.ndarray:
    """The chunks.zarr row of chunk ``idx``: dataset_idx, document_idx, chunk_start, chunk_end, bert_length."""
    from ..formats import zarr_blocks
    from ..formats.workdir import chunks_path

    n = get_db_num_chunks()
    if not 0 <= idx < n:
        raise IndexError(f"chunk {idx} out of range: the database has {n} chunks")
    return zarr_blocks.read_rows(chunks_path(_w().path), idx, idx + 1)[0]


def get_db_chunk_gpt(idx: int) -> list[int]:
    d, doc, s, e, _ = map(int, get_db_chunk_row(idx))
    return _dataset(_w().config.chunk.data.prefixes[d]).get(doc, s, e - s).astype(np.int64).tolist()


def get_db_chunk_text(idx: int) -> str:
    return gpt_to_text(get_db_chunk_gpt(idx))


def get_db_chunk_bert(idx: int) -> list[int]:
    return text_to_bert(get_db_chunk_text(idx))


def get_db_chunk_and_continuation_text(idx: int) -> list[str]:
    """The chunk's text and its continuation's (empty if the document ends with the chunk)."""
    texts = [get_db_chunk_text(idx)]
    if idx + 1 < get_db_num_chunks() and (get_db_chunk_row(idx + 1)[:2] == get_db_chunk_row(idx)[:2]).all():
        texts.append(get_db_chunk_text(idx + 1))
    else:
        texts.append("")
    return texts


# ---------------------------------------------------------------- pretraining samples


def _retro_dataset(split: str, num_neighbors: int = 2, num_retrieved_chunks: int = 2):
    from .dataset import RetroDataset

    key = f"{split}/{num_neighbors}/{num_retrieved_chunks}"
    if key not in _w().datasets:
        _w().datasets[key] = RetroDataset(_w().path, split, num_neighbors, num_retrieved_chunks)
    return _w().datasets[key]


def get_pt_num_samples(split: str) -> int:
    return len(_retro_dataset(split))


def get_pt_num_chunks(split: str) -> int:
    ds = _retro_dataset(split)
    return len(ds) * ds.chunks_per_sample


def get_pt_sample(split: str, i: int, num_neighbors: int = 2, num_retrieved_chunks: int = 2) -> dict[str, Any]:
    return _retro_dataset(split, num_neighbors, num_retrieved_chunks)[i]


def get_neighbor_tokens(split: str, sample_id: int, chunk_id: int, num_neighbors: int = 2) -> dict[str, Any]:
    """The sample chunk's tokens and, per neighbour, its row and neighbour + continuation tokens."""
    ds = _retro_dataset(split, num_neighbors)
    if not 0 <= chunk_id < ds.chunks_per_sample:
        raise IndexError(f"chunk {chunk_id} out of range: samples have {ds.chunks_per_sample} chunks")
    item = ds[sample_id]
    cl = ds.chunk_length
    chunk = item["text"][chunk_id * cl : (chunk_id + 1) * cl].tolist()
    neighbors = []
    for k in range(item["neighbor_chunks"].shape[1]):
        rows = item["neighbor_chunks"][chunk_id, k].tolist()
        if rows[0] < 0:
            continue
        neighbors.append({"row": rows[0], "rows": rows, "tokens": item["neighbor_tokens"][chunk_id, k].tolist()})
    return {"chunk_tokens": chunk, "neighbors": neighbors}


def print_neighbor_texts(split: str, sample_id: int, chunk_id: int, num_neighbors: int = 2, width: int = 100) -> None:
    """Print a sample chunk's text and the texts of its neighbours (chunk + continuation)."""
    info = get_neighbor_tokens(split, sample_id, chunk_id, num_neighbors)
    wrap = lambda s: textwrap.indent(textwrap.fill(s.replace("\n", " "), width), "    ")  # noqa: E731
    print(f"{split} sample {sample_id}, chunk {chunk_id}:")
    print(wrap(gpt_to_text(info["chunk_tokens"])))
    if not info["neighbors"]:
        print("  (no neighbours)")
    for k, nb in enumerate(info["neighbors"]):
        texts = [get_db_chunk_text(r) for r in nb["rows"] if r >= 0]
        print(f"  neighbour {k}: chunk {nb['row']}" + (f" + continuation {nb['rows'][1:]}" if len(texts) > 1 else ""))
        print(wrap(" | ".join(texts)))


# ---------------------------------------------------------------- text, tokens, search


def gpt_to_text(tokens) -> str:
    return _gpt().decode(np.asarray(tokens, dtype=np.int64))


def text_to_bert(text: str) -> list[int]:
    return _bert().encode_for_model([text], 10**9)[0][1:-1]


def search(text: str, k: int = 5, nprobe: int | None = None) -> list[tuple[int, float, str]]:
    """Nearest database chunks of any text: ``(row, distance, chunk text)``."""
    from ..stages.index import index_complete, trained
    from ..stages.query import search_settings, searcher
    from ..text.embedder import get_embedder

    w = _w()
    if not index_complete(w.path):
        raise InputError(f"{w.path} has no added index yet: run --tasks index-build")
    tag = trained(w.path)["tag"]
    x = get_embedder(w.config.embed).embed_texts([text])
    probe, ef_search = search_settings(w.config, w.path)
    index = searcher(w.path, tag, nprobe or probe, ef_search)
    dist, ids = index.search(x, k)
    return [(int(i), float(d), get_db_chunk_text(int(i))) for d, i in zip(dist[0], ids[0]) if i >= 0]


# ---------------------------------------------------------------- reports


def _report(name: str) -> dict[str, Any]:
    """``W/stats/<name>.json``, with ``<name>.png`` shown when IPython can display it."""
    import json
    from pathlib import Path

    from ..formats.workdir import stats_dir

    folder = stats_dir(_w().path)
    try:
        stats = json.loads((folder / f"{name}.json").read_text())
    except OSError:
        raise InputError(f"{_w().path} has no {name} figures yet: run scripts/build.py --workdir {_w().path} "
                         f"--tasks {name}") from None
    png = Path(folder / f"{name}.png")
    if png.exists():
        try:
            from IPython.display import Image, display

            display(Image(filename=str(png)))
        except ImportError:  # not in IPython: the figures alone
            pass
    return stats


def tune_report() -> dict[str, Any]:
    """The nprobe tune: recall@10 and query chunks/s against nprobe (tune.png), and the chosen point."""
    stats = _report("tune")
    c = stats["chosen"]
    print(f"target recall@10 {stats['target_recall']}: nprobe {c['nprobe']}"
          + (f", efSearch {c['ef_search']}" if c.get("ef_search") else "")
          + f" gives {c['recall_at_10']:.4f} on {stats['queries']} query chunks")
    return stats


def leakage_report() -> dict[str, Any]:
    """Evaluation leakage: the histogram of the valid and test chunks' 13-gram overlap with their neighbours."""
    stats = _report("leakage")
    for split, r in stats.get("splits", {}).items():
        print(f"{split}: {r['n_chunks']:,} chunks, mean overlap {r['mean']:.3f}, above 0.5: {r['share_above_0.5']:.3f}, "
              f"above 0.8: {r['share_above_0.8']:.3f}")
    return stats
