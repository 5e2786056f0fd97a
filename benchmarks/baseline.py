"""A careful sequential RETRO preprocessing script: the baseline of ``e2e.py``.

One process does the pipeline's work in order, the way a careful user would
write it: torch and Faiss use every core through their own threads, chunks are
embedded in length-sorted batches over the whole set, the same model, dtype,
index and search settings, and a vectorized same-document filter. It reuses
the library's pure functions where they only compute maps (document split,
sample index maps), so both sides do the same work.

Run on its own: ``python benchmarks/baseline.py PREFIX FACTORY NPROBE [fp32|bf16]``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from common import ROOT, peak_rss_mb  # noqa: F401  (ROOT: puts the project on sys.path)

CHUNK = 64
SEQ = 2048
K_QUERY, K_SAVE = 200, 20


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = now - self.t
        self.t = now


def embed_sorted(model, tok_ids: list[list[int]], batch: int, dtype) -> np.ndarray:
    import torch

    lengths = np.array([len(x) for x in tok_ids])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(tok_ids), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for lo in range(0, len(order), batch):
            sel = order[lo : lo + batch]
            width = int(lengths[sel].max())
            x = np.zeros((len(sel), width), np.int64)
            m = np.zeros((len(sel), width), np.int64)
            for r, i in enumerate(sel):
                x[r, : lengths[i]] = tok_ids[i]
                m[r, : lengths[i]] = 1
            h = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(m)).last_hidden_state.float()
            pool = torch.from_numpy(m).clone()
            pool[:, 0] = 0
            pool[torch.arange(len(sel)), torch.from_numpy(lengths[sel] - 1)] = 0
            pool = pool.unsqueeze(-1).float()
            out[sel] = ((h * pool).sum(1) / pool.sum(1).clamp(min=1)).numpy()
    return out


def run(prefix: str, factory: str, nprobe: int, dtype: str = "fp32", batch: int = 128, seed: int = 1234) -> dict:
    import torch
    from transformers import BertModel

    import transformers

    from retro_dask.formats.faiss_index import faiss as load_faiss

    from retro_dask.formats.indexed_dataset import IndexedDataset
    from retro_dask.plan.chunks import split_document_ranges
    from retro_dask.plan.samples import build_split_maps, split_plan  # noqa: F401
    from retro_dask.text.bert import default_bert_dir, get_bert_tokenizer
    from retro_dask.text.gpt import get_gpt_tokenizer

    # retro_dask's loader: the same OpenBLAS kernel as the pipeline (see formats/faiss_index.py).
    faiss = load_faiss()
    transformers.utils.logging.set_verbosity_error()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)
    timer = Timer()
    gpt, bert = get_gpt_tokenizer(), get_bert_tokenizer()
    model = BertModel.from_pretrained(default_bert_dir(), local_files_only=True, use_safetensors=True,
                                      add_pooling_layer=False, attn_implementation="sdpa")
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    ds = IndexedDataset(prefix)
    timer.lap("load")

    # chunk: training documents, chunks of 64 tokens, EOD trimmed, no-BERT-token chunks dropped
    a, b = split_document_ranges(len(ds), (0.98, 0.02, 0.0))[0]
    rows, texts = [], []
    for doc in range(a, b):
        tokens = ds[doc]
        end = len(tokens) - 1 if len(tokens) and tokens[-1] == gpt.eod else len(tokens)
        for s in range(0, end, CHUNK):
            e = min(s + CHUNK, end)
            rows.append((doc, s, e))
            texts.append(gpt.decode(tokens[s:e]))
    ids = bert.encode_for_model(texts, 256)
    keep = [i for i, x in enumerate(ids) if len(x) > 2]
    rows = np.array(rows)[keep]
    ids = [ids[i] for i in keep]
    timer.lap("chunk")

    emb = embed_sorted(model, ids, batch, dtype)
    timer.lap("embed")

    rng = np.random.default_rng(seed)
    index = faiss.index_factory(emb.shape[1], factory)
    ntrain = len(emb)
    index.train(emb[np.sort(rng.choice(len(emb), ntrain, replace=False))])
    timer.lap("index-train")
    index.add_with_ids(emb, np.arange(len(emb), dtype=np.int64))
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    timer.lap("index-add")

    # query: every chunk of every sample of each split, embedded, searched, filtered
    from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, QueryConfig

    config = BuildConfig(ChunkConfig(DataBlend((1.0,), (prefix,)), seed=seed), query=QueryConfig(seq_length=SEQ))
    doc_of_row = rows[:, 0]
    neighbors = {}
    n_query = 0
    for split in ("train", "valid", "test"):
        plan = split_plan(config, split, [ds.sizes])
        maps = build_split_maps(plan, [ds.sizes])
        if plan.n_samples == 0:
            continue
        doc_idx, sample_idx, shuffle = maps["doc_idx_0"], maps["sample_idx_0"], maps["shuffle_idx_0"]
        q_tokens, q_docs = [], []
        for i in range(plan.n_samples):
            s = shuffle[i]
            (p0, o0), (p1, _) = sample_idx[s], sample_idx[s + 1]
            docs = doc_idx[p0 : p1 + 1]
            stream = np.concatenate([ds[int(d)] for d in docs])[o0 : o0 + SEQ]
            for c in range(SEQ // CHUNK):
                t = stream[c * CHUNK : (c + 1) * CHUNK]
                q_tokens.append(gpt.decode(t[t != gpt.eod]))
                q_docs.append(set(docs.tolist()))
        q_emb = embed_sorted(model, bert.encode_for_model(q_tokens, 256), batch, dtype)
        _, found = index.search(q_emb, K_QUERY)
        nb_docs = np.where(found >= 0, doc_of_row[np.clip(found, 0, None)], -1)
        own = np.zeros(found.shape, bool)
        for r, docs in enumerate(q_docs):  # per-row set test: fast enough at this size
            own[r] = np.isin(nb_docs[r], list(docs))
        ok = (found >= 0) & ~own
        order = np.argsort(~ok, axis=1, kind="stable")[:, :K_SAVE]
        neighbors[split] = np.take_along_axis(np.where(ok, found, -1), order, axis=1)
        n_query += len(q_tokens)
    timer.lap("query-neighbors")
    return {"stages": timer.stages, "seconds": sum(timer.stages.values()), "n_chunks": len(emb),
            "n_query_chunks": n_query, "peak_rss_mb": peak_rss_mb(), "db_ids": ids}


if __name__ == "__main__":
    out = run(sys.argv[1], sys.argv[2], int(sys.argv[3]), *(sys.argv[4:5] or ["fp32"]))
    out.pop("db_ids")
    print(out)
