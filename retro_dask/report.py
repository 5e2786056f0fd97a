"""The one-screen summary printed at the end of a build."""

from __future__ import annotations

from typing import Any

from .formats.workdir import stats_dir


def _fmt_rate(stats: dict[str, Any]) -> str:
    rate = stats.get("chunks_per_s")
    return f"{rate:>10,.1f}" if isinstance(rate, (int, float)) else f"{'':>10}"


def _peak(stats: dict[str, Any]) -> str:
    workers = stats.get("worker_peak_rss_mb") or {}
    peak = max(workers.values()) if workers else None
    return f"{peak:>9,.0f}" if peak else f"{'':>9}"


def summary_lines(summary) -> list[str]:
    lines = [f"retro-dask build of {summary.workdir}: {summary.seconds:,.1f} s", ""]
    lines.append(f"  {'stage':<16}{'seconds':>10}{'chunks/s':>11}{'blocks':>9}{'skipped':>9}{'worker MB':>10}  figures")
    for stage, stats in summary.stats.items():
        figures = []
        for key in ("n_chunks", "n_chunks_invalid", "n_sampled", "factory", "ntotal", "n_query_chunks", "nprobe",
                    "recall_at_10_index", "recall_at_10_neighbors", "blocks_rebuilt"):
            if key in stats:
                figures.append(f"{key}={stats[key]}")
        lines.append(
            f"  {stage:<16}{stats.get('seconds', 0):>10,.1f}{_fmt_rate(stats)}"
            f"{stats.get('blocks', ''):>9}{stats.get('blocks_skipped', ''):>9}{_peak(stats)}  {' '.join(figures)}"
        )
    lines += ["", f"  outputs: {summary.workdir}/{{config.json, db/, index/, query/}}; figures: {stats_dir(summary.workdir)}/"]
    return lines


def print_summary(summary) -> None:
    print("\n".join(summary_lines(summary)))
