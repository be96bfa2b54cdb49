"""The SUPERB-style aggregate score, normalised between the fbank baseline and the teacher.

score = 1000 x mean over kept tasks of (model - fbank) / (teacher - fbank), every metric first
turned into "higher is better" (an error rate e becomes 1 - e; the ratio is the same as with
-e). A task is flagged and left out of the mean when teacher and fbank differ by less than

    max(margin, 2 x sqrt(std_teacher^2 + std_fbank^2))

on that scale (``margin`` absolute, 0.02 = 2 points by default; the std are over probe seeds),
because a ratio with a noise-sized denominator would let one task dominate through chance.
The teacher scores 1000 and fbank 0 by construction; a student between them is a share of what
the teacher gains over the front end, as in SUPERB's "superb score".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MARGIN = 0.02
ERROR_METRICS = ("per", "cer", "wer")


@dataclass(frozen=True)
class TaskValue:
    """One model's result on one task: mean and std over probe seeds, in the metric's units."""

    metric: str
    mean: float
    std: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in ERROR_METRICS

    def oriented(self) -> tuple[float, float]:
        """(mean, std) on the higher-is-better scale."""
        return (self.mean, self.std) if self.higher_is_better else (1.0 - self.mean, self.std)


@dataclass
class Score:
    """The aggregate and how it was reached.

    value: 1000 x mean normalised task score (None when no task could be kept).
    per_task: task -> normalised score x 1000 (kept tasks only).
    flagged: task -> why it was left out.
    """

    value: float | None
    per_task: dict[str, float] = field(default_factory=dict)
    flagged: dict[str, str] = field(default_factory=dict)


def task_values(probes: Mapping[str, Mapping], *, split: str = "test") -> dict[str, TaskValue]:
    """Task -> TaskValue from an evaluation's ``probes`` section (skipped tasks left out).

    split "test": probe-test, the reported numbers. "dev": probe-dev at each probe's selected
    epoch (``dev_values``), what a choice between configurations should be made on; the
    epoch was picked on it, so it reads a little high for every model alike. A task without
    dev values (results written before they were recorded) is left out.
    """
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    values = {}
    for task, summary in probes.items():
        if summary.get("skipped") or summary.get("mean") is None:
            continue
        if split == "test":
            mean, std = float(summary["mean"]), float(summary.get("std") or 0.0)
        else:
            dev = [float(v) for v in summary.get("dev_values") or []]
            if not dev:
                continue
            mean, std = statistics.fmean(dev), statistics.stdev(dev) if len(dev) > 1 else 0.0
        values[task] = TaskValue(metric=str(summary["metric"]), mean=mean, std=std)
    return values


def aggregate_score(
    model: Mapping[str, TaskValue],
    teacher: Mapping[str, TaskValue],
    fbank: Mapping[str, TaskValue],
    *,
    margin: float = DEFAULT_MARGIN,
) -> Score:
    """The normalised score of ``model`` (see the module docstring).

    Tasks missing from any of the three are flagged with the reason; so are tasks whose metric
    names disagree (results from different task definitions are not comparable).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    score = Score(value=None)
    for task in sorted(set(model) | set(teacher) | set(fbank)):
        missing = [
            name
            for name, res in (("model", model), ("teacher", teacher), ("fbank", fbank))
            if task not in res
        ]
        if missing:
            score.flagged[task] = f"no result for {', '.join(missing)}"
            continue
        metrics = {model[task].metric, teacher[task].metric, fbank[task].metric}
        if len(metrics) != 1:
            score.flagged[task] = f"metrics differ between results: {sorted(metrics)}"
            continue
        m, _ = model[task].oriented()
        t, t_std = teacher[task].oriented()
        f, f_std = fbank[task].oriented()
        needed = max(margin, 2.0 * math.hypot(t_std, f_std))
        if abs(t - f) < needed:
            score.flagged[task] = (
                f"teacher and fbank differ by {abs(t - f):.4f} < {needed:.4f} "
                f"(max of margin {margin} and 2x their combined seed std)"
            )
            continue
        score.per_task[task] = 1000.0 * (m - f) / (t - f)
    if score.per_task:
        score.value = sum(score.per_task.values()) / len(score.per_task)
    return score
