"""db-build: chunks.zarr against a brute-force chunker written here."""

from __future__ import annotations

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retro_dask.build import run_build
from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, IndexConfig, QueryConfig, RunOptions
from retro_dask.indexed_dataset import IndexedDataset, write_indexed_dataset
from retro_dask.plan import split_document_ranges
from retro_dask.tokenizer import get_bert_tokenizer

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
    from retro_dask.tokenizer import get_gpt_tokenizer

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


def test_candidate_boundaries_are_a_lazy_array_that_reads_no_token(tmp_path, small_corpus_prefix, second_corpus_prefix,
                                                                   monkeypatch):
    import dask.array as da

    from retro_dask.db import lazy_candidate_boundaries
    from retro_dask.indexed_dataset import IndexedDataset

    config = db_config([small_corpus_prefix, second_corpus_prefix], block_size=100)
    run_build(tmp_path / "w", config, SYNC, "db-build", log=lambda m: None)
    stored = zarr.open_array(str(tmp_path / "w" / "db" / "candidates.zarr"), mode="r")[:]

    def no_tokens(*args, **kwargs):
        raise AssertionError("a token was read")

    monkeypatch.setattr(IndexedDataset, "get", no_tokens)
    monkeypatch.setattr(IndexedDataset, "__getitem__", no_tokens)
    lazy = lazy_candidate_boundaries(config)
    assert isinstance(lazy, da.Array) and lazy.chunks[0][0] == 100
    boundaries = lazy.compute(scheduler="synchronous")
    # Same chunks as db-build's candidates; their ends differ only where a trailing EOD was trimmed.
    np.testing.assert_array_equal(boundaries[:, :3], stored[:, :3])
    trimmed = boundaries[:, 3] != stored[:, 3]
    assert np.all(boundaries[trimmed, 3] == stored[trimmed, 3] + 1)


def test_guided_spans_cover_every_block_once_in_order():
    """Short block tasks run several to a Dask task on a cluster; spans shrink to single blocks at the end."""
    from retro_dask.runner import MAX_SPAN, guided_spans

    for blocks, threads in [(list(range(334)), 2), (list(range(21)), 2), ([0, 3, 4, 9, 10, 11], 1), ([], 4),
                            (list(range(5000)), 16)]:
        spans = guided_spans(blocks, threads)
        assert [b for s in spans for b in s] == blocks
        assert all(1 <= len(s) <= MAX_SPAN for s in spans)
        assert [len(s) for s in spans] == sorted((len(s) for s in spans), reverse=True)
        if blocks:
            assert len(spans[-1]) == 1
    assert len(guided_spans(list(range(334)), 2)) < 334 / 8


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


def test_reopened_arrays_follow_their_zarr_json(tmp_path):
    """A process reuses its opened arrays, but never one whose zarr.json was replaced or rewritten."""
    from retro_dask import arrays

    path = tmp_path / "a.zarr"
    arrays.create(path, (10, 2), np.int64, 4)
    assert arrays.open_read(path) is arrays.open_read(path)  # reused while unchanged
    assert arrays.open_read(path).shape == (10, 2)
    arrays.create(path, (20, 2), np.int64, 8)  # another layout: created anew
    assert arrays.open_read(path).shape == (20, 2) and arrays.open_read(path).chunks == (8, 2)
    arrays.create(path, (20, 2), np.int64, 8, attributes={"k": 1})  # same layout, new attributes
    assert arrays.open_read(path).attrs["k"] == 1
    arrays.write_block(str(tmp_path), "t", path, 1, np.ones((8, 2), np.int64))
    assert arrays.open_read(path)[8:16].tolist() == [[1, 1]] * 8


def test_block_files_are_the_bytes_zarr_writes(tmp_path):
    """write_block encodes chunk files itself: the same bytes as Zarr's own write, the edge chunk
    included; read_rows decodes them (and unwritten chunks as the fill value) as Zarr reads them."""
    from retro_dask import arrays

    rng = np.random.default_rng(0)
    for dtype, compressed in ((np.int64, True), (np.float32, False), (np.float16, False)):
        ours, theirs = tmp_path / f"ours-{dtype.__name__}.zarr", tmp_path / f"zarr-{dtype.__name__}.zarr"
        n, rows = 10, 4
        data = (rng.standard_normal((n, 3)) * 1000).astype(dtype)
        arrays.create(ours, (n, 3), dtype, rows, compressed=compressed, fill_value=7)
        reference = arrays.create(theirs, (n, 3), dtype, rows, compressed=compressed, fill_value=7)
        assert arrays.chunk_format(arrays.open_write(ours)) is not None
        for block in (0, 2):  # block 2 is the edge chunk (2 of 4 rows); block 1 stays unwritten
            lo, hi = block * rows, min(n, block * rows + rows)
            arrays.write_block(str(tmp_path), "t", ours, block, data[lo:hi])
            reference[lo:hi] = data[lo:hi]
            assert (ours / "c" / str(block) / "0").read_bytes() == (theirs / "c" / str(block) / "0").read_bytes()
        expected = zarr.open_array(str(theirs))[:]
        assert np.array_equal(zarr.open_array(str(ours))[:], expected)
        for lo, hi in ((0, n), (3, 9), (4, 8), (9, 10)):
            got = arrays.read_rows(ours, lo, hi)
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, expected[lo:hi])
            assert got.flags.writeable  # as Zarr's reads are


def test_peak_rss_is_the_process_own(tmp_path):
    """A process started by a large one reports its own peak, not its parent's (ru_maxrss carries it over exec)."""
    import subprocess
    import sys

    code = ("import json, sys\nimport numpy as np\nfrom retro_dask.runner import peak_rss_mb\n"
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
