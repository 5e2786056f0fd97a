"""What both tokenizers share: spec path checks, argument checks, and loading Hugging Face files.

Nothing here downloads anything: Hugging Face files are read with
``tokenizers.Tokenizer.from_file``.
"""

from __future__ import annotations

import hashlib
import operator
import os
from typing import Iterable

import numpy as np

from retro_dask.errors import InputError

def _path_field(owner: str, name: str, value: object) -> str | None:
    """Return a spec path field as ``str`` (or None); reject anything else."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InputError(f"{owner}.{name} must be a path (str) or None, got {value!r}")
    if not value.strip():
        raise InputError(f"{owner}.{name} must not be an empty string")
    return value


def _existing_file(owner: str, name: str, path: str) -> str:
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(absolute):
        raise InputError(f"{owner}.{name}: no such file: {absolute}")
    return absolute


def _check_num_threads(num_threads: object) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise InputError(f"num_threads must be a positive integer, got {num_threads!r}")
    return int(num_threads)


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"expected a str to tokenize, got {type(text).__name__}: {text!r:.80}")
    return text


def _as_text_list(texts: Iterable[str]) -> list[str]:
    # A bare str is iterable too; tokenizing it character by character would
    # silently give wrong lengths, so refuse it.
    if isinstance(texts, (str, bytes)):
        raise InputError("expected a list of texts, got a single string; wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, not a str: {text!r:.80}")
    return texts


def _as_id_list(tokens: object) -> list[int]:
    """Return token ids as a list of Python ints (from a list, tuple or 1-D array)."""
    if isinstance(tokens, np.ndarray):
        if tokens.size == 0:
            return []
        if tokens.ndim != 1:
            raise InputError(f"decode takes one token sequence (1-D), got an array of shape {tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise InputError(f"decode needs integer token ids, got an array of dtype {tokens.dtype}")
        return tokens.tolist()
    if isinstance(tokens, (str, bytes)):
        raise InputError(f"decode needs a sequence of token ids, got {type(tokens).__name__}")
    try:
        return [operator.index(t) for t in tokens]  # type: ignore[union-attr]
    except TypeError:
        raise InputError(f"decode needs a sequence of integer token ids, got {tokens!r:.80}") from None


def _replace_surrogates(text: str) -> str:
    # Lone surrogates (e.g. from a JSON "\ud800" escape) cannot be encoded to
    # UTF-8. tiktoken replaces them with U+FFFD (and joins valid pairs); the
    # tokenizers path does the same so both paths see the same text.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_PARALLELISM_OFF = ("off", "false", "f", "no", "n", "0")


def _rayon_off() -> bool:
    """Whether ``TOKENIZERS_PARALLELISM`` turns the tokenizers thread pool off (read per call, as the library does)."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in _PARALLELISM_OFF


def _hf_encode_one(tokenizer, text: str, add_special_tokens: bool = False):
    """``tokenizer.encode`` of one text (offsets and token strings included), on the calling thread."""
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except TypeError:  # lone surrogates
        return tokenizer.encode(_replace_surrogates(text), add_special_tokens=add_special_tokens)


def _hf_encode(tokenizer, texts: list[str], num_threads: int, add_special_tokens: bool = False) -> list:
    """Token ids of texts (``.ids``; no offsets or token strings), on this thread when ``num_threads == 1``.

    ``encode_batch_fast`` (no character offsets, which nothing here reads) is
    ~1.4x faster than text-by-text ``encode`` (RESULTS.md), but runs on the rayon
    pool unless ``TOKENIZERS_PARALLELISM`` is off, as in Dask workers; with the
    pool on, ``num_threads=1`` stays text by text on the calling thread.
    """
    if num_threads == 1 and not _rayon_off():
        return [_hf_encode_one(tokenizer, text, add_special_tokens) for text in texts]
    try:
        return tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
    except TypeError:
        return tokenizer.encode_batch_fast([_replace_surrogates(t) for t in texts], add_special_tokens=add_special_tokens)


def _load_hf_tokenizer(path: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise InputError(f"{path}: cannot load it as a Hugging Face tokenizer.json: {e}") from e

