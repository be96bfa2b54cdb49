"""The results page's figures: per-task bars and score vs parameters, seed std as error bars."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from colld.experiments.summary import Summary

_COLORS = {"cell": "tab:blue", "floor": "tab:gray", "reference": "tab:orange"}


def write_plots(summary: Summary, out_dir: Path) -> list[str]:
    """Write the figures into ``out_dir``; returns their file names."""
    return [_task_bars(summary, out_dir), _score_vs_params(summary, out_dir)]


def _save(fig: Any, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def _task_bars(summary: Summary, out_dir: Path) -> str:
    """Per task, every row's metric: mean over distillation seeds, their std as error bar."""
    tasks = summary.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.8), squeeze=False)
    labels = [row.label for row in summary.rows]
    colors = [_COLORS[row.kind] for row in summary.rows]
    for ax, task in zip(axes[0], tasks, strict=True):
        spreads = [row.tasks[task] for row in summary.rows]
        means = [s.mean if s.mean is not None else 0.0 for s in spreads]
        stds = [s.std or 0.0 for s in spreads]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=50, ha="right", fontsize=7)
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("per-task metric (error bars: std over distillation seeds)", fontsize=9)
    return _save(fig, out_dir, "tasks.png")


def _score_vs_params(summary: Summary, out_dir: Path) -> str:
    """Score (mean ± seed std) against counted parameters; fbank (no parameters) left out."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in summary.rows:
        if row.score.mean is None or not row.params:
            continue
        x = row.params / 1e6
        ax.errorbar(
            [x], [row.score.mean], yerr=[row.score.std or 0.0], fmt="o", capsize=3,
            color=_COLORS[row.kind],
        )  # fmt: skip
        ax.annotate(
            row.label, (x, row.score.mean), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"score ({summary.teacher} 1000, fbank 0)")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "score_vs_params.png")
