"""db-build: the chunk database of the retrieval corpus.

Reads the Megatron indexed datasets of the blend and writes, in the workdir:

- ``db/candidates.zarr``: every candidate chunk cut from the document sizes of
  the training documents, with its end trimmed of a trailing end-of-document
  token and its BERT length (a block stage, in blocks of ``CANDIDATE_BLOCK_FACTOR``
  x --block-size candidates);
- ``db/chunks.zarr``: the valid candidates (non-empty, with at least one BERT
  token) in corpus order, int64 ``[n_chunks, 5]``: dataset_idx, document_idx,
  chunk_start, chunk_end, bert_length (a second block stage that compacts);
- ``db/doc_first_row.npy`` / ``db/doc_key.npy``: the first row of each document
  with chunks, for the neighbour filter's row -> document lookup;
- ``db/infos.json`` and ``db/sampled.zarr`` (the seeded index-training sample).

Candidate boundaries come from the ``.idx`` sizes alone (``plan.py``); only the
BERT-length pass reads tokens, inside the workers, one block at a time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import arrays
from .config import BuildConfig
from .errors import InputError
from .indexed_dataset import IndexedDataset
from .plan import (
    BlockStart,
    CompactionSlice,
    apportion,
    candidate_block,
    n_blocks,
    plan_candidate_blocks,
    plan_compaction,
    rebatch,
    sample_row_blocks,
    split_document_ranges,
)
from .runner import Runner, block_record, guided_spans, run_each
from .tokenizer import BertTokenizerSpec, GPTTokenizerSpec, get_bert_tokenizer, get_gpt_tokenizer
from .workdir import (
    atomic_path,
    atomic_write_json,
    candidates_path,
    chunks_path,
    doc_keys_path,
    doc_starts_path,
    infos_path,
    mark_stage_done,
    sampled_path,
    stage_done,
)

DOC_KEY_SHIFT = 40  # document_idx < 2**40 per dataset; dataset_idx above it


def doc_key(dataset_idx, document_idx):
    return (np.asarray(dataset_idx, dtype=np.int64) << DOC_KEY_SHIFT) | np.asarray(document_idx, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def open_dataset(prefix: str) -> IndexedDataset:
    """This process's memory map of an indexed dataset (opened once per worker)."""
    return IndexedDataset(prefix)


def release_dataset_pages(prefixes: Sequence[str]) -> None:
    """Drop this process's mapped pages of these corpora: block tasks stream through them once."""
    for prefix in prefixes:
        open_dataset(prefix).release_pages()


def gpt_spec(config: BuildConfig) -> GPTTokenizerSpec:
    c = config.chunk
    return GPTTokenizerSpec(vocab_file=c.gpt_vocab_file, merge_file=c.gpt_merge_file, tokenizer_json=c.gpt_tokenizer_json)


def bert_spec(config: BuildConfig) -> BertTokenizerSpec:
    return BertTokenizerSpec(model_dir=config.embed.bert_model)


@dataclass(frozen=True)
class DatasetFacts:
    prefix: str
    ratio: float
    n_docs: int
    splits: tuple[tuple[int, int], ...]  # document ranges of train, valid, test

    @property
    def train(self) -> tuple[int, int]:
        return self.splits[0]


def dataset_facts(config: BuildConfig) -> list[DatasetFacts]:
    """Open every dataset of the blend (validating it) and split its documents."""
    facts = []
    for ratio, prefix in zip(config.chunk.data.ratios, config.chunk.data.prefixes):
        ds = open_dataset(prefix)
        facts.append(DatasetFacts(prefix, ratio, len(ds), tuple(split_document_ranges(len(ds), config.chunk.split))))
    return facts


# A block of the length pass (candidates.zarr, an intermediate) is this many --block-size blocks: what
# every block costs besides its chunks (two files, a ledger record, a share of a task) is paid 4x less
# often, while a block is still only ~0.1 s of work.
CANDIDATE_BLOCK_FACTOR = 4


def plan_candidates(config: BuildConfig, facts: Sequence[DatasetFacts], block_size: int | None = None):
    """The candidate blocks: of the length pass (``CANDIDATE_BLOCK_FACTOR`` x --block-size) unless ``block_size``."""
    return plan_candidate_blocks(
        [(open_dataset(f.prefix).scanned_sizes(), f.train[0], f.train[1]) for f in facts],
        config.chunk.chunk_length,
        block_size or CANDIDATE_BLOCK_FACTOR * config.chunk.block_size,
    )


@dataclass(frozen=True)
class CandidateJob:
    """What a candidate-block task needs besides its block: values only."""

    workdir: str
    prefixes: tuple[str, ...]
    train_ranges: tuple[tuple[int, int], ...]
    chunk_length: int
    gpt: GPTTokenizerSpec
    bert: BertTokenizerSpec


def candidate_job(workdir: str, config: BuildConfig, facts: Sequence[DatasetFacts]) -> CandidateJob:
    return CandidateJob(workdir, tuple(f.prefix for f in facts), tuple(f.train for f in facts),
                        config.chunk.chunk_length, gpt_spec(config), bert_spec(config))


def candidate_counts_of_blocks(workdir: str, n_blocks_: int, n_datasets: int) -> tuple[list[int], np.ndarray]:
    """Valid chunks per block, and valid / invalid / empty candidates per dataset (rows of a ``[3, n]`` array).

    Reads the ledger one record at a time: the driver keeps a few integers per block.
    """
    from .workdir import Ledger

    ledger = Ledger(workdir, "db-candidates")
    n_valid: list[int] = []
    counts = np.zeros((3, n_datasets), np.int64)
    for b in range(n_blocks_):
        r = ledger.read(b)
        if r is None:
            raise RuntimeError(f"db-candidates block {b} has no record after the stage finished")
        n_valid.append(int(r["n_valid"]))
        counts += [r["valid_per_dataset"], r["invalid_per_dataset"], r["empty_per_dataset"]]
    return n_valid, counts


def trim_and_measure(job: CandidateJob, cand: np.ndarray) -> np.ndarray:
    """Trim trailing end-of-document tokens and add each candidate's BERT length.

    Returns int64 ``[n, 5]``; an end-of-document-only candidate becomes empty
    (end == start, length 0); a candidate whose text has no BERT token keeps its
    end and gets length 0.
    """
    out = np.zeros((len(cand), 5), dtype=np.int64)
    out[:, :4] = cand
    texts = chunk_texts_of_rows(get_gpt_tokenizer(job.gpt), job.prefixes, out, trim_eod=True)
    release_dataset_pages(job.prefixes)
    nonempty = out[:, 3] > out[:, 2]
    lengths = get_bert_tokenizer(job.bert).lengths(texts, num_threads=1)
    out[:, 4] = np.where(nonempty, lengths, 0)
    return out


def read_chunk_runs(ds: IndexedDataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokens of chunks ``rows`` (columns document, start, end), read one run of a document's chunks at a time.

    Returns the tokens of all chunks end to end, and where each chunk starts and
    ends in them. Consecutive chunks of a document are adjacent in the file, so
    a block of 1,024 chunks is a few dozen reads instead of 1,024.
    """
    docs, begin, end = rows[:, 0], rows[:, 1], rows[:, 2]
    new_run = np.ones(len(rows), dtype=bool)
    new_run[1:] = (docs[1:] != docs[:-1]) | (begin[1:] != end[:-1])
    firsts = np.flatnonzero(new_run)
    lasts = np.append(firsts[1:], len(rows)) - 1
    parts = [ds.get(int(docs[f]), int(begin[f]), int(end[last] - begin[f]))
             for f, last in zip(firsts.tolist(), lasts.tolist())]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Offset of each chunk in ``tokens``: its run's offset plus its start within the run.
    run_offset = np.zeros(len(firsts), dtype=np.int64)
    np.cumsum([len(p) for p in parts[:-1]], out=run_offset[1:])
    run_of = np.cumsum(new_run) - 1
    starts = run_offset[run_of] + begin - begin[firsts][run_of]
    return tokens, starts, starts + (end - begin)


def chunk_texts_of_rows(gpt, prefixes: Sequence[str], rows: np.ndarray, trim_eod: bool = False) -> list[str]:
    """GPT detokenization of chunks (rows of chunks.zarr or candidates), read and decoded one document run at a time.

    With ``trim_eod`` a row that ends its document loses a trailing end-of-document
    token: its end (``rows[:, 3]``) is lowered in place (db-build's length pass).
    """
    texts: list[str] = [""] * len(rows)
    for d in np.unique(rows[:, 0]):
        sel = np.flatnonzero(rows[:, 0] == d)
        ds = open_dataset(prefixes[int(d)])
        tokens, starts, ends = read_chunk_runs(ds, rows[sel, 1:4])
        if trim_eod:
            at_doc_end = np.flatnonzero(rows[sel, 3] == ds.sizes[rows[sel, 1]])
            trim = at_doc_end[(ends[at_doc_end] > starts[at_doc_end]) & (tokens[ends[at_doc_end] - 1] == gpt.eod)]
            ends[trim] -= 1
            rows[sel[trim], 3] -= 1
        for i, text in zip(sel.tolist(), gpt.decode_runs(tokens, starts, ends)):
            texts[i] = text
    return texts


def compute_candidates(job: CandidateJob, start: BlockStart, count: int) -> np.ndarray:
    """One block of candidates.zarr: boundaries from sizes, then trimmed ends and BERT lengths."""
    sizes_of = [open_dataset(p).sizes for p in job.prefixes]
    cand = candidate_block(sizes_of, job.train_ranges, start, count, job.chunk_length)
    return trim_and_measure(job, cand)


def candidates_task(job: CandidateJob, block: int, start: BlockStart, count: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = compute_candidates(job, start, count)
    nonempty = rows[:, 3] > rows[:, 2]
    valid = nonempty & (rows[:, 4] > 0)
    n_ds = len(job.prefixes)
    per = lambda mask: np.bincount(rows[mask, 0], minlength=n_ds).tolist()  # noqa: E731
    stats = block_record(
        len(rows), t0,
        n_valid=int(valid.sum()),
        valid_per_dataset=per(valid),
        invalid_per_dataset=per(nonempty & ~valid),
        empty_per_dataset=per(~nonempty),
    )
    return arrays.write_block(job.workdir, "db-candidates", candidates_path(job.workdir), block, rows, stats)


def valid_candidates(workdir: str, blocks: Sequence[int]) -> dict[int, np.ndarray]:
    """The valid rows of candidate blocks ``blocks``, read in one call (they are consecutive in a plan)."""
    if not blocks:
        return {}
    path = candidates_path(workdir)
    b = arrays.open_read(path).chunks[0]
    lo, hi = min(blocks), max(blocks) + 1
    rows = arrays.read_rows(path, lo * b, hi * b)
    out = {}
    for k in blocks:
        part = rows[(k - lo) * b : (k - lo + 1) * b]
        out[k] = part[(part[:, 3] > part[:, 2]) & (part[:, 4] > 0)]
    return out


def compute_compaction(workdir: str, slices: Sequence[CompactionSlice],
                       valid: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """One block of chunks.zarr: the valid candidates its slices name, in order."""
    if valid is None:
        valid = valid_candidates(workdir, [s.block for s in slices])
    parts = [valid[s.block][s.start : s.stop] for s in slices]
    return np.concatenate(parts) if parts else np.zeros((0, 5), np.int64)


def compaction_task(workdir: str, block: int, slices: Sequence[CompactionSlice]) -> dict[str, Any]:
    return compaction_span_task(workdir, [(block, slices)])[0]


def compaction_span_task(workdir: str, plan: Sequence[tuple[int, Sequence[CompactionSlice]]]) -> list[dict[str, Any]]:
    """Blocks of chunks.zarr, each written and recorded in turn; the candidate blocks they need are read once."""
    t0 = time.perf_counter()
    valid = valid_candidates(workdir, sorted({s.block for _, slices in plan for s in slices}))
    records = []
    for block, slices in plan:
        data = compute_compaction(workdir, slices, valid)
        records.append(arrays.write_block(workdir, "db-chunks", chunks_path(workdir), block, data,
                                          block_record(len(data), t0)))
        t0 = time.perf_counter()
    return records


def doc_starts_task(workdir: str, block: int, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows of blocks ``block`` to ``block + n - 1`` of chunks.zarr where a new document starts, and their keys."""
    path = chunks_path(workdir)
    b = arrays.open_read(path).chunks[0]
    lo = block * b
    rows = arrays.read_rows(path, lo - 1, lo + n * b)[:, :2]
    keys = doc_key(rows[:, 0], rows[:, 1])
    if lo == 0:
        new = np.ones(len(keys), bool)
        new[1:] = keys[1:] != keys[:-1]
        return np.flatnonzero(new).astype(np.int64), keys[new]
    new = keys[1:] != keys[:-1]
    return (lo + np.flatnonzero(new)).astype(np.int64), keys[1:][new]


# Blocks of the compaction and the document index take ~1 ms to compute: a task takes up to 128 of
# them, or the driver's ~10 ms per task would be most of the time.
CHEAP_BLOCK_SPAN = 128


def write_doc_index(runner: Runner, n_chunks: int, block_size: int) -> None:
    """Write db/doc_first_row.npy and db/doc_key.npy from chunks.zarr.

    Blocks are scanned in parallel and their (small) results streamed in order
    to raw files, which then become ``.npy`` files: memory stays bounded by the
    number of tasks in flight.
    """
    import dask

    w = runner.workdir
    spans = guided_spans(list(range(n_blocks(n_chunks, block_size))), runner.n_threads, CHEAP_BLOCK_SPAN)
    tasks = (dask.delayed(doc_starts_task)(w, span[0], len(span)) for span in spans)
    with atomic_path(doc_starts_path(w)) as rows_tmp, atomic_path(doc_keys_path(w)) as keys_tmp:
        raw_rows, raw_keys = rows_tmp.with_suffix(".raw"), keys_tmp.with_suffix(".raw")
        total = 0
        with open(raw_rows, "wb") as fr, open(raw_keys, "wb") as fk:
            for rows, keys in runner.map_ordered(tasks):
                fr.write(np.ascontiguousarray(rows, np.int64).tobytes())
                fk.write(np.ascontiguousarray(keys, np.int64).tobytes())
                total += len(rows)
        for raw, out in ((raw_rows, rows_tmp), (raw_keys, keys_tmp)):
            raw_to_npy(raw, out, np.int64, total)
            raw.unlink()


def raw_to_npy(raw, out, dtype, n: int) -> None:
    """Prefix a raw little-endian array file with an ``.npy`` header (streaming copy)."""
    import shutil

    from numpy.lib import format as npy

    with open(out, "wb") as f, open(raw, "rb") as src:
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})
        shutil.copyfileobj(src, f, 1 << 20)


def lookup_documents(first_row: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Document key of each chunks.zarr row (``-1`` rows give ``-1``)."""
    rows = np.asarray(rows, dtype=np.int64)
    pos = np.searchsorted(first_row, rows, side="right") - 1
    out = np.asarray(keys)[np.clip(pos, 0, None)]
    return np.where(rows < 0, -1, out)


def train_sample(config: BuildConfig, n_chunks_per_dataset: Sequence[int],
                 ntrain: int) -> tuple[list[int], Iterator[np.ndarray]]:
    """The index-training sample: rows per dataset, and the sorted chunks.zarr rows a block at a time.

    ``ntrain`` is split across datasets by blend ratio (capped by each one's
    chunks); within a dataset the rows are a seeded uniform sample, drawn a
    block of rows at a time so that no process holds the whole sample.
    """
    share = apportion(ntrain, config.chunk.data.ratios, n_chunks_per_dataset)
    offsets = np.concatenate([[0], np.cumsum(n_chunks_per_dataset)]).astype(np.int64)
    B = config.chunk.block_size

    def rows() -> Iterator[np.ndarray]:
        for d, k in enumerate(share):
            rng = np.random.default_rng([config.chunk.seed, d])
            for part in sample_row_blocks(int(n_chunks_per_dataset[d]), int(k), rng, B):
                yield offsets[d] + part

    return share, rows()


def build_db(runner: Runner, config: BuildConfig, index_ntrain, log=print) -> dict[str, Any]:
    """Run db-build; resumes from finished blocks. ``index_ntrain(n_chunks)`` sizes the sample."""
    w = runner.workdir
    t0 = time.perf_counter()
    facts = dataset_facts(config)
    plan = plan_candidates(config, facts)
    if plan.n_candidates == 0:
        raise InputError(
            "the training split of --data-path has no tokens to chunk: check the prefixes "
            f"({', '.join(config.chunk.data.prefixes)}) and --split"
        )
    B = config.chunk.block_size
    arrays.create(candidates_path(w), (plan.n_candidates, 5), np.int64, plan.block_size, fill_value=0)
    job = candidate_job(w, config, facts)
    import dask

    def candidate_args(b: int) -> tuple:
        lo, hi = plan.block_rows(b)
        return job, b, plan.starts[b], hi - lo

    # A block is ~0.1 s of WordPiece and a Dask task costs the driver ~10 ms: several blocks per task.
    cand_result = runner.run_blocks(
        "db-candidates", plan.n_blocks,
        lambda b: dask.delayed(candidates_task, pure=False)(*candidate_args(b)),
        desc="db-build: BERT lengths",
        make_span_task=lambda bs: dask.delayed(run_each, pure=False)(candidates_task, [candidate_args(b) for b in bs]),
    )
    n_ds = len(facts)
    valid_per_block, (valid, invalid, _) = candidate_counts_of_blocks(w, plan.n_blocks, n_ds)
    n_chunks = int(valid.sum())
    if n_chunks == 0:
        raise InputError("no chunk of the training split has any BERT token: check the corpus and --bert-model")

    compaction = plan_compaction(valid_per_block, B)
    arrays.create(chunks_path(w), (n_chunks, 5), np.int64, B, fill_value=0)
    chunk_result = runner.run_blocks(
        "db-chunks", len(compaction),
        lambda j: dask.delayed(compaction_task, pure=False)(w, j, compaction[j]),
        desc="db-build: chunks",
        make_span_task=lambda js: dask.delayed(compaction_span_task, pure=False)(w, [(j, compaction[j]) for j in js]),
        max_span=CHEAP_BLOCK_SPAN,
    )

    if not stage_done(w, "db-docs"):
        write_doc_index(runner, n_chunks, B)
        mark_stage_done(w, "db-docs", {"n_chunks": n_chunks})

    ntrain = int(index_ntrain(n_chunks))
    sampled_per_dataset, sample_blocks = train_sample(config, valid.tolist(), ntrain)
    n_sampled = sum(sampled_per_dataset)
    done = stage_done(w, "db-sampled")
    if not done or done.get("n_sampled") != n_sampled:
        with atomic_path(sampled_path(w)) as tmp:
            arrays.create(tmp, (n_sampled,), np.int64, B, fill_value=0)
            for b, rows in enumerate(rebatch(sample_blocks, B)):
                arrays.write_chunk(w, "db-sampled", tmp, b, rows)
        mark_stage_done(w, "db-sampled", {"n_sampled": n_sampled})

    infos = []
    for d, f in enumerate(facts):
        infos.append({
            "ratio": f.ratio,
            "prefix": f.prefix,
            "n_docs": f.n_docs,
            "n_docs_train": f.train[1] - f.train[0],
            "n_chunks": int(valid[d] + invalid[d]),
            "n_chunks_train": int(valid[d]),
            "n_chunks_invalid": int(invalid[d]),
            "n_chunks_sampled": sampled_per_dataset[d],
        })
    atomic_write_json(infos_path(w), infos)
    seconds = time.perf_counter() - t0
    stats = runner.write_stats(
        "db-build", cand_result, seconds,
        n_candidates=plan.n_candidates, n_chunks=n_chunks, n_chunks_invalid=int(invalid.sum()),
        n_sampled=n_sampled, chunks_per_s=round(cand_result.total("n_rows") / max(cand_result.seconds, 1e-9), 1),
        compaction_seconds=round(chunk_result.seconds, 3),
    )
    mark_stage_done(w, "db-build", {"n_chunks": n_chunks})
    return stats


def lazy_candidate_boundaries(config: BuildConfig):
    """The candidate chunk boundaries as a lazy Dask array ``[n, 4]``, in blocks of --block-size rows.

    Computing it reads only the ``.idx`` sizes (memory-mapped), never a token.
    """
    import dask
    import dask.array as da

    facts = dataset_facts(config)
    plan = plan_candidates(config, facts, config.chunk.block_size)
    prefixes = tuple(f.prefix for f in facts)
    ranges = tuple(f.train for f in facts)

    def block(start: BlockStart, count: int) -> np.ndarray:
        return candidate_block([open_dataset(p).sizes for p in prefixes], ranges, start, count, config.chunk.chunk_length)

    parts = []
    for b in range(plan.n_blocks):
        lo, hi = plan.block_rows(b)
        parts.append(da.from_delayed(dask.delayed(block)(plan.starts[b], hi - lo), shape=(hi - lo, 4), dtype=np.int64))
    if not parts:
        return da.zeros((0, 4), dtype=np.int64)
    return da.concatenate(parts, axis=0)


def lazy_chunks(workdir: str):
    """``chunks.zarr`` as a lazy Dask array (one Dask block per Zarr chunk)."""
    import dask.array as da

    return da.from_zarr(str(chunks_path(workdir)))
