#!/usr/bin/env python
"""Train a small RETRO on a workdir through RetroDataset, and the same model on random neighbours.

Two runs, same model, seed, steps and sample order:

- ``retrieval``: every chunk's neighbours as the workdir serves them
  (``RetroDataset(W, split, num_neighbors=K, num_retrieved_chunks=2)``);
- ``control``: every neighbour replaced by a random database chunk and its
  continuation (the next row of chunks.zarr if it is in the same document, else
  padding), drawn uniformly from chunks.zarr and never from the sample's own
  documents (the filter the retrieval applies); same shapes, same masks.

and, when asked (``--runs retrieval,control,oracle``), a diagnostic:

- ``oracle``: each chunk's first neighbour replaced by the sample's own chunk
  and the chunk after it (the leak the same-document filter keeps out), the
  other neighbours as retrieved. The answer is in the neighbours: a model that
  learns to read them, through these masks and this alignment, beats the
  control by far. It tells whether a small gain of ``retrieval`` comes from
  the plumbing or from what the neighbours hold.

Every run trains on the train split through a multi-worker DataLoader and are
evaluated on every sample of the valid split (fp32): it prints validation
loss, per-token perplexity, training tokens/s and wall time.

The model is retro-pytorch's ``RETRO`` (chunked cross-attention, its
retrieval encoder), not a model of ours. It takes ``retrieved`` as
``(batch, chunks, neighbours, 2 * chunk_length)`` token ids and masks every
position equal to its ``pad_id``: the script gives it a pad id outside the
GPT vocabulary and writes it wherever a neighbour is missing
(``neighbor_mask`` False), a continuation is missing (``neighbor_chunks``
-1) or a chunk is shorter than ``chunk_length`` (its length from
chunks.zarr). The loss is RETRO's own (cross-entropy of the next token),
computed from its logits in one contiguous pass: the library's
``return_loss=True`` takes the log-softmax over transposed logits, which made
a training step 1.6x slower on CPU (8 x 512 tokens, fp32); the test checks
that both give the same loss.

Reads ``W/config.json`` (corpus prefixes, chunk length), ``W/db/chunks.zarr``,
the corpora's ``.bin``/``.idx`` (for the control's chunks) and the train and
valid samples and neighbours through RetroDataset. Writes nothing but its
report, and the figures as JSON with ``--json-out``.

Install: ``pip install -e '.[train]'``. On Linux set
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before starting it: the logits are
hundreds of MB a step, and glibc otherwise maps them in fresh 4 KiB pages
every step (benchmarks/train_proof.py sets it).

Run: ``HF_HUB_OFFLINE=1 python scripts/train_retro.py --workdir W --steps 150``
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

RUNS = ("retrieval", "control", "oracle")
GPT2_VOCAB = 50257
INSTALL = "pip install -e '.[train]'"

# ---------------------------------------------------------------- the model


def load_retro_class() -> type:
    """retro-pytorch's ``RETRO`` class, loaded without the package's retrieval pipeline.

    ``import retro_pytorch`` runs its ``__init__``, which imports the library's
    own retrieval code (faiss and ``autofaiss.build_index``). autofaiss 2.x
    pins numpy<2, which zarr 3.1 refuses, and the autofaiss pip settles on
    beside numpy 2 (1.10) has no ``build_index``, so that import fails there.
    The model module needs one name from ``retrieval.py``, the default
    vocabulary size: it is read from that file's source without running it.
    """
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"retro-pytorch is not installed: {INSTALL}")
    package = Path(list(spec.submodule_search_locations)[0])
    constants: dict[str, Any] = {}
    for node in ast.parse((package / "retrieval.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # paths and other non-literals: the model module does not use them
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.__dict__.update(constants)
    model_spec = importlib.util.spec_from_file_location("retro_pytorch_model", package / "retro_pytorch.py")
    module = importlib.util.module_from_spec(model_spec)
    saved = sys.modules.get("retro_pytorch.retrieval")
    sys.modules["retro_pytorch.retrieval"] = retrieval  # only while the model module runs its imports
    try:
        model_spec.loader.exec_module(module)
    except ImportError as e:
        raise ImportError(f"{package / 'retro_pytorch.py'}: {e}; this script was written against "
                          f"retro-pytorch 0.3.9 ({INSTALL})") from e
    finally:
        if saved is None:
            sys.modules.pop("retro_pytorch.retrieval", None)
        else:
            sys.modules["retro_pytorch.retrieval"] = saved
    return module.RETRO


def retro_pytorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retro-pytorch")
    except PackageNotFoundError:
        return "unknown"


def build_model(args: argparse.Namespace, seq_length: int, chunk_length: int):
    RETRO = load_retro_class()
    layers = tuple(int(x) for x in args.cross_attn_layers.split(","))
    if not all(1 <= x <= args.dec_depth for x in layers):
        raise SystemExit(f"--cross-attn-layers {args.cross_attn_layers}: layers are 1..{args.dec_depth} "
                         f"(--dec-depth {args.dec_depth})")
    if args.dim % args.dim_head:
        raise SystemExit(f"--dim {args.dim} is not a multiple of --dim-head {args.dim_head}")
    return RETRO(
        num_tokens=args.vocab_size + 1,  # one more id: the padding of retrieved chunks
        max_seq_len=seq_length,
        enc_dim=args.enc_dim or args.dim,
        enc_depth=args.enc_depth,
        dec_dim=args.dim,
        dec_depth=args.dec_depth,
        dec_cross_attn_layers=layers,
        heads=args.dim // args.dim_head,
        dim_head=args.dim_head,
        chunk_size=chunk_length,
        pad_id=args.vocab_size,
    )


def next_token_loss(model, seq, retrieved, reduction: str = "mean"):
    """RETRO's training loss: cross-entropy of ``seq[:, 1:]`` given ``seq[:, :-1]`` and the neighbours.

    ``retrieved`` must hold ``model.pad_id`` wherever nothing may be attended
    to: RETRO derives its encoder and cross-attention masks from it.
    """
    import torch.nn.functional as F

    logits = model(seq[:, :-1], retrieved)
    # Labels never hold pad_id (it is outside the vocabulary), so RETRO's ignore_index would drop nothing.
    return F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten(), reduction=reduction)


# ---------------------------------------------------------------- the database chunks, from the workdir contract


class DatabaseChunks:
    """The retrieval database as the workdir gives it: chunks.zarr rows, read with retro-dask's own readers.

    Opens chunks.zarr lazily in each process, so it travels to DataLoader workers.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        config = json.loads((self.workdir / "config.json").read_text())
        self.prefixes = list(config["chunk"]["data"]["prefixes"])
        self.chunk_length = int(config["chunk"]["chunk_length"])
        self._table = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    @property
    def table(self):
        if self._table is None:
            import zarr

            self._table = zarr.open_array(str(self.workdir / "db" / "chunks.zarr"), mode="r")
        return self._table

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def table_rows(self, ids: np.ndarray) -> np.ndarray:
        """chunks.zarr rows ``[n, 5]`` of sorted unique ids."""
        return np.asarray(self.table.get_orthogonal_selection((np.asarray(ids, np.int64), slice(None))), np.int64)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique ids >= 0, their chunks.zarr rows [n, 5])."""
        ids = np.unique(np.asarray(ids, np.int64))
        ids = ids[ids >= 0]
        return ids, (self.table_rows(ids) if len(ids) else np.zeros((0, 5), np.int64))

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens in each chunk (end - start), 0 where the row is -1."""
        rows = np.asarray(rows, np.int64)
        ids, table = self.rows(rows)
        out = np.zeros(rows.shape, np.int64)
        have = rows >= 0
        out[have] = (table[:, 3] - table[:, 2])[np.searchsorted(ids, rows[have])]
        return out

    def with_tokens(self, first: np.ndarray, retrieved: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[..., retrieved]`` of each chunk and its continuations, and their tokens, as RetroDataset
        reads its neighbours (the same function)."""
        from retro_dask.formats.chunk_tokens import neighbor_tokens

        return neighbor_tokens(first, self.table_rows, len(self), retrieved, self.prefixes, self.chunk_length, pad)


# ---------------------------------------------------------------- RetroDataset items -> RETRO's inputs


def retrieved_input(neighbor_tokens, neighbor_chunks, neighbor_mask, lengths, pad_id: int):
    """RETRO's ``retrieved`` ``[B, C, K, R * chunk_length]``: the tokens with ``pad_id`` wherever nothing is.

    Padding: a missing neighbour (``neighbor_mask`` False), a missing
    continuation (``neighbor_chunks`` -1), and the positions past a chunk's
    length. RETRO masks exactly the positions that equal its ``pad_id``.
    """
    import torch

    b, c, k, r = neighbor_chunks.shape
    tokens = neighbor_tokens.reshape(b, c, k, r, -1)
    pos = torch.arange(tokens.shape[-1])
    lengths = torch.as_tensor(lengths) * (neighbor_chunks >= 0)  # a missing chunk has no tokens
    keep = (pos < lengths[..., None]) & neighbor_mask[:, :, :, None, None]
    return torch.where(keep, tokens, pad_id).reshape(b, c, k, -1)


class RandomNeighbours:
    """A RetroDataset whose neighbours are random database chunks and their continuations (the control).

    Same item layout, shapes and ``neighbor_mask``; only ``neighbor_chunks``
    and ``neighbor_tokens`` change (padded with ``pad``, as RetroDataset pads
    with the end-of-document token). The draws are fixed per (seed, stream,
    sample), as real retrieval is a fixed function of the sample.
    """

    def __init__(self, dataset, chunks: DatabaseChunks, seed: int, stream: int, pad: int):
        self.dataset, self.chunks, self.seed, self.stream, self.pad = dataset, chunks, seed, stream, pad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.dataset[i]
        mask = item["neighbor_mask"].numpy()
        rng = np.random.default_rng([self.seed, self.stream, i])
        first = np.full(mask.shape, -1, np.int64)
        first[mask] = self.draw(rng, int(mask.sum()), item["dataset_idx"], item["document_ids"].numpy())
        rows, tokens = self.chunks.with_tokens(first, item["neighbor_chunks"].shape[-1], self.pad)
        item["neighbor_chunks"] = torch.from_numpy(rows)
        item["neighbor_tokens"] = torch.from_numpy(tokens)
        return item

    def draw(self, rng: np.random.Generator, n: int, dataset_idx: int, documents: np.ndarray) -> np.ndarray:
        """``n`` uniform chunks.zarr rows, none from the sample's own documents (as the retrieval filters)."""
        out = rng.integers(0, len(self.chunks), size=n)
        for _ in range(100):
            ids, table = self.chunks.rows(out)
            own = ids[(table[:, 0] == dataset_idx) & np.isin(table[:, 1], documents)]
            redo = np.isin(out, own)
            if not redo.any():
                return out
            out[redo] = rng.integers(0, len(self.chunks), size=int(redo.sum()))
        raise RuntimeError(f"no random chunk outside the sample's documents {documents.tolist()} in 100 draws: "
                           f"the database has only {len(self.chunks)} chunks")


class OwnChunks:
    """The oracle: each chunk's first neighbour is the sample's own chunk and the next one (see the module doc).

    ``neighbor_chunks`` says -2 there (not a database row) and the item carries
    ``neighbor_lengths``, the tokens of every neighbour chunk, for RetroBatch.
    """

    OWN = -2

    def __init__(self, dataset, chunks: DatabaseChunks, pad: int):
        self.dataset, self.chunks, self.pad = dataset, chunks, pad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.dataset[i]
        rows = item["neighbor_chunks"].numpy().copy()
        lengths = self.chunks.lengths(rows)
        c, k, r = rows.shape
        L = self.chunks.chunk_length
        text = item["text"].numpy()
        own = np.full((c, r * L), self.pad, np.int64)
        for j in range(c):
            span = text[j * L : (j + r) * L]
            own[j, : len(span)] = span
            lengths[j, 0] = np.clip(len(text) - (j + np.arange(r)) * L, 0, L)
        tokens = item["neighbor_tokens"].numpy().copy()
        tokens[:, 0] = own
        rows[:, 0] = self.OWN
        mask = item["neighbor_mask"].numpy().copy()
        mask[:, 0] = True
        item.update(neighbor_chunks=torch.from_numpy(rows), neighbor_tokens=torch.from_numpy(tokens),
                    neighbor_mask=torch.from_numpy(mask), neighbor_lengths=torch.from_numpy(lengths))
        return item


class RetroBatch:
    """DataLoader ``collate_fn``: ``RetroDataset.collate`` plus RETRO's ``retrieved`` (runs in the workers)."""

    def __init__(self, chunks: DatabaseChunks, pad_id: int):
        self.chunks, self.pad_id = chunks, pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from retro_dask import RetroDataset

        batch = RetroDataset.collate(items)
        if "neighbor_lengths" in items[0]:  # the oracle's own chunks are not database rows
            lengths = np.stack([it["neighbor_lengths"].numpy() for it in items])
            rows = batch["neighbor_chunks"].masked_fill(batch["neighbor_chunks"] == OwnChunks.OWN, 0)  # present
        else:
            rows = batch["neighbor_chunks"]
            lengths = self.chunks.lengths(rows.numpy())
        batch["retrieved"] = retrieved_input(batch["neighbor_tokens"], rows, batch["neighbor_mask"], lengths,
                                             self.pad_id)
        return batch


def make_loader(dataset, chunks: DatabaseChunks, args, shuffle: bool, seed: int):
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)  # the same sample order for both runs of a seed
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle,
                      num_workers=args.num_workers, collate_fn=RetroBatch(chunks, args.vocab_size),
                      generator=generator, persistent_workers=shuffle and args.num_workers > 0,
                      prefetch_factor=4 if args.num_workers > 0 else None)


# ---------------------------------------------------------------- training


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_batch(batch: dict[str, Any], vocab_size: int, n_chunks: int) -> None:
    top = int(batch["text"].max())
    if top >= vocab_size:
        raise SystemExit(f"token id {top} >= --vocab-size {vocab_size}: give the GPT tokenizer's vocabulary size")
    if batch["retrieved"].shape[1] != n_chunks:
        raise SystemExit(f"retrieved has {batch['retrieved'].shape[1]} chunks a sample, the model expects {n_chunks}")


def train_one(run: str, args, observe: Callable[..., None] | None = None) -> dict[str, Any]:
    import torch

    from retro_dask import RetroDataset

    torch.set_num_threads(args.threads)
    k, r = args.num_neighbors, 2  # RETRO's retrieved: each neighbour and one continuation chunk
    train = RetroDataset(args.workdir, "train", num_neighbors=k, num_retrieved_chunks=r)
    valid = RetroDataset(args.workdir, args.eval_split, num_neighbors=k, num_retrieved_chunks=r)
    seq_length, chunk_length = len(train[0]["text"]) - 1, train.chunk_length
    chunks = DatabaseChunks(args.workdir)
    if run == "control":
        eod = args.vocab_size - 1  # GPT-2's end-of-document id, RetroDataset's padding (the model never sees it)
        train = RandomNeighbours(train, chunks, args.seed, stream=0, pad=eod)
        valid = RandomNeighbours(valid, chunks, args.seed, stream=1, pad=eod)
    elif run == "oracle":
        eod = args.vocab_size - 1
        train, valid = OwnChunks(train, chunks, pad=eod), OwnChunks(valid, chunks, pad=eod)
    torch.manual_seed(args.seed)  # the same initial weights for both runs of a seed
    model = build_model(args, seq_length, chunk_length)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    loader = make_loader(train, chunks, args, shuffle=True, seed=args.seed)
    if len(loader) == 0:
        raise SystemExit(f"the train split has {len(train)} samples, fewer than --batch-size {args.batch_size}")
    print(f"[{run}] seed {args.seed}: RETRO ({n_params / 1e6:.1f}M parameters, retro-pytorch "
          f"{retro_pytorch_version()}), {len(train)} train samples of {seq_length} tokens, "
          f"{seq_length // chunk_length} chunks x {k} neighbours x {r * chunk_length} tokens", flush=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    model.train()
    t0 = time.perf_counter()
    waited, curve_s, step, losses, epochs, curve = 0.0, 0.0, 0, [], 0, []
    while step < args.steps:
        epochs += 1
        t_wait = time.perf_counter()
        for batch in loader:
            waited += time.perf_counter() - t_wait
            if step == 0:
                check_batch(batch, args.vocab_size, seq_length // chunk_length)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args)
            with autocast:
                loss = next_token_loss(model, batch["text"], batch["retrieved"])
            if not torch.isfinite(loss):
                raise SystemExit(f"[{run}] step {step}: loss is {loss.item()}; lower --lr ({args.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            if observe is not None:
                observe(run=run, step=step, batch=batch, model=model, loss=loss.item())
            losses.append(loss.item())
            step += 1
            if args.log_every and (step % args.log_every == 0 or step == args.steps):
                print(f"[{run}] step {step}/{args.steps}  train loss {np.mean(losses[-args.log_every:]):.3f}  "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                t_eval = time.perf_counter()
                point = evaluate(model, valid, chunks, args, limit=args.curve_samples)["valid_loss"]
                curve.append((step, point))
                curve_s += time.perf_counter() - t_eval  # not training time
                which = f"first {args.curve_samples}" if args.curve_samples else "all"
                print(f"[{run}] step {step}: valid loss {point:.4f} ({which} valid samples)", flush=True)
            if step >= args.steps:
                break
            t_wait = time.perf_counter()
    train_s = time.perf_counter() - t0 - curve_s
    tokens = step * args.batch_size * seq_length
    del loader  # stop the persistent workers before evaluation starts its own
    result = evaluate(model, valid, chunks, args, limit=args.eval_samples)
    result.update(run=run, seed=args.seed, steps=step, epochs=epochs, train_tokens=tokens, train_s=train_s,
                  tokens_per_s=tokens / train_s, data_wait_s=waited, final_train_loss=float(np.mean(losses[-10:])),
                  parameters=n_params, curve=curve, wall_s=time.perf_counter() - t0)
    print(f"[{run}] seed {args.seed}: valid loss {result['valid_loss']:.4f}  perplexity {result['valid_ppl']:.1f}  "
          f"({result['valid_tokens']:,} tokens)  train {tokens / train_s:,.0f} tokens/s  "
          f"wall {result['wall_s']:.0f} s (waited {waited:.1f} s for data)", flush=True)
    return result


def evaluate(model, dataset, chunks: DatabaseChunks, args, limit: int = 0) -> dict[str, Any]:
    """Mean next-token loss over every token of the split's first ``limit`` samples (all: 0), fp32, and its perplexity."""
    import torch

    loader = make_loader(dataset, chunks, args, shuffle=False, seed=args.seed)
    limit = min(limit or len(dataset), len(dataset))
    total, count, seen = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            seq, retrieved = batch["text"][: limit - seen], batch["retrieved"][: limit - seen]
            total += float(next_token_loss(model, seq, retrieved, reduction="sum"))
            count += seq[:, 1:].numel()
            seen += len(seq)
            if seen >= limit:
                break
    model.train()
    if count == 0:
        raise SystemExit(f"the {args.eval_split} split has no samples: build it with a non-zero split share")
    mean = total / count
    return {"valid_loss": mean, "valid_ppl": math.exp(mean), "valid_tokens": count, "valid_samples": seen}


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", required=True, help="a built workdir (train and valid neighbours)")
    p.add_argument("--runs", default="retrieval,control", help="comma-separated: retrieval, control, oracle")
    p.add_argument("--seed", type=int, default=0, help="initial weights, sample order and the control's draws")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=15, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--num-neighbors", type=int, default=2, help="neighbours per chunk (K)")
    p.add_argument("--dim", type=int, default=128, help="decoder width")
    p.add_argument("--enc-dim", type=int, default=0, help="encoder width (0: --dim)")
    p.add_argument("--enc-depth", type=int, default=2)
    p.add_argument("--dec-depth", type=int, default=4)
    p.add_argument("--cross-attn-layers", default="2,4", help="decoder layers with chunked cross-attention")
    p.add_argument("--dim-head", type=int, default=32, help="per head; heads = dim / dim-head (RETRO needs >= 32)")
    p.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help="GPT vocabulary; its size is the pad id")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="training matmuls (autocast); evaluation is fp32")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the training process")
    p.add_argument("--eval-split", default="valid")
    p.add_argument("--eval-samples", type=int, default=0, help="valid samples to evaluate (0: all)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--curve-samples", type=int, default=16, help="valid samples of those evaluations")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--json-out", help="write the figures of every run here")
    args = p.parse_args(argv)
    runs = [x.strip() for x in args.runs.split(",") if x.strip()]
    if not runs or any(x not in RUNS for x in runs):
        p.error(f"--runs {args.runs!r}: choose from {', '.join(RUNS)}")
    args.runs = runs
    if args.steps < 1 or args.batch_size < 1:
        p.error(f"--steps {args.steps} and --batch-size {args.batch_size} must be at least 1")
    if args.dim_head < 32:
        p.error(f"--dim-head {args.dim_head}: retro-pytorch's RETRO needs at least 32")
    return args


def main(argv: list[str] | None = None, observe: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train every run of ``--runs`` and print their comparison; returns the figures.

    ``observe(run=, step=, batch=, model=, loss=)`` is called after each
    training step (the test uses it to look at what reached the model).
    """
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {run: train_one(run, args, observe) for run in args.runs}
    if "control" in results:
        ctl = results["control"]
        for run in ("retrieval", "oracle"):
            if run in results:
                x = results[run]
                print(f"seed {args.seed}: valid loss {run} {x['valid_loss']:.4f} vs control {ctl['valid_loss']:.4f} "
                      f"(difference {ctl['valid_loss'] - x['valid_loss']:+.4f} nats/token; "
                      f"perplexity {x['valid_ppl']:.1f} vs {ctl['valid_ppl']:.1f})")
    out = {"args": {k: v for k, v in vars(args).items()}, "retro_pytorch": retro_pytorch_version(), "runs": results}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
