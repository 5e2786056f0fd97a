"""scripts/train_retro.py: RETRO (retro-pytorch) trains on RetroDataset, and what reaches the model is right.

Two training steps of both runs (retrieval and the random-neighbour control)
on the 400-document workdir; the shapes and the padding RETRO masks by are
checked against the workdir's own files, and masked positions are shown to
be invisible to the model.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# find_spec, not importorskip: `import retro_pytorch` itself fails beside numpy 2 (its __init__ needs
# autofaiss 2.x), which is why the script loads the model module alone.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("retro_pytorch") is None or importlib.util.find_spec("einops") is None,
    reason="retro-pytorch is not installed: pip install -e '.[train]'")

SMALL = ["--dim", "64", "--dim-head", "32", "--enc-depth", "1", "--dec-depth", "2", "--cross-attn-layers", "1,2",
         "--batch-size", "2", "--dtype", "fp32", "--num-workers", "2", "--threads", "1", "--log-every", "0"]


@pytest.fixture(scope="module")
def train_retro():
    spec = importlib.util.spec_from_file_location("train_retro", ROOT / "scripts" / "train_retro.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_retro"] = module  # DataLoader workers unpickle the collate function by module name
    spec.loader.exec_module(module)
    return module


def chunk_lengths(workdir: Path, rows: np.ndarray) -> np.ndarray:
    """end - start of each chunks.zarr row, read with zarr alone; 0 for -1."""
    import zarr

    table = zarr.open_array(str(workdir / "db" / "chunks.zarr"), mode="r")[:]
    return np.where(rows >= 0, table[np.maximum(rows, 0), 3] - table[np.maximum(rows, 0), 2], 0)


def tiny_model(train_retro, seq_length: int = 256, chunk_length: int = 64):
    import torch

    torch.manual_seed(0)
    args = train_retro.parse_args(["--workdir", "unused", *SMALL])
    return train_retro.build_model(args, seq_length, chunk_length), args


def test_two_steps_reach_the_model(train_retro, built_workdir):
    """Both runs train 2 steps; RETRO gets [B, L] and [B, C, K, 128] with pad exactly where nothing is."""
    import torch

    seen = {}

    def observe(run, step, batch, model, loss):
        if step == 0:  # look at what the next step's forward receives
            model.register_forward_pre_hook(lambda m, a: seen.setdefault((run, "input"), a))
        else:
            seen.setdefault((run, "batch"), batch)
            seen.setdefault((run, "pad"), model.pad_id)
        seen[(run, step)] = loss

    out = train_retro.main(["--workdir", str(built_workdir), "--steps", "2", "--eval-samples", "4", *SMALL],
                           observe=observe)
    for run in ("retrieval", "control"):
        seq, retrieved = seen[(run, "input")]
        batch, pad = seen[(run, "batch")], seen[(run, "pad")]
        assert seq.shape == (2, 256)  # seq_length 256: the text's 257 tokens less the last label
        assert torch.equal(seq, batch["text"][:, :-1])
        assert retrieved.shape == (2, 4, 2, 128)  # 4 chunks of 64, K=2 neighbours, neighbour + continuation
        rows = batch["neighbor_chunks"].numpy()  # [B, C, K, R]
        lengths = chunk_lengths(built_workdir, rows)
        visible = (np.arange(64) < lengths[..., None]) & batch["neighbor_mask"].numpy()[:, :, :, None, None]
        # RETRO attends exactly to the positions that differ from its pad id (mask = retrieved != pad_id).
        assert np.array_equal((retrieved != pad).numpy(), visible.reshape(2, 4, 2, 128))
        # The README's shortcut gives the same padding: no chunk holds the end-of-document token (50256).
        readme = (batch["neighbor_tokens"] != 50256) & batch["neighbor_mask"][..., None]
        assert np.array_equal(readme.numpy(), visible.reshape(2, 4, 2, 128))
        tokens = batch["neighbor_tokens"].numpy()
        assert np.array_equal(retrieved.numpy()[visible.reshape(2, 4, 2, 128)], tokens[visible.reshape(2, 4, 2, 128)])
        assert all(math.isfinite(seen[(run, s)]) for s in (0, 1))
        res = out["runs"][run]
        assert res["steps"] == 2 and math.isfinite(res["valid_loss"]) and res["valid_samples"] == 4
    # Same seed, same sample order: the control saw the same texts with other neighbours.
    a, b = seen[("retrieval", "batch")], seen[("control", "batch")]
    assert torch.equal(a["text"], b["text"]) and torch.equal(a["neighbor_mask"], b["neighbor_mask"])
    assert not torch.equal(a["neighbor_chunks"], b["neighbor_chunks"])


def test_control_keeps_shapes_and_masks(train_retro, built_workdir):
    """Random neighbours: same shapes and masks, continuations inside their document, never the sample's own."""
    import zarr

    from retro_dask import RetroDataset
    from retro_dask.formats.indexed_dataset import open_dataset

    ds = RetroDataset(built_workdir, "train", num_neighbors=2, num_retrieved_chunks=2)
    chunks = train_retro.DatabaseChunks(built_workdir)
    control = train_retro.RandomNeighbours(ds, chunks, seed=0, stream=0, pad=50256)
    table = zarr.open_array(str(built_workdir / "db" / "chunks.zarr"), mode="r")[:]
    for i in range(min(len(ds), 6)):
        real, rand = ds[i], control[i]
        for key in ("text", "neighbor_mask", "neighbor_chunks", "neighbor_tokens"):
            assert rand[key].shape == real[key].shape and rand[key].dtype == real[key].dtype
        assert np.array_equal(rand["neighbor_mask"], real["neighbor_mask"])
        rows = rand["neighbor_chunks"].numpy()
        first, cont = rows[..., 0], rows[..., 1]
        assert np.array_equal(first >= 0, real["neighbor_mask"].numpy())
        has = first >= 0
        same_doc = (first[has] + 1 < len(table)) & np.all(
            table[first[has]][:, :2] == table[np.minimum(first[has] + 1, len(table) - 1)][:, :2], axis=1)
        assert np.array_equal(cont[has], np.where(same_doc, first[has] + 1, -1))
        own = set(real["document_ids"].tolist())
        assert not any(table[r, 1] in own for r in first[has] if table[r, 0] == real["dataset_idx"])
        # The control's tokens are the chunks' own tokens in the corpus, padded past each chunk's end.
        lengths = chunk_lengths(built_workdir, rows)
        mask = np.arange(64) < lengths[..., None]
        toks = rand["neighbor_tokens"].numpy().reshape(rows.shape + (64,))
        for idx in zip(*np.nonzero(rows >= 0)):
            d, doc, start, end, _ = table[rows[idx]]
            assert np.array_equal(toks[idx][: end - start], open_dataset(ds.config.chunk.data.prefixes[d]).get(
                int(doc), int(start), int(end - start)))
        assert (toks[~mask] == 50256).all()
        assert control[i]["neighbor_chunks"].equal(rand["neighbor_chunks"])  # fixed per sample


def test_masked_neighbours_are_not_attended(train_retro, built_workdir):
    """A missing neighbour becomes pad everywhere, and nothing RETRO outputs depends on padded positions."""
    import torch

    from retro_dask import RetroDataset

    ds = RetroDataset(built_workdir, "train", num_neighbors=2, num_retrieved_chunks=2)
    batch = RetroDataset.collate([ds[0], ds[1]])
    batch["neighbor_mask"][0, 1, 0] = False  # as if the search had found no first neighbour for chunk 1
    batch["neighbor_mask"][1, :, 1] = False  # and no second neighbour anywhere in sample 1
    model, args = tiny_model(train_retro)
    pad = model.pad_id
    lengths = train_retro.DatabaseChunks(built_workdir).lengths(batch["neighbor_chunks"].numpy())
    retrieved = train_retro.retrieved_input(batch["neighbor_tokens"], batch["neighbor_chunks"],
                                            batch["neighbor_mask"], lengths, pad)
    assert (retrieved[0, 1, 0] == pad).all() and (retrieved[1, :, 1] == pad).all()
    assert (retrieved[0, 1, 1] != pad).any()
    model.eval()
    seq = batch["text"][:, :-1]
    with torch.no_grad():
        before = model(seq, retrieved)
        model.token_emb.weight[pad].normal_(0, 10)  # whatever the pad embedding is, the outputs stay the same
        after = model(seq, retrieved)
        assert torch.allclose(before, after, atol=1e-5)
        # ...while a visible neighbour token does change them (the neighbours do reach the model).
        changed = retrieved.clone()
        changed[0, 0, 0, :8] = 1000
        assert not torch.allclose(model(seq, changed), after, atol=1e-5)


def test_loss_is_retros_own(train_retro, built_workdir):
    """The script's loss equals RETRO.forward(seq, retrieved, return_loss=True)."""
    import torch

    from retro_dask import RetroDataset

    ds = RetroDataset(built_workdir, "train", num_neighbors=2, num_retrieved_chunks=2)
    batch = train_retro.RetroBatch(train_retro.DatabaseChunks(built_workdir), 50257)([ds[0], ds[1]])
    model, _ = tiny_model(train_retro)
    model.train()  # RETRO returns its loss only in training mode; the model has no dropout
    with torch.no_grad():
        ours = train_retro.next_token_loss(model, batch["text"], batch["retrieved"])
        theirs = model(batch["text"], batch["retrieved"], return_loss=True)
    assert torch.allclose(ours, theirs, rtol=1e-5)


def test_oracle_neighbour_is_the_samples_own_chunk_and_the_next(train_retro, built_workdir):
    """The diagnostic run: neighbour 0 of chunk c is the sample's chunks c and c+1, visible; the others unchanged."""
    import torch

    from retro_dask import RetroDataset

    ds = RetroDataset(built_workdir, "valid", num_neighbors=2, num_retrieved_chunks=2)
    chunks = train_retro.DatabaseChunks(built_workdir)
    oracle = train_retro.OwnChunks(ds, chunks, pad=50256)
    batch = train_retro.RetroBatch(chunks, 50257)([oracle[0], oracle[1]])
    real = train_retro.RetroBatch(chunks, 50257)([ds[0], ds[1]])
    text, retrieved = batch["text"], batch["retrieved"]
    for c in range(retrieved.shape[1]):
        expect = text[:, c * 64 : (c + 2) * 64]
        assert torch.equal(retrieved[:, c, 0, : expect.shape[1]], expect)
        assert (retrieved[:, c, 0, expect.shape[1] :] == 50257).all()
    assert torch.equal(retrieved[:, :, 1:], real["retrieved"][:, :, 1:])
