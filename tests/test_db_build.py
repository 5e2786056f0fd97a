"""db-build: chunks.zarr against a brute-force chunker written here."""

from __future__ import annotations

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_dask.build import run_build
from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, IndexConfig, QueryConfig, RunOptions
from retro_dask.formats.indexed_dataset import IndexedDataset
from retro_dask.formats.indexed_writer import write_indexed_dataset
from retro_dask.plan.chunks import split_document_ranges
from retro_dask.text.bert import get_bert_tokenizer

from conftest import tree_bytes

SYNC = RunOptions(cluster="synchronous", progress=False)


def db_config(prefixes, weights=None, block_size=64, chunk_length=64, split="98,2,0", **kw) -> BuildConfig:
    weights = weights or [1.0] * len(prefixes)
    return BuildConfig(
        ChunkConfig(DataBlend(tuple(weights), tuple(prefixes)), split=split, chunk_length=chunk_length,
                    block_size=block_size, **kw),
        query=QueryConfig(seq_length=chunk_length * 2, train_samples=0, valid_samples=0, test_samples=0),
    )


def brute_force_chunks(prefixes, split, chunk_length, eod):
    """Chunk every training document by hand; keep chunks whose text has a BERT token."""
    from retro_dask.text.gpt import get_gpt_tokenizer

    gpt, bert = get_gpt_tokenizer(), get_bert_tokenizer()
    rows = []
    for d, prefix in enumerate(prefixes):
        ds = IndexedDataset(prefix)
        a, b = split_document_ranges(len(ds), split)[0]
        for doc in range(a, b):
            tokens = np.asarray(ds[doc])
            end = len(tokens) - 1 if len(tokens) and tokens[-1] == eod else len(tokens)
            for start in range(0, end, chunk_length):
                stop = min(start + chunk_length, end)
                text = gpt.decode(tokens[start:stop])
                n_bert = len(bert.encode_for_model([text], 10**6)[0]) - 2
                if n_bert > 0:
                    rows.append((d, doc, start, stop, n_bert))
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def read_chunks(workdir):
    return zarr.open_array(str(workdir / "db" / "chunks.zarr"), mode="r")[:]


def test_sample_corpus_matches_brute_force(tmp_path, sample_corpus_prefix, gpt):
    config = db_config([sample_corpus_prefix], block_size=1024)
    run_build(tmp_path / "w", config, SYNC, "db-build", log=lambda m: None)
    got = read_chunks(tmp_path / "w")
    expected = brute_force_chunks([sample_corpus_prefix], config.chunk.split, 64, gpt.eod)
    np.testing.assert_array_equal(got, expected)
    arr = zarr.open_array(str(tmp_path / "w" / "db" / "chunks.zarr"), mode="r")
    assert arr.chunks == (1024, 5)  # the Zarr chunk is the Dask block


# Token ids for the special cases: 220 is " ", 198 is "\n" (no BERT token in either).
SPACE, NEWLINE = 220, 198


@st.composite
def token_docs(draw, eod):
    kind = draw(st.sampled_from(["empty", "short", "exact", "long", "blank", "eod_only"]))
    ordinary = st.integers(0, 50000)
    if kind == "empty":
        doc = []
    elif kind == "short":
        doc = draw(st.lists(ordinary, min_size=1, max_size=15))
    elif kind == "exact":
        doc = draw(st.lists(ordinary, min_size=16, max_size=16)) * draw(st.integers(1, 3))
    elif kind == "long":
        doc = draw(st.lists(ordinary, min_size=17, max_size=70))
    elif kind == "blank":  # chunks whose text has no BERT token
        doc = draw(st.lists(st.sampled_from([SPACE, NEWLINE]), min_size=1, max_size=40))
    else:
        doc = []
    if kind == "eod_only" or draw(st.booleans()):
        doc = doc + [eod]
    return doc


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_corpora_match_brute_force(tmp_path_factory, gpt, data):
    tmp = tmp_path_factory.mktemp("gen")
    n_ds = data.draw(st.integers(1, 3))
    prefixes = []
    for d in range(n_ds):
        docs = data.draw(st.lists(token_docs(gpt.eod), min_size=1, max_size=25))
        # At least one document with text, so the database is not empty.
        docs.append([1212, 318, 257, 1332, 13, gpt.eod])  # "This is a test."
        prefix = str(tmp / f"ds{d}")
        write_indexed_dataset(prefix, [np.asarray(x, np.uint16) for x in docs], np.uint16)
        prefixes.append(prefix)
    weights = [data.draw(st.floats(0.1, 5.0)) for _ in prefixes]
    block = data.draw(st.integers(1, 12))
    config = db_config(prefixes, weights, block_size=block, chunk_length=16, split="1,0,0")
    run_build(tmp / "w", config, SYNC, "db-build", log=lambda m: None)
    expected = brute_force_chunks(prefixes, config.chunk.split, 16, gpt.eod)
    np.testing.assert_array_equal(read_chunks(tmp / "w"), expected)
    infos = __import__("json").loads((tmp / "w" / "db" / "infos.json").read_text())
    assert sum(i["n_chunks_train"] for i in infos) == len(expected)
    sampled = zarr.open_array(str(tmp / "w" / "db" / "sampled.zarr"), mode="r")[:]
    assert np.all(np.diff(sampled) > 0) and np.all(sampled < len(expected))
    assert sum(i["n_chunks_sampled"] for i in infos) == len(sampled)


def test_invalid_chunks_are_counted(tmp_path, gpt):
    docs = [[1212, 318, 257, 1332, 13] + [SPACE] * 16 + [gpt.eod], [SPACE, NEWLINE, gpt.eod]]
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, [np.asarray(x, np.uint16) for x in docs], np.uint16)
    run_build(tmp_path / "w", db_config([prefix], chunk_length=8, split="1,0,0"), SYNC, "db-build", log=lambda m: None)
    info = __import__("json").loads((tmp_path / "w" / "db" / "infos.json").read_text())[0]
    # doc 0: 21 tokens -> chunks of 8,8,5: the 2nd and 3rd are only spaces; doc 1: one blank chunk.
    assert info["n_chunks"] == 4 and info["n_chunks_train"] == 1 and info["n_chunks_invalid"] == 3


def test_same_bytes_from_every_scheduler(tmp_path, small_corpus_prefix, second_corpus_prefix):
    config = db_config([small_corpus_prefix, second_corpus_prefix], [0.7, 0.3], block_size=128)
    outputs = {}
    for name, options in [
        ("sync", SYNC),
        ("local1", RunOptions(n_workers=1, progress=False, dashboard_address="127.0.0.1:0")),
        ("local2", RunOptions(n_workers=2, progress=False, dashboard_address="127.0.0.1:0")),
    ]:
        run_build(tmp_path / name, config, options, "db-build", log=lambda m: None)
        outputs[name] = tree_bytes(tmp_path / name, include=("db",))
    assert outputs["sync"].keys() == outputs["local1"].keys() == outputs["local2"].keys()
    assert outputs["sync"] == outputs["local1"] == outputs["local2"]


def test_sample_is_split_by_blend_ratio(tmp_path, small_corpus_prefix, second_corpus_prefix):
    config = db_config([small_corpus_prefix, second_corpus_prefix], [3.0, 1.0])
    config = BuildConfig(config.chunk, config.embed, IndexConfig(index_str="IVF4,Flat", ntrain=400), config.query)
    run_build(tmp_path / "w", config, SYNC, "db-build", log=lambda m: None)
    infos = __import__("json").loads((tmp_path / "w" / "db" / "infos.json").read_text())
    assert [i["n_chunks_sampled"] for i in infos] == [300, 100]


def test_rerun_skips_finished_blocks(tmp_path, small_corpus_prefix):
    config = db_config([small_corpus_prefix], block_size=128)
    run_build(tmp_path / "w", config, SYNC, "db-build", log=lambda m: None)
    before = tree_bytes(tmp_path / "w")
    messages = []
    run_build(tmp_path / "w", config, SYNC, "db-build", log=messages.append)
    assert any("already done: skipped" in m for m in messages)
    assert tree_bytes(tmp_path / "w") == before


def test_stage_arrays_are_lazy_arrays_whose_rows_are_the_stored_rows(tmp_path, small_corpus_prefix,
                                                                      second_corpus_prefix, monkeypatch):
    """The length pass and the compaction are Dask arrays (a Dask chunk may span several Zarr chunks);
    computed, they are candidates.zarr and chunks.zarr row for row. The boundaries alone come from the
    .idx sizes: planning them reads no token."""
    import dask.array as da

    from retro_dask.engine.executor import Executor
    from retro_dask.formats import zarr_blocks
    from retro_dask.formats.indexed_dataset import IndexedDataset, open_dataset
    from retro_dask.formats.workdir import candidates_path, chunks_path
    from retro_dask.plan.chunks import candidate_block
    from retro_dask.stages.db import candidate_counts, chunks_job, db_jobs
    from retro_dask.stages.db_candidates import candidate_job, candidates

    config = db_config([small_corpus_prefix, second_corpus_prefix], block_size=100)
    w = tmp_path / "w"
    run_build(w, config, SYNC, "db-build", log=lambda m: None)
    ex = Executor(str(w), None, progress=False, log=lambda m: None)
    facts, plan, job = db_jobs(ex, config)
    stored = zarr.open_array(str(candidates_path(w)), mode="r")[:]
    # Irregular Dask chunks of 1, 2 and the remaining candidate blocks.
    b = plan.block_size
    assert plan.n_blocks >= 4
    chunks = (b, 2 * b, plan.n_candidates - 3 * b)
    lazy = candidates(candidate_job(config, facts), plan, 0, plan.n_candidates, chunks)
    assert isinstance(lazy, da.Array) and lazy.chunks[0] == chunks
    np.testing.assert_array_equal(lazy.compute(scheduler="synchronous"), stored)
    chunk_job = chunks_job(ex, config, candidate_counts(ex, plan.n_candidates, len(facts)))
    stored_chunks = zarr.open_array(str(chunks_path(w)), mode="r")[:]
    for blocks in ([0], [1, 2, 3], list(range(4, chunk_job.target.n_blocks))):
        lo, hi = chunk_job.rows(blocks)
        np.testing.assert_array_equal(chunk_job.expression(lo, hi).compute(scheduler="synchronous"),
                                      stored_chunks[lo:hi])
    np.testing.assert_array_equal(zarr_blocks.lazy_rows(chunks_path(w), 0, len(stored_chunks)).compute(), stored_chunks)

    def no_tokens(*args, **kwargs):
        raise AssertionError("a token was read")

    monkeypatch.setattr(IndexedDataset, "get", no_tokens)
    monkeypatch.setattr(IndexedDataset, "__getitem__", no_tokens)
    sizes_of = [open_dataset(f.prefix).sizes for f in facts]
    boundaries = np.concatenate([candidate_block(sizes_of, [f.train for f in facts], plan.starts[k],
                                                 min(b, plan.n_candidates - k * b), 64) for k in range(plan.n_blocks)])
    # Same chunks as db-build's candidates; their ends differ only where a trailing EOD was trimmed.
    np.testing.assert_array_equal(boundaries[:, :3], stored[:, :3])
    trimmed = boundaries[:, 3] != stored[:, 3]
    assert np.all(boundaries[trimmed, 3] == stored[trimmed, 3] + 1)


def test_spans_are_runs_of_consecutive_missing_blocks():
    """Short block tasks run several to a Dask task; a span never crosses a finished block, and spans
    shrink to single blocks at the end."""
    from retro_dask.plan.blocks import spans

    for blocks, threads in [(list(range(334)), 2), (list(range(21)), 2), ([0, 3, 4, 9, 10, 11], 1), ([], 4),
                            (list(range(5000)), 16), ([1, 2, 5, 6, 7, 8, 20], 1)]:
        out = spans(blocks, threads, 16)
        assert [b for s in out for b in s] == blocks
        assert all(1 <= len(s) <= 16 and s == list(range(s[0], s[0] + len(s))) for s in out)
        if blocks:
            assert len(out[-1]) == 1
    assert len(spans(list(range(334)), 2, 16)) < 334 / 8


def test_progress_counts_blocks_not_tasks(tmp_path, small_corpus_prefix, capsys):
    """With several blocks per task the bar still starts at the skipped blocks and ends at the total."""
    import re

    config = db_config([small_corpus_prefix], block_size=64)
    run_build(tmp_path / "w", config, RunOptions(n_workers=2, progress=True, dashboard_address="127.0.0.1:0"),
              "db-build", log=lambda m: None)
    err = capsys.readouterr().err
    counts = [(int(a), int(b)) for a, b in re.findall(r"BERT lengths:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)]
    assert counts and all(done <= total for done, total in counts), counts[:5]
    assert counts[0][0] < counts[-1][0] == counts[-1][1]
    assert not re.search(r"BERT lengths: \d+block", err)  # tqdm's form once the count passes the total


def test_peak_rss_is_the_process_own(tmp_path):
    """A process started by a large one reports its own peak, not its parent's (ru_maxrss carries it over exec)."""
    import subprocess
    import sys

    code = ("import json, sys\nimport numpy as np\nfrom retro_dask.engine.process_env import peak_rss_mb\n"
            "if sys.argv[1] == 'parent':\n"
            "    held = np.ones(300 * 2**20 // 8)  # 300 MiB, touched\n"
            "    out = __import__('subprocess').run([sys.executable, '-c', sys.argv[2], 'child', ''],\n"
            "                                       capture_output=True, text=True, check=True).stdout\n"
            "    print(json.dumps({'parent': peak_rss_mb(), 'child': json.loads(out)['own']}))\n"
            "else:\n"
            "    print(json.dumps({'own': peak_rss_mb()}))\n")
    out = subprocess.run([sys.executable, "-c", code, "parent", code], capture_output=True, text=True, check=True)
    peaks = __import__("json").loads(out.stdout)
    assert peaks["parent"] > 300
    assert peaks["child"] < 150, peaks
