"""One build: check the inputs, take the workdir, run the asked stages in order.

``run_build`` is what ``scripts/build.py`` and ``retro-dask build`` call. Every
check that can fail on bad input runs before anything is written, so a refused
run leaves the workdir as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import BuildConfig, RunOptions, check_same_config, keep_recorded_backend
from .errors import InputError, RetroError
from .formats.workdir import (
    WorkdirLock,
    atomic_write_bytes,
    check_is_workdir_or_new,
    check_writable,
    config_path,
    read_json,
    remove_leftover_temporaries,
)
from .stages.registry import expand_tasks, run_stage


def recorded_config(workdir: str | Path) -> BuildConfig | None:
    path = config_path(workdir)
    if not path.exists():
        return None
    try:
        return BuildConfig.from_dict(read_json(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise RetroError(f"{path} is not a retro-dask config ({exc}); use another --workdir") from None


def validate_inputs(config: BuildConfig, stages: list[str]) -> dict[str, Any]:
    """Every check on the inputs that can be made before writing anything."""
    from .formats.indexed_dataset import open_dataset
    from .plan.index import training_problem
    from .plan.samples import check_splits_can_fill
    from .stages.db_candidates import dataset_facts, plan_candidates
    from .stages.index import plan_for
    from .text.embedder import check_bert_dir, embedding_dim
    from .text.gpt import get_gpt_tokenizer

    facts = dataset_facts(config)
    gpt = get_gpt_tokenizer(config.chunk.gpt_spec())
    check_bert_dir(config.embed.bert_model)
    dim = embedding_dim(config.embed.bert_model)
    for f in facts:
        ds = open_dataset(f.prefix)
        if ds.dtype.kind not in "iu":
            raise InputError(f"{f.prefix}.bin holds {ds.dtype} values, not tokens: give a GPT-tokenized dataset "
                             "(retro-dask preprocess makes one)")
    # Upper bound on the database size from the sizes alone; the exact count
    # (after dropping chunks without BERT tokens) comes from db-build.
    n_candidates = plan_candidates(config, facts).n_candidates
    plan = plan_for(config, max(n_candidates, 1))
    check_index_string(plan.factory, dim)
    problem = training_problem(plan, n_candidates)
    if problem:
        raise InputError(problem)
    check_splits_can_fill(config, facts, [open_dataset(f.prefix).scanned_sizes() for f in facts])
    return {"facts": facts, "gpt": gpt, "dim": dim, "n_candidates": n_candidates}


def check_index_string(factory: str, dim: int) -> None:
    from .formats.faiss_index import faiss

    try:
        index = faiss().index_factory(dim, factory)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise InputError(
            f"Faiss rejects the index string {factory!r} for {dim}-d embeddings: {msg}. Give a valid "
            "index_factory string (e.g. IVF1024,Flat or OPQ32_128,IVF4096_HNSW32,PQ32) or --index-str auto"
        ) from None
    from .stages.index import check_supported

    check_supported(index, factory)


@dataclass
class BuildSummary:
    workdir: str
    stages: list[str]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    config: BuildConfig | None = None  # as recorded in config.json (auto resolved)


def run_build(
    workdir: str | Path,
    config: BuildConfig,
    options: RunOptions,
    tasks: str | list[str],
    log: Callable[[str], None] = print,
) -> BuildSummary:
    """Run the asked stages on ``workdir``; resumes whatever an earlier run left done."""
    workdir = os.path.abspath(workdir)
    stages = expand_tasks(tasks)
    existed = os.path.exists(workdir)
    check_is_workdir_or_new(workdir)
    recorded = recorded_config(workdir)
    config = keep_recorded_backend(config, recorded)
    if recorded is not None:
        check_same_config(recorded, config, str(config_path(workdir)))
    validate_inputs(config, stages)
    check_writable(workdir)
    t0 = time.perf_counter()
    lock = WorkdirLock(workdir).acquire()
    try:
        removed = remove_leftover_temporaries(workdir)
        if removed:
            log(f"removed {removed} temporary files left by an interrupted run")
        summary = BuildSummary(workdir, stages)
        from .engine.cluster import open_client
        from .engine.executor import Executor
        from .stages.embed import record_backend_choice, resolve_backend

        with open_client(options, workdir, log=log) as client:
            if recorded is None:
                # auto is measured on a worker (the CPU that embeds) and recorded like any setting: a
                # rerun and every worker run that backend, and no array mixes two.
                config, choice = resolve_backend(config, client, log)
                atomic_write_bytes(config_path(workdir), config.to_json().encode())
                record_backend_choice(workdir, choice)
            summary.config = config
            ex = Executor(workdir, client, progress=options.progress, log=log, embed_batch_size=options.embed_batch_size)
            for stage in stages:
                log(f"== {stage}")
                if stage == "verify":
                    from .stages.verify import verify_workdir

                    summary.stats[stage] = verify_workdir(ex, config, options.verify_fraction, log=log)
                else:
                    summary.stats[stage] = run_stage(stage, ex, config, log)
        summary.seconds = time.perf_counter() - t0
        return summary
    except BaseException:
        # A refused first run on a folder this run created leaves nothing behind.
        if not existed and recorded is None and Path(workdir).is_dir() and not any(
            p.name not in (".retro", "config.json") for p in Path(workdir).iterdir()
        ):
            lock.release()
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        lock.release()
