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

from .config import BuildConfig, RunOptions, check_same_config
from .errors import InputError, RetroError
from .workdir import (
    WorkdirLock,
    check_writable,
    config_path,
    read_json,
    remove_leftover_temporaries,
    atomic_write_bytes,
)

STAGES = ("db-build", "embed", "index-train", "index-add", "query-neighbors", "verify")
GROUPS = {
    "build": ("db-build", "embed", "index-train", "index-add", "query-neighbors"),
    "index-build": ("embed", "index-train", "index-add"),
}


def expand_tasks(tasks: str | list[str]) -> list[str]:
    """``"build,verify"`` -> the stages to run, in pipeline order."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise InputError("--tasks is empty: give for example --tasks build")
    wanted: set[str] = set()
    for name in names:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in STAGES:
            wanted.add(name)
        else:
            raise InputError(f"--tasks {name!r} is not a task: choose from {', '.join(list(GROUPS) + list(STAGES))}")
    return [s for s in STAGES if s in wanted]


def recorded_config(workdir: str | Path) -> BuildConfig | None:
    path = config_path(workdir)
    if not path.exists():
        return None
    try:
        return BuildConfig.from_dict(read_json(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise RetroError(f"{path} is not a retro-dask config ({exc}); use another --workdir") from None


def index_plan_for(config: BuildConfig, n_chunks: int):
    from .embed import embedding_dim
    from .index_plan import plan_index

    c = config.index
    return plan_index(c.index_str, c.metric, n_chunks, embedding_dim(config.embed.bert_model), c.memory, c.ntrain)


def validate_inputs(config: BuildConfig, stages: list[str]) -> dict[str, Any]:
    """Every check on the inputs that can be made before writing anything."""
    from .db import dataset_facts, gpt_spec, plan_candidates
    from .embed import check_bert_dir, embedding_dim
    from .index_plan import training_problem
    from .tokenizer import get_gpt_tokenizer

    facts = dataset_facts(config)
    gpt = get_gpt_tokenizer(gpt_spec(config))
    check_bert_dir(config.embed.bert_model)
    dim = embedding_dim(config.embed.bert_model)
    for f in facts:
        from .db import open_dataset

        ds = open_dataset(f.prefix)
        if ds.dtype.kind not in "iu":
            raise InputError(f"{f.prefix}.bin holds {ds.dtype} values, not tokens: give a GPT-tokenized dataset "
                             "(retro-dask preprocess makes one)")
    # Upper bound on the database size from the sizes alone; the exact count
    # (after dropping chunks without BERT tokens) comes from db-build.
    n_candidates = plan_candidates(config, facts).n_candidates
    plan = index_plan_for(config, max(n_candidates, 1))
    check_index_string(plan.factory, dim)
    problem = training_problem(plan, n_candidates)
    if problem:
        raise InputError(problem)
    from .samples import check_splits_can_fill

    check_splits_can_fill(config, facts)
    return {"facts": facts, "gpt": gpt, "dim": dim, "n_candidates": n_candidates}


def check_index_string(factory: str, dim: int) -> None:
    from .faiss_util import faiss

    try:
        index = faiss().index_factory(dim, factory)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise InputError(
            f"Faiss rejects the index string {factory!r} for {dim}-d embeddings: {msg}. Give a valid "
            "index_factory string (e.g. IVF1024,Flat or OPQ32_128,IVF4096_HNSW32,PQ32) or --index-str auto"
        ) from None
    from .index import check_supported

    check_supported(index, factory)


@dataclass
class BuildSummary:
    workdir: str
    stages: list[str]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


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
    recorded = recorded_config(workdir)
    if recorded is not None:
        check_same_config(recorded, config, str(config_path(workdir)))
    validate_inputs(config, stages)
    check_writable(workdir)
    t0 = time.perf_counter()
    lock = WorkdirLock(workdir).acquire()
    try:
        if recorded is None:
            atomic_write_bytes(config_path(workdir), config.to_json().encode())
        removed = remove_leftover_temporaries(workdir)
        if removed:
            log(f"removed {removed} temporary files left by an interrupted run")
        summary = BuildSummary(workdir, stages)
        from .cluster import open_client
        from .runner import Runner

        with open_client(options, workdir, log=log) as client:
            runner = Runner(workdir, client, progress=options.progress, log=log,
                            embed_batch_size=options.embed_batch_size)
            for stage in stages:
                log(f"== {stage}")
                summary.stats[stage] = run_stage(stage, runner, config, options, log)
        summary.seconds = time.perf_counter() - t0
        return summary
    except BaseException:
        # A refused first run on a folder this run created leaves nothing behind.
        if not existed and recorded is None and not any(
            p.name not in (".retro", "config.json") for p in Path(workdir).iterdir()
        ):
            lock.release()
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        lock.release()


def run_stage(stage: str, runner, config: BuildConfig, options: RunOptions, log) -> dict[str, Any]:
    if stage == "db-build":
        from .db import build_db

        return build_db(runner, config, lambda n: index_plan_for(config, n).ntrain, log=log)
    if stage == "embed":
        from .embed import build_embeddings

        return build_embeddings(runner, config, log=log)
    if stage == "index-train":
        from .index import train_index

        return train_index(runner, config, log=log)
    if stage == "index-add":
        from .index import add_to_index

        return add_to_index(runner, config, log=log)
    if stage == "query-neighbors":
        from .query import query_all_splits

        return query_all_splits(runner, config, log=log)
    if stage == "verify":
        from .verify import verify_workdir

        return verify_workdir(runner, config, options.verify_fraction, log=log)
    raise InputError(f"unknown stage {stage!r}")
