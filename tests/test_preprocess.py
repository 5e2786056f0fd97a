"""preprocess: jsonl / sample corpus -> Megatron indexed dataset, on Dask.

The reference for every output is ``write_indexed_dataset`` of the GPT
tokenizer's ids (EOD appended, one sequence per document, uint16): outputs must
equal it byte for byte, however the input is cut into tasks and wherever the
tasks run. Bad input must fail with an InputError naming the file and the
problem, leaving nothing half-written and any previous output intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from retro_dask.config import RunOptions
from retro_dask.errors import InputError
from retro_dask.formats.indexed_dataset import IndexedDataset
from retro_dask.formats.indexed_writer import write_indexed_dataset
from retro_dask.stages.preprocess import (
    DEFAULT_RANGE_BYTES,
    MIN_AUTO_RANGE_BYTES,
    auto_range_bytes,
    preprocess,
    preprocess_main,
)
from retro_dask.formats.jsonl import line_aligned_ranges

# Texts that stress the tokenizer and the jsonl reader besides plain prose.
EDGE_TEXTS = [
    "Hello world",  # [15496, 995]
    "",  # an empty text is still a document: just the EOD token
    "line one\nline two\r\n\ttabbed",  # newlines inside the text are JSON escapes, not line ends
    "<|endoftext|> is ordinary text here",  # never the EOD id
    "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600",  # accents, CJK, an emoji outside the BMP
    "  leading and trailing spaces  ",
]


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def texts(sample_texts) -> list[str]:
    # 240 real documents (~25k tokens) plus the edge cases, interleaved.
    return EDGE_TEXTS[:3] + sample_texts[:120] + EDGE_TEXTS[3:] + sample_texts[120:240]


def reference(tmp_path: Path, texts, gpt) -> tuple[bytes, bytes]:
    """.bin/.idx bytes of write_indexed_dataset of the tokenizer's ids: the expected output."""
    prefix = tmp_path / "reference" / "ref"
    docs = [np.asarray(gpt.encode(t) + [gpt.eod], dtype=np.uint16) for t in texts]
    write_indexed_dataset(str(prefix), docs, np.uint16)
    return output_bytes(prefix)


def output_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def write_jsonl(path: Path, texts, *, ensure_ascii=True, newline="\n", blank_every=0, bom=False,
                trailing_newline=True, key="text") -> Path:
    lines = []
    for i, text in enumerate(texts):
        if blank_every and i % blank_every == 0:
            lines.append("   " if i % 2 else "")  # blank and whitespace-only lines are skipped
        lines.append(json.dumps({"id": i, key: text}, ensure_ascii=ensure_ascii))
    data = newline.join(lines) + (newline if trailing_newline else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))
    return path


def split(texts, n_files: int) -> list[list[str]]:
    size = -(-len(texts) // n_files)
    return [texts[i:i + size] for i in range(0, len(texts), size)]


# --------------------------------------------------------------------------
# Byte ranges
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, target",
    [
        (b"a\nbb\nccc\n", 1),  # every line its own range
        (b"a\nbb\nccc\n", 2),  # a cut that lands on a line start stays there
        (b"a\nbb\nccc", 4),  # no newline at the end
        (b"x" * 5000 + b"\n" + b"y\n" * 10, 10),  # a line longer than the target (and than no scan block)
        (b"z" * 3000, 100),  # one line, no newline at all: one range
        (b"\n\n\n{}\n", 1),  # blank lines
        (b"a\nb\n", 1 << 20),  # target larger than the file: one range
    ],
)
def test_line_aligned_ranges_cover_the_file_at_line_starts(tmp_path, content, target):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    ranges = line_aligned_ranges(str(path), target)
    assert ranges[0].start == 0 and ranges[-1].stop == len(content)
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start
    for r in ranges:
        assert r.stop > r.start
        assert r.start == 0 or content[r.start - 1:r.start] == b"\n"
        # A range ends after the line that crosses start + target, never before it.
        assert r.stop == len(content) or r.stop - r.start >= min(target, len(content))


@pytest.mark.parametrize(
    "total, threads, expected",
    [
        (5 << 20, 2, (5 << 20) // 8),  # the sample corpus as jsonl on 2 workers: 8 tasks
        (1000, 2, MIN_AUTO_RANGE_BYTES),  # tiny input: no smaller than the floor
        (10 << 30, 2, DEFAULT_RANGE_BYTES),  # huge input: capped, so a task's memory stays bounded
        (64 << 20, 1, 16 << 20),  # synchronous: four tasks
    ],
)
def test_auto_range_bytes(total, threads, expected):
    assert auto_range_bytes(total, threads) == expected


# --------------------------------------------------------------------------
# Round trip: same bytes as write_indexed_dataset, however the work is cut
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_files, range_bytes, layout",
    [
        (1, None, {}),  # one file, automatic ranges (one task in-process)
        (1, 4096, {}),  # one file, many line-aligned ranges
        (3, 1500, {}),  # several files, several ranges each, kept in input order
        (2, 1, {}),  # one task per line
        (1, 3000, {"blank_every": 5}),  # blank and whitespace-only lines are skipped
        (2, 2000, {"newline": "\r\n", "trailing_newline": False}),  # CRLF, no final newline
        (1, 2500, {"ensure_ascii": False}),  # raw UTF-8, not \u escapes
        (1, None, {"bom": True}),  # a UTF-8 byte-order mark before the first object
        (1, None, {"key": "content"}),  # another --json-keys
    ],
)
def test_jsonl_round_trip_matches_write_indexed_dataset(tmp_path, gpt, texts, n_files, range_bytes, layout):
    key = layout.get("key", "text")
    inputs = [str(write_jsonl(tmp_path / "in" / f"part{i}.jsonl", chunk, **layout))
              for i, chunk in enumerate(split(texts, n_files))]
    result = preprocess(str(tmp_path / "out" / "corpus"), inputs, json_key=key, client=None,
                        range_bytes=range_bytes, progress=False, log=quiet)
    assert output_bytes(tmp_path / "out" / "corpus") == reference(tmp_path, texts, gpt)
    assert result["n_docs"] == len(texts)
    assert result["n_tokens"] == sum(len(gpt.encode(t)) + 1 for t in texts)
    if range_bytes is not None:
        assert result["tasks"] > n_files
    ds = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert ds.dtype == np.uint16 and list(ds[0]) == [15496, 995, gpt.eod]
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]


@pytest.mark.parametrize(
    "line",
    [
        b'   {"text": "x"}',  # leading spaces
        b'{"text": "x"}   \t',  # trailing spaces and a tab
        b'{"text": "x"}\r',  # a CR left by CRLF line ends
        b'{"id": 1, "text": "x", "meta": {"text": "not this one"}}',  # other keys, nested objects
        b'{"text": "x", "text": "x"}',  # a duplicate key: JSON keeps the last
    ],
)
def test_tolerated_lines(tmp_path, gpt, line):
    path = tmp_path / "in.jsonl"
    path.write_bytes(line + b"\n" + b'{"text": "y"}\n')
    preprocess(str(tmp_path / "out" / "c"), [str(path)], client=None, progress=False, log=quiet)
    assert [list(d) for d in IndexedDataset(str(tmp_path / "out" / "c"))] == [
        gpt.encode("x") + [gpt.eod], gpt.encode("y") + [gpt.eod]]


@pytest.fixture(scope="module")
def cluster_client():
    """An embedded LocalCluster with 2 single-thread worker processes, started once for the module."""
    from retro_dask.engine.cluster import open_client

    options = RunOptions(n_workers=2, dashboard_address="127.0.0.1:0", progress=False)
    with open_client(options, ".", log=quiet) as client:
        yield client


def test_local_cluster_gives_the_same_bytes_as_synchronous(tmp_path, gpt, texts, cluster_client):
    inputs = [str(write_jsonl(tmp_path / "in" / f"part{i}.jsonl", chunk)) for i, chunk in enumerate(split(texts, 2))]
    from distributed import get_task_stream

    sync = preprocess(str(tmp_path / "sync" / "c"), inputs, client=None, range_bytes=None, progress=False, log=quiet)
    with get_task_stream(cluster_client) as stream:
        dist = preprocess(str(tmp_path / "dist" / "c"), inputs, client=cluster_client, range_bytes=4096,
                          progress=False, log=quiet)
    assert sync["tasks"] == 2 and dist["tasks"] > 20
    assert output_bytes(tmp_path / "dist" / "c") == output_bytes(tmp_path / "sync" / "c") == reference(
        tmp_path, texts, gpt)
    # Both workers took part: the tasks are spread, not run on one.
    assert len({task["worker"] for task in stream.data}) == 2


def test_sample_corpus(tmp_path, sample_corpus_prefix):
    result = preprocess(str(tmp_path / "wiki"), sample_corpus=True, client=None, progress=False, log=quiet)
    assert result["n_docs"] == 10033
    assert 1_000_000 < result["n_tokens"] < 1_080_000  # ~1.04M including the 10,033 EODs
    # conftest's sample_corpus_prefix is a direct encode of iter_sample_documents().
    assert output_bytes(tmp_path / "wiki") == output_bytes(Path(sample_corpus_prefix))


# --------------------------------------------------------------------------
# Bad input: a clear InputError, nothing half-written, previous output intact
# --------------------------------------------------------------------------

GOOD = [json.dumps({"text": f"document number {i}"}).encode() + b"\n" for i in range(40)]

# name -> (input file bytes or None for a missing file, json key, message fragments besides the file name)
BAD_INPUTS = {
    # line 31 is cut by a parenthesis that never closes; earlier tasks have written partials already
    "not json": (b"".join(GOOD[:30]) + b'{"text": "unterminated\n' + b"".join(GOOD[30:]), "text",
                 ["line 31", "not JSON", "unterminated"]),
    # two objects on one line
    "two objects on a line": (b"".join(GOOD[:5]) + b'{"text": "a"} {"text": "b"}\n', "text",
                              ["line 6", "not JSON", "Extra data"]),
    # the key is missing: the message lists the keys that are there
    "missing key": (b"".join(GOOD[:25]) + b'{"body": "x", "id": 7}\n' + b"".join(GOOD[25:]), "text",
                    ["line 26", "no key 'text'", "['body', 'id']", "--json-keys"]),
    # --json-keys names a key that no line has
    "wrong json key": (b"".join(GOOD), "content", ["line 1", "no key 'content'", "['text']"]),
    # the text is a number
    "not a string": (b"".join(GOOD[:35]) + b'{"text": 42}\n' + b"".join(GOOD[35:]), "text",
                     ["line 36", "number", "not a string"]),
    # null is not an empty text
    "null text": (b'{"text": null}\n', "text", ["line 1", "null", "not a string"]),
    # a JSON value that is not an object
    "not an object": (b"".join(GOOD[:3]) + b'["text", "a list"]\n', "text", ["line 4", "array", "not an object"]),
    # Latin-1 bytes in a file that must be UTF-8
    "not utf-8": (b"".join(GOOD[:38]) + '{"text": "café"}\n'.encode("latin-1"), "text",
                  ["line 39", "not UTF-8", "xe9"]),
    # an empty file
    "empty file": (b"", "text", ["empty"]),
    # only blank lines
    "blank lines only": (b"\n  \n\r\n\n", "text", ["only blank lines"]),
    # the file does not exist
    "missing file": (None, "text", ["no such file"]),
}


def write_bad(tmp_path: Path, name: str) -> tuple[str, str, list[str]]:
    content, key, fragments = BAD_INPUTS[name]
    path = tmp_path / "in" / "bad input.jsonl"  # a space in the name: named as is
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        path.write_bytes(content)
    return str(path), key, fragments


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, name):
    path, key, fragments = write_bad(tmp_path, name)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        # range_bytes=64: many tasks, so the bad line is not in the first one.
        preprocess(str(out / "corpus"), [path], json_key=key, client=None, range_bytes=64, progress=False, log=quiet)
    message = str(info.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message
    # Neither output nor .parts-* folder nor temporaries.
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("name", ["not json", "not utf-8", "blank lines only"])
def test_failed_run_keeps_the_previous_output(tmp_path, gpt, name):
    good = write_jsonl(tmp_path / "good.jsonl", ["the first, good run", "two documents"])
    prefix = tmp_path / "out" / "corpus"
    preprocess(str(prefix), [str(good)], client=None, progress=False, log=quiet)
    before = output_bytes(prefix)
    path, key, _ = write_bad(tmp_path, name)
    with pytest.raises(InputError):
        preprocess(str(prefix), [path], json_key=key, client=None, range_bytes=64, progress=False, log=quiet)
    assert output_bytes(prefix) == before
    assert sorted(os.listdir(prefix.parent)) == ["corpus.bin", "corpus.idx"]
    assert [list(d) for d in IndexedDataset(str(prefix))] == [gpt.encode("the first, good run") + [gpt.eod],
                                                              gpt.encode("two documents") + [gpt.eod]]


def test_failure_on_the_cluster_leaves_nothing_behind(tmp_path, cluster_client, sample_texts):
    # Tasks still run on the other worker when the first error arrives; they
    # must not write into (or re-create) the parts folder after cleanup.
    good = write_jsonl(tmp_path / "in" / "good.jsonl", sample_texts[:2000])
    prefix = tmp_path / "out" / "corpus"
    preprocess(str(prefix), [str(good)], client=cluster_client, progress=False, log=quiet)
    before = output_bytes(prefix)
    bad = tmp_path / "in" / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": oops}\n' + good.read_bytes())
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2: not JSON"):
        preprocess(str(prefix), [str(bad)], client=cluster_client, range_bytes=20_000, progress=False, log=quiet)
    assert sorted(os.listdir(prefix.parent)) == ["corpus.bin", "corpus.idx"]
    assert output_bytes(prefix) == before


@pytest.mark.parametrize(
    "prefix, fragments",
    [
        ("corpus.bin", ["without .bin", "corpus"]),  # a file name, not a prefix
        ("corpus.idx", ["without .idx"]),  # the same for .idx
        ("", ["is a folder"]),  # the output folder itself
    ],
)
def test_bad_output_prefix(tmp_path, prefix, fragments):
    good = write_jsonl(tmp_path / "in" / "good.jsonl", ["text"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as info:
        preprocess(str(out / prefix) + ("/" if not prefix else ""), [str(good)], client=None, progress=False,
                   log=quiet)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert os.listdir(out) == []


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("not json", ["line 31", "not JSON"]),  # a bad line: file and line named
        ("missing key", ["no key 'text'", "['body', 'id']"]),  # the keys found are listed
        ("not utf-8", ["not UTF-8"]),  # bad bytes
        ("empty file", ["empty"]),  # an empty input
        ("missing file", ["no such file"]),  # a missing input, refused before any cluster starts
        ("bin prefix", ["without .bin"]),  # --output-prefix x.bin
        ("two keys", ["give one key"]),  # --json-keys text title
    ],
)
def test_cli_errors(tmp_path, capsys, case, fragments):
    if case in BAD_INPUTS:
        path, _, _ = write_bad(tmp_path, case)
    else:
        path = str(write_jsonl(tmp_path / "in" / "good.jsonl", ["text"]))
    prefix = str(tmp_path / "out" / ("corpus.bin" if case == "bin prefix" else "corpus"))
    argv = ["--input", path, "--output-prefix", prefix, "--cluster", "synchronous", "--no-progress",
            "--range-mb", "0.0001"]
    if case == "two keys":
        argv += ["--json-keys", "text", "title"]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    if case in BAD_INPUTS:
        assert path in err
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []


def test_cli_round_trip_with_megatron_flags(tmp_path, gpt, texts, capsys):
    inputs = [str(write_jsonl(tmp_path / "in" / f"p{i}.jsonl", chunk)) for i, chunk in enumerate(split(texts, 2))]
    prefix = tmp_path / "out" / "corpus_text_document"
    rc = preprocess_main(["--input", *inputs, "--output-prefix", str(prefix), "--json-keys", "text",
                          "--tokenizer-type", "GPT2BPETokenizer", "--append-eod", "--cluster", "synchronous",
                          "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert output_bytes(prefix) == reference(tmp_path, texts, gpt)
