"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from colld.eval.models import file_slug  # noqa: E402

if TYPE_CHECKING:
    from colld.eval.report import Comparison

_KIND_MARKERS = {"teacher": "s", "student": "o", "fbank": "x", "onnx": "D"}


def write_all(cmp: Comparison, out_dir: Path) -> list[str]:
    """Every figure the comparison supports; returns the file names written in ``out_dir``."""
    names = []
    if cmp.scores:
        names += _tradeoff(cmp, out_dir)
    names += _task_bars(cmp, out_dir)
    names += _layer_weights(cmp, out_dir)
    for r in cmp.results:
        names += _cka(r, out_dir)
        names += _training(r, out_dir)
    return names


def _save(fig: Any, out_dir: Path, name: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def _tradeoff(cmp: Comparison, out_dir: Path) -> list[str]:
    """Score vs parameters and vs real-time factor (batch 1): the trade-off curve."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel in (
        (axes[0], "parameters", "parameters (M)"),
        (axes[1], "rtf_batch1", "real-time factor, batch 1 (lower is faster)"),
    ):
        for r in cmp.results:
            score = cmp.scores[r["label"]].value
            x = (r.get("efficiency") or {}).get(key)
            if score is None or x is None or (key == "parameters" and x == 0):
                continue
            x = x / 1e6 if key == "parameters" else x
            ax.scatter([x], [score], marker=_KIND_MARKERS.get(r["kind"], "o"), s=60)
            ax.annotate(
                r["label"], (x, score), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score (teacher 1000, fbank 0)")
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "tradeoff.png")


def _task_bars(cmp: Comparison, out_dir: Path) -> list[str]:
    """Per task, each model's metric (mean, std as error bar; error rates shown as is)."""
    tasks = list(cmp.results[0]["settings"]["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), squeeze=False)
    labels = [r["label"] for r in cmp.results]
    for ax, task in zip(axes[0], tasks, strict=True):
        means, stds = [], []
        for r in cmp.results:
            summary = r["probes"].get(task) or {}
            ok = not summary.get("skipped") and summary.get("mean") is not None
            means.append(summary["mean"] if ok else 0.0)
            stds.append((summary.get("std") or 0.0) if ok else 0.0)
        metric = next(
            (r["probes"][task].get("metric") for r in cmp.results if task in r["probes"]), task
        )
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{task} ({metric})")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir, "tasks.png")


def _layer_weights(cmp: Comparison, out_dir: Path) -> list[str]:
    """The probes' learned softmax layer weights (mean over seeds), one panel per task."""
    tasks = list(cmp.results[0]["settings"]["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    drawn = False
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in cmp.results:
            weights = (r["probes"].get(task) or {}).get("layer_weights")
            if weights and len(weights) > 1:
                ax.plot(range(len(weights)), weights, marker="o", label=r["label"])
                drawn = True
        ax.set_title(task)
        ax.set_xlabel("hidden state (0 = front end)")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return []
    axes[0][0].set_ylabel("weight")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, out_dir, "layer_weights.png")


def _cka(r: dict[str, Any], out_dir: Path) -> list[str]:
    cka = (r.get("mimicry") or {}).get("cka")
    if not cka:
        return []
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(cka, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xlabel(f"teacher hidden state ({r['mimicry']['teacher']})")
    ax.set_ylabel("student hidden state")
    ax.set_title(f"linear CKA, {r['label']}", fontsize=9)
    fig.colorbar(image, ax=ax)
    return _save(fig, out_dir, f"cka_{file_slug(r['label'])}.png")


def _training(r: dict[str, Any], out_dir: Path) -> list[str]:
    from colld.eval.report import run_metrics

    if r["kind"] != "student":
        return []
    rows = run_metrics(r["model"])
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, ax in (("loss", axes[0]), ("acc", axes[1])):
        for split, style in (("train", "-"), ("dev", "o-")):
            pts = [(row["step"], row[f"{split}/{key}"]) for row in rows if f"{split}/{key}" in row]
            if pts:
                steps, values = zip(*pts, strict=True)
                ax.plot(steps, values, style, label=split, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"distillation of {r['label']}", fontsize=9)
    return _save(fig, out_dir, f"training_{file_slug(r['label'])}.png")
