"""Exact BERT WordPiece lengths without running the tokenizer on every text.

db-build needs only the number of wordpieces of each chunk, and running
``tokenizers`` on a chunk (~90-150 us: normalizer, pre-tokenizer and WordPiece,
with alignment bookkeeping for offsets nothing here reads) was nine tenths of
the stage. For a BERT pipeline (``BertNormalizer``, ``BertPreTokenizer``,
``WordPiece``) every step is local:

* the normalizer maps each character on its own (removes control characters,
  maps whitespace to a space, spaces out CJK ideographs, decomposes and strips
  accents, lowercases character by character: "ΟΔΟΣ" becomes "οδοσ", with no
  final sigma), except for the canonical reordering of combining marks;
* the pre-tokenizer splits at whitespace and isolates each punctuation
  character;
* WordPiece encodes each word independently.

So the length of a text is the sum, over its whitespace-separated runs of
normalized text, of each run's number of wordpieces. :class:`WordPieceCounter`
maps characters through a table that it fills by asking the tokenizer's own
normalizer and pre-tokenizer about each new character (nothing here restates
Unicode rules), splits with ``str.split``, and counts each distinct run once
with the tokenizer's own pre-tokenizer and WordPiece model. A text it cannot
map with certainty goes to the tokenizer itself: one with a combining mark that
NFD may reorder and accent stripping keeps, an unassigned code point or a
surrogate, or an added token such as ``[SEP]`` in the text. On the sample
corpus that is 20 of 20,750 chunks; the others take ~10 us each once their
runs are cached (~20 us on an empty cache) against ~92 us in ``tokenizers``.

Tests compare it with the tokenizer on hypothesis-generated text and the whole
sample corpus (tests/test_tokenizer.py).
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from typing import Callable, Sequence

import numpy as np

# Marks a character the table cannot map exactly: any text holding it goes to the tokenizer.
_UNSURE = "\x00"

#: Memory bounds of the per-process caches (entries; ~100 bytes each): past its bound a cache
#: keeps only the first half of it (see ``_shrink``).
MAX_WORDS = 1 << 17
MAX_CHARS = 1 << 16


def _shrink(cache: dict, bound: int) -> None:
    """Keep the ``bound // 2`` entries of ``cache`` inserted first.

    Frequent words and characters are met early, so the entries inserted first
    are the ones worth keeping; emptying the cache would make every worker
    look them all up again.
    """
    for key in list(itertools.islice(reversed(cache), max(0, len(cache) - bound // 2))):
        del cache[key]


class _CharTable(dict):
    """Code point -> its normalized text, with the pre-tokenizer's whitespace as one space.

    ASCII maps to single characters or nothing, which keeps ``str.translate`` on
    its fast path for ASCII text (1 us for a 300-character chunk).
    """

    def __init__(self, normalize: Callable[[str], str], pre_tokenize: Callable[[str], list]):
        super().__init__()
        self._normalize = normalize
        self._pre_tokenize = pre_tokenize

    def _split_part(self, ch: str) -> str:
        if not self._pre_tokenize(ch):
            return " "  # whitespace to the pre-tokenizer
        # A character Python splits at but the pre-tokenizer does not: str.split cannot stand in for it.
        return _UNSURE if ch.isspace() else ch

    def __missing__(self, code: int) -> str | None:
        ch = chr(code)
        category = unicodedata.category(ch)
        # NFD may reorder a run of combining marks; accent stripping deletes those of category Mn, so only
        # the others (25 code points, e.g. U+302E) could come out in another order than character by character.
        if (unicodedata.combining(ch) and category != "Mn") or category in ("Cn", "Cs"):
            mapped = _UNSURE
        else:
            mapped = "".join(self._split_part(c) for c in self._normalize(ch)) or None
        if len(self) >= MAX_CHARS:
            _shrink(self, MAX_CHARS)
        self[code] = mapped
        return mapped


class _WordCounts(dict):
    """A run of normalized text without whitespace -> its number of wordpieces.

    A run is one word or several ("end.", "(see"): the pre-tokenizer splits it
    at punctuation and WordPiece encodes each word, both the tokenizer's own.
    """

    def __init__(self, pre_tokenize: Callable[[str], list], model):
        super().__init__()
        self._pre_tokenize = pre_tokenize
        self._model = model

    def __missing__(self, run: str) -> int:
        n = sum(len(self._model.tokenize(word)) for word, _ in self._pre_tokenize(run))
        self[run] = n
        return n


class WordPieceCounter:
    """WordPiece lengths of texts (no [CLS]/[SEP], no truncation), equal to ``len(tokenizer.encode(text))``."""

    def __init__(self, tokenizer, encode_lengths: Callable[[list[str]], Sequence[int]]):
        """``encode_lengths(texts)`` gives the lengths the slow way, for texts the table cannot map."""
        pre_tokenize = tokenizer.pre_tokenizer.pre_tokenize_str
        self._table = _CharTable(tokenizer.normalizer.normalize_str, pre_tokenize)
        self._counts = _WordCounts(pre_tokenize, tokenizer.model)
        self._encode_lengths = encode_lengths
        self._added = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values())
        self._added_first = frozenset(t[0] for t in self._added if t)

    @classmethod
    def for_tokenizer(cls, tokenizer,
                      encode_lengths: Callable[[list[str]], Sequence[int]]) -> "WordPieceCounter | None":
        """A counter for a ``tokenizers.Tokenizer`` whose steps are all local (see the module doc), else None."""
        config = json.loads(tokenizer.to_str())
        kinds = [(config.get(step) or {}).get("type") for step in ("normalizer", "pre_tokenizer", "model")]
        if kinds != ["BertNormalizer", "BertPreTokenizer", "WordPiece"]:
            return None
        # An added token matched after normalization could span characters the table maps one by one.
        if any(t.get("normalized") for t in config.get("added_tokens") or ()):
            return None
        return cls(tokenizer, encode_lengths)

    def _has_added_token(self, text: str) -> bool:
        return any(c in text for c in self._added_first) and any(t in text for t in self._added)

    def lengths(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.int64)
        table, count = self._table, self._counts.__getitem__
        slow: list[int] = []
        for i, text in enumerate(texts):
            mapped = text.translate(table)
            if _UNSURE in mapped or self._has_added_token(text):
                slow.append(i)
            else:
                out[i] = sum(map(count, mapped.split()))
        if slow:
            out[slow] = self._encode_lengths([texts[i] for i in slow])
        if len(self._counts) > MAX_WORDS:
            _shrink(self._counts, MAX_WORDS)
        return out
