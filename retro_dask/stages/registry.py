"""The build's stages by name, in pipeline order, and how to run one (``verify`` rebuilds through it too)."""

from __future__ import annotations

from typing import Any

from ..config import BuildConfig
from ..engine.executor import Executor
from ..errors import InputError

STAGES = ("db-build", "embed", "index-train", "index-add", "tune", "query-neighbors", "leakage", "verify")
GROUPS = {
    "build": ("db-build", "embed", "index-train", "index-add", "query-neighbors", "leakage"),
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


def index_ntrain(config: BuildConfig):
    """``n_chunks -> chunks to train the index on``, for db-build's training sample."""
    from .index import plan_for

    return lambda n_chunks: plan_for(config, n_chunks).ntrain


def run_stage(stage: str, ex: Executor, config: BuildConfig, log=print) -> dict[str, Any]:
    """Run one build stage (not verify, which runs stages through this)."""
    if stage == "db-build":
        from .db import build_db

        return build_db(ex, config, index_ntrain(config), log=log)
    if stage == "embed":
        from .embed import build_embeddings

        return build_embeddings(ex, config, log=log)
    if stage == "index-train":
        from .index import train_index

        return train_index(ex, config, log=log)
    if stage == "index-add":
        from .index import add_to_index

        return add_to_index(ex, config, log=log)
    if stage == "tune":
        from .tune import run_tune

        return run_tune(ex, config, log=log)
    if stage == "query-neighbors":
        from .query import query_all_splits
        from .tune import run_tune, tune_is_current

        if config.query.nprobe == "auto" and not tune_is_current(ex.workdir, config):
            log(f"[query-neighbors] --query-nprobe auto: tuning nprobe for recall@10 >= {config.query.target_recall}")
            run_tune(ex, config, log=log)
        return query_all_splits(ex, config, log=log)
    if stage == "leakage":
        from .leakage import run_leakage

        return run_leakage(ex, config, log=log)
    raise InputError(f"unknown stage {stage!r}")
