"""Tests for retro_dask.indexed_dataset: the Megatron .bin/.idx reader and writer.

Reference files are built byte by byte with ``struct`` from the documented
layout, independently of the code under test, so a bug shared by the reader
and the writer cannot hide behind a round trip.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retro_dask.errors import InputError
from retro_dask.formats.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    best_token_dtype,
    data_path,
    dtype_code,
    exists,
    index_path,
)
from retro_dask.formats.indexed_writer import IndexedDatasetWriter, write_indexed_dataset

MAGIC = b"MMIDIDX\x00\x00"
# Format characters for each dtype code, written out here rather than taken
# from the module so the reference files do not depend on it.
STRUCT_CHAR = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "d", 7: "f", 8: "H"}
NUMPY_NAME = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32",
    5: "int64", 6: "float64", 7: "float32", 8: "uint16",
}


def raw_idx(sizes, code, doc_indices=None, *, magic=MAGIC, version=1,
            n=None, d=None, pointers=None, itemsize=None):
    """An .idx built with struct; keyword overrides produce corrupt files."""
    itemsize = itemsize or struct.calcsize("<" + STRUCT_CHAR[code])
    if doc_indices is None:
        doc_indices = list(range(len(sizes) + 1))
    if pointers is None:
        pointers, at = [], 0
        for size in sizes:
            pointers.append(at)
            at += size * itemsize
    n = len(sizes) if n is None else n
    d = len(doc_indices) if d is None else d
    return (
        magic
        + struct.pack("<Q", version)
        + struct.pack("<B", code)
        + struct.pack("<Q", n)
        + struct.pack("<Q", d)
        + struct.pack(f"<{len(sizes)}i", *sizes)
        + struct.pack(f"<{len(pointers)}q", *pointers)
        + struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    )


def raw_bin(docs, code):
    char = STRUCT_CHAR[code]
    return b"".join(struct.pack(f"<{len(doc)}{char}", *doc) for doc in docs)


def write_raw(prefix, docs, code, **idx_overrides):
    with open(f"{prefix}.bin", "wb") as f:
        f.write(raw_bin(docs, code))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(raw_idx([len(doc) for doc in docs], code, **idx_overrides))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def same_files(a, b):
    return (read_bytes(f"{a}.bin") == read_bytes(f"{b}.bin")
            and read_bytes(f"{a}.idx") == read_bytes(f"{b}.idx"))


# Each case holds the dtype's extremes and an empty document, so range
# handling, sign handling and zero-length pointers are all exercised.
DTYPE_CASES = [
    # 1 uint8: byte-level data; 255 is the top of the range.
    pytest.param(1, [[0, 255, 7], [], [128]], id="1-uint8"),
    # 2 int8: signed bytes; -128 checks two's complement.
    pytest.param(2, [[-128, 127], [], [0, -1, 1]], id="2-int8"),
    # 3 int16: small signed vocabularies.
    pytest.param(3, [[-32768, 32767, 5], [], [1]], id="3-int16"),
    # 4 int32: Megatron's token dtype for vocabularies of 65,500 and more.
    pytest.param(4, [[2**31 - 1, -(2**31), 65535, 65536], [], [100_000]], id="4-int32"),
    # 5 int64: largest integer type in the format.
    pytest.param(5, [[2**63 - 1, -(2**63)], [], [2**40]], id="5-int64"),
    # 6 float64: float data (not tokens); values exactly representable.
    pytest.param(6, [[0.5, -1.25, 1e300], [], [3.0]], id="6-float64"),
    # 7 float32: values exactly representable in float32.
    pytest.param(7, [[0.5, -1.25, 65504.0], [], [3.0]], id="7-float32"),
    # 8 uint16: Megatron's token dtype for vocabularies under 65,500.
    pytest.param(8, [[0, 65535, 50256], [], [1, 2, 3, 4]], id="8-uint16"),
]


@pytest.mark.parametrize("code, docs", DTYPE_CASES)
def test_struct_written_pair_reads_and_writer_matches_bytes(tmp_path, code, docs):
    ref = tmp_path / "ref"
    write_raw(ref, docs, code)

    ds = IndexedDataset(ref)
    assert ds.prefix == str(ref)
    assert ds.dtype == np.dtype(NUMPY_NAME[code]) == DTYPE_CODES[code]
    assert dtype_code(ds.dtype) == code
    assert len(ds) == len(docs)
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.pointers.dtype == np.int64
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.n_tokens == sum(len(d) for d in docs) and type(ds.n_tokens) is int
    for i, doc in enumerate(docs):
        assert ds[i].dtype == ds.dtype
        assert ds[i].tolist() == doc
        assert ds[i - len(docs)].tolist() == doc
    assert [seq.tolist() for seq in ds] == docs

    ours = tmp_path / "ours"
    write_indexed_dataset(ours, docs, DTYPE_CODES[code])
    assert same_files(ref, ours)


def test_arrays_are_views_of_the_maps(tmp_path):
    write_raw(tmp_path / "d", [[1, 2, 3], [4]], 8)
    ds = IndexedDataset(tmp_path / "d")
    for arr in (ds.sizes, ds.pointers, ds.document_indices, ds[0]):
        assert not arr.flags.owndata
        assert not arr.flags.writeable
    assert np.shares_memory(ds.sizes, ds._idx_map)
    assert np.shares_memory(ds[1], ds._bin_map)


def test_multi_sequence_documents_are_read(tmp_path):
    # Megatron datasets split into sentences have several sequences per
    # document; the reader must accept them even though RETRO writes one.
    write_raw(tmp_path / "d", [[1], [2, 3], [4], [5]], 8, doc_indices=[0, 2, 2, 4])
    ds = IndexedDataset(tmp_path / "d")
    assert ds.document_indices.tolist() == [0, 2, 2, 4]
    assert ds[3].tolist() == [5]


def test_helpers(tmp_path):
    assert best_token_dtype(50257) == np.uint16
    assert best_token_dtype(65499) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(250_000) == np.int32
    with pytest.raises(InputError, match="vocabulary size 0"):
        best_token_dtype(0)
    assert index_path("a/b") == "a/b.idx" and data_path("a/b") == "a/b.bin"
    assert index_path(tmp_path / "x") == str(tmp_path / "x") + ".idx"
    assert dtype_code(">u2") == 8 and dtype_code(np.float32) == 7
    with pytest.raises(InputError, match="float16"):
        dtype_code(np.float16)
    assert not exists(tmp_path / "d")
    write_indexed_dataset(tmp_path / "d", [[1]], np.uint16)
    assert exists(tmp_path / "d")
    os.remove(tmp_path / "d.idx")
    assert not exists(tmp_path / "d")


# -- round trips ----------------------------------------------------------------

@st.composite
def datasets(draw):
    """A dtype code and up to 8 documents of that dtype (empty ones included)."""
    code = draw(st.sampled_from(sorted(NUMPY_NAME)))
    dtype = np.dtype(NUMPY_NAME[code])
    docs = draw(st.lists(hnp.arrays(dtype, st.integers(0, 12)), max_size=8))
    return code, docs


@settings(max_examples=60, deadline=None)
@given(data=datasets(), pick=st.data())
def test_round_trip_and_get(data, pick):
    code, docs = data
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "d")
        write_indexed_dataset(prefix, docs, DTYPE_CODES[code])
        ds = IndexedDataset(prefix)
        assert ds.dtype == DTYPE_CODES[code] and len(ds) == len(docs)
        assert ds.sizes.tolist() == [len(d) for d in docs]
        # Compare bytes so NaN payloads and -0.0 count too.
        assert [ds[i].tobytes() for i in range(len(ds))] == [d.tobytes() for d in docs]
        if docs:
            i = pick.draw(st.integers(-len(docs), len(docs) - 1))
            size = len(docs[i])
            offset = pick.draw(st.integers(0, size))
            length = pick.draw(st.integers(0, size - offset))
            got = ds.get(i, offset, length)
            assert got.tobytes() == ds[i][offset : offset + length].tobytes()
            assert ds.get(i, offset).tobytes() == ds[i][offset:].tobytes()


def test_get_bounds(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[1, 2, 3], []], np.uint16)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.get(0, 3, 0).tolist() == [] and ds.get(1).tolist() == []
    with pytest.raises(IndexError, match="sequence 0 .* which has 3 tokens"):
        ds.get(0, 2, 2)
    with pytest.raises(IndexError, match="offset=-1"):
        ds.get(0, -1, 1)
    with pytest.raises(IndexError, match="offset=4"):
        ds.get(0, 4)
    with pytest.raises(IndexError, match="has 2 sequences"):
        ds[2]
    with pytest.raises(IndexError, match="has 2 sequences"):
        ds[-3]
    with pytest.raises(TypeError):
        ds["0"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.lists(st.integers(0, 2**16 - 1), max_size=6), max_size=12),
    cuts=st.lists(st.integers(0, 12), max_size=3),
)
def test_add_index_equals_writing_everything(docs, cuts):
    bounds = [0] + sorted(min(c, len(docs)) for c in cuts) + [len(docs)]
    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "whole")
        write_indexed_dataset(whole, docs, np.uint16)
        with IndexedDatasetWriter(os.path.join(tmp, "joined"), np.uint16) as writer:
            for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                part = os.path.join(tmp, f"part{k}")
                write_indexed_dataset(part, docs[lo:hi], np.uint16)
                writer.add_index(part)
        assert same_files(whole, os.path.join(tmp, "joined"))


def test_add_index_mixed_with_documents_and_keeps_document_boundaries(tmp_path):
    write_raw(tmp_path / "multi", [[1], [2, 3], [4]], 8, doc_indices=[0, 2, 3])
    with IndexedDatasetWriter(tmp_path / "out", np.uint16) as writer:
        writer.add_document([9, 9])
        writer.add_index(tmp_path / "multi")
        writer.add_document([])
    ds = IndexedDataset(tmp_path / "out")
    assert [s.tolist() for s in ds] == [[9, 9], [1], [2, 3], [4], []]
    assert ds.document_indices.tolist() == [0, 1, 3, 4, 5]


def test_add_index_rejects_other_dtype(tmp_path):
    write_indexed_dataset(tmp_path / "part", [[1]], np.int32)
    with IndexedDatasetWriter(tmp_path / "out", np.uint16) as writer:
        with pytest.raises(InputError, match=r"part\.bin.*int32.*uint16"):
            writer.add_index(tmp_path / "part")
        writer.add_document([5])
    # The rejected part added nothing; the writer stays usable.
    assert [s.tolist() for s in IndexedDataset(tmp_path / "out")] == [[5]]


# -- bad inputs -------------------------------------------------------------------

def open_error(prefix):
    with pytest.raises(InputError) as info:
        IndexedDataset(prefix)
    return str(info.value)


def test_missing_bin(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[1]], np.uint16)
    os.remove(tmp_path / "d.bin")
    msg = open_error(tmp_path / "d")
    assert f"{tmp_path / 'd.bin'} is missing" in msg
    assert f"found {tmp_path / 'd.idx'}" in msg
    assert "PREFIX.bin and PREFIX.idx" in msg and "without extension" in msg


def test_missing_idx(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[1]], np.uint16)
    os.remove(tmp_path / "d.idx")
    msg = open_error(tmp_path / "d")
    assert f"{tmp_path / 'd.idx'} is missing" in msg
    assert f"found {tmp_path / 'd.bin'}" in msg


def test_missing_both_and_prefix_with_extension(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[1]], np.uint16)
    msg = open_error(str(tmp_path / "d.bin"))
    assert "d.bin.bin and " in msg and "d.bin.idx are missing" in msg
    assert "ends in '.bin'" in msg and repr(str(tmp_path / "d")) in msg
    assert "ends in '.idx'" in open_error(str(tmp_path / "d.idx"))


def test_wrong_magic(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8, magic=b"NOTMAGIC!")
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg
    assert "b'NOTMAGIC!'" in msg and "magic" in msg


def test_unknown_version(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8, version=2)
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg and "unknown index version 2" in msg


@pytest.mark.parametrize("code", [0, 9, 255])
def test_unknown_dtype_code(tmp_path, code):
    write_raw(tmp_path / "d", [[1]], 8)
    raw = bytearray(read_bytes(tmp_path / "d.idx"))
    raw[17] = code  # the dtype byte follows the 9-byte magic and 8-byte version
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg and f"unknown dtype code {code}" in msg


def test_idx_shorter_than_header_says(tmp_path):
    write_raw(tmp_path / "d", [[1, 2], [3]], 8)
    raw = read_bytes(tmp_path / "d.idx")
    (tmp_path / "d.idx").write_bytes(raw[:-3])
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg and "truncated" in msg
    assert f"need {len(raw)} bytes" in msg and f"is {len(raw) - 3} bytes" in msg


def test_idx_shorter_than_fixed_header(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8)
    (tmp_path / "d.idx").write_bytes(read_bytes(tmp_path / "d.idx")[:20])
    msg = open_error(tmp_path / "d")
    assert "20 bytes" in msg and "34-byte header" in msg


def test_empty_idx_is_truncated_not_foreign(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8)
    (tmp_path / "d.idx").write_bytes(MAGIC[:4])
    msg = open_error(tmp_path / "d")
    assert "is 4 bytes" in msg and "truncated" in msg and "magic" not in msg


def test_idx_header_claims_more_sequences(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8, n=1000)
    msg = open_error(tmp_path / "d")
    assert "1000 sequences" in msg and "truncated" in msg


def test_bin_shorter_than_index_says(tmp_path):
    write_raw(tmp_path / "d", [[1, 2, 3], [4]], 8)
    (tmp_path / "d.bin").write_bytes(read_bytes(tmp_path / "d.bin")[:5])
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.bin") in msg
    assert "5 bytes, shorter than the 8 bytes" in msg


def test_bin_longer_than_index_says(tmp_path):
    write_raw(tmp_path / "d", [[1]], 8)
    (tmp_path / "d.bin").write_bytes(b"\0" * 6)
    assert "6 bytes, longer than the 2 bytes" in open_error(tmp_path / "d")


def test_pointers_inconsistent_with_sizes(tmp_path):
    write_raw(tmp_path / "d", [[1, 2], [3]], 8, pointers=[0, 2])
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg
    assert "pointers are inconsistent with sizes" in msg
    assert "sequence 1 points at byte 2" in msg and "byte 4" in msg


def test_negative_size(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(raw_idx([-1], 8, pointers=[0]))
    assert "negative length -1" in open_error(tmp_path / "d")


@pytest.mark.parametrize(
    "doc_indices, problem",
    [
        ([1, 2], "start at 1, not 0"),
        ([0, 2, 1, 2], "decrease: index 2 is 1 after 2"),
        ([0, 1], "end at 1, but there are 2 sequences"),
        ([], "document count is 0"),
    ],
)
def test_bad_document_indices(tmp_path, doc_indices, problem):
    write_raw(tmp_path / "d", [[1], [2]], 8, doc_indices=doc_indices)
    msg = open_error(tmp_path / "d")
    assert str(tmp_path / "d.idx") in msg and problem in msg
    assert "retro-dask preprocess" in msg


def test_token_out_of_range_names_value_and_dtype(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document([1, 2])
        with pytest.raises(InputError) as info:
            writer.add_document([5, 70000])
        msg = str(info.value)
        assert "70000" in msg and "uint16" in msg and "position 1" in msg
        assert "document 1" in msg and str(tmp_path / "d.bin") in msg
        with pytest.raises(InputError, match="-1 at position 0 does not fit"):
            writer.add_document([-1])
        with pytest.raises(InputError, match=r"2\*\*70|1180591620717411303424"):
            writer.add_document([2**70])
        with pytest.raises(InputError, match="not integers"):
            writer.add_document([1.5])
        with pytest.raises(InputError, match="1-D"):
            writer.add_document([[1]])
    # Rejected documents wrote nothing.
    assert [s.tolist() for s in IndexedDataset(tmp_path / "d")] == [[1, 2]]


def test_writer_rejects_prefix_with_extension_and_unknown_dtype(tmp_path):
    with pytest.raises(InputError, match="ends in '.idx'"):
        IndexedDatasetWriter(tmp_path / "d.idx", np.uint16)
    with pytest.raises(InputError, match="float16"):
        IndexedDatasetWriter(tmp_path / "d", np.float16)
    assert os.listdir(tmp_path) == []


def test_failed_writer_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    with pytest.raises(InputError):
        write_indexed_dataset(tmp_path / "d", [[1], [70000]], np.uint16)
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_the_old_dataset(tmp_path):
    write_indexed_dataset(tmp_path / "d", [[1, 2]], np.uint16)
    before = read_bytes(tmp_path / "d.bin"), read_bytes(tmp_path / "d.idx")
    with pytest.raises(InputError):
        write_indexed_dataset(tmp_path / "d", [[3], [-5]], np.uint16)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert (read_bytes(tmp_path / "d.bin"), read_bytes(tmp_path / "d.idx")) == before


def test_writer_abort_and_use_after_finalize(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "d", np.int32)
    writer.add_document([1])
    writer.abort()
    writer.abort()
    assert os.listdir(tmp_path) == []

    writer = IndexedDatasetWriter(tmp_path / "d", np.int32)
    writer.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        writer.add_document([1])
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 0 and ds.n_tokens == 0 and ds.document_indices.tolist() == [0]


# -- pickling ---------------------------------------------------------------------

def test_pickle_round_trip(tmp_path):
    docs = [list(range(1000)), [], [7]]
    write_indexed_dataset(tmp_path / "d", docs, np.uint16)
    ds = IndexedDataset(tmp_path / "d")
    payload = pickle.dumps(ds)
    # Only the prefix travels, not the tokens or the index arrays.
    assert len(payload) < 300
    back = pickle.loads(payload)
    assert back.prefix == ds.prefix and back.dtype == ds.dtype
    assert back.n_tokens == ds.n_tokens == 1001
    assert [s.tolist() for s in back] == docs
    assert np.shares_memory(back.sizes, back._idx_map)


def _rss_file_kb() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def test_release_pages_unmaps_what_was_read_and_views_stay_valid(tmp_path):
    """Block tasks stream through the corpus: the pages they read must not stay in the worker's RSS."""
    if _rss_file_kb() is None:
        pytest.skip("needs /proc/self/status (Linux)")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=int(n), dtype=np.uint16) for n in rng.integers(1000, 3000, size=16_000)]
    write_indexed_dataset(tmp_path / "d", docs, np.uint16)  # ~64 MB of tokens
    ds = IndexedDataset(tmp_path / "d")
    before = _rss_file_kb()
    assert sum(int(ds[i][-1]) for i in range(len(ds))) == sum(int(d[-1]) for d in docs)  # touch every page
    touched = _rss_file_kb()
    view = ds[123]
    ds.release_pages()
    released = _rss_file_kb()
    assert touched - before > 40_000, (before, touched)
    assert released - before < 10_000, (before, touched, released)
    assert view.tobytes() == docs[123].tobytes()
    assert ds.get(5, 10, 20).tobytes() == docs[5][10:30].tobytes()


def test_index_pages_do_not_stay_in_the_process(tmp_path):
    """Opening, scanning sizes by windows and release_pages leave no .idx pages in the RSS (a driver planning a large corpus)."""
    if _rss_file_kb() is None:
        pytest.skip("needs /proc/self/status (Linux)")
    n = 1_000_000
    write_indexed_dataset(tmp_path / "d", (np.full(1, i % 50000, np.uint16) for i in range(n)), np.uint16)
    before = _rss_file_kb()
    ds = IndexedDataset(tmp_path / "d")  # ~20 MB of .idx: sizes, pointers, document indices
    checked = _rss_file_kb()  # the open checks every pointer, a window at a time
    assert int(ds.sizes.sum()) == n and int(ds.pointers.sum()) == n * (n - 1)
    touched = _rss_file_kb()
    ds.release_pages()
    released = _rss_file_kb()
    scanned = ds.scanned_sizes()
    assert len(scanned) == n and sum(int(scanned[a : a + 4096].sum()) for a in range(0, n, 4096)) == n
    after_scan = _rss_file_kb()
    assert checked - before < 3_000, (before, checked)
    assert touched - before > 10_000, (before, touched)
    assert released - before < 3_000, (before, touched, released)
    assert after_scan - before < 3_000, (before, after_scan)
    assert int(ds.sizes[-1]) == 1 and ds[n - 1].tolist() == [(n - 1) % 50000]
