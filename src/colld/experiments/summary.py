"""A grid's result files -> one row per cell, the claims' verdicts, and the results page.

Numbers: a student's task metric is its result file's ``mean`` (over probe seeds); a cell's row
shows mean ± std of that over distillation seeds (sample std, n - 1; none with one seed). Each
seed's score is ``colld.eval.score``'s aggregate against the grid's fbank and teacher
references, on probe-test, and its dev score the same on probe-dev (``task_values(split=
"dev")``: the number a choice between cells reads, so that probe-test only reports); the row
shows each one's mean ± std the same way. References are evaluated once: their
rows show the mean over probe seeds only, and a claim counts their std as 0 (they have no
distillation seed).

Claims (``VERDICT_RULE``): difference = score(better) - score(worse), combined std =
sqrt(std_better^2 + std_worse^2); "holds" when difference > 2 x combined std, "fails" when
difference < -2 x combined std, "within seed spread" otherwise. "no seed spread" when a trained
side has one seed or neither side is a trained cell (references and untrained floors are
deterministic: their std over seeds measures no noise); "not run" when a side has no result.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colld.eval.report import TASK_TITLES, load_comparison
from colld.eval.score import Score
from colld.experiments.grid import Claim, Grid, Layout
from colld.fsutil import write_json_atomic, write_text_atomic

RULE_SIGMAS = 2.0
HOLDS, FAILS, WITHIN = "holds", "fails", "within seed spread"
NO_SPREAD, NOT_RUN, NO_SCORE = "no seed spread", "not run", "no score"
VERDICT_RULE = (
    f"difference = score(better) - score(worse); combined std = sqrt(std_better² + "
    f"std_worse²) over distillation seeds (sample std; a reference, evaluated once, counts 0). "
    f"**{HOLDS}** if difference > {RULE_SIGMAS:g} x combined std, **{FAILS}** if difference < "
    f"-{RULE_SIGMAS:g} x combined std, **{WITHIN}** otherwise; **{NO_SPREAD}** when a trained "
    f"side has a single seed or neither side is trained (references and untrained floors are "
    f"deterministic: no spread to compare with)."
)
CLAIMS_BEGIN = "<!-- claims: filled by `colld experiment` from the grid's `claims`; do not edit -->"
CLAIMS_END = "<!-- end of claims -->"


@dataclass(frozen=True)
class Spread:
    """One number over distillation seeds (a single value for a reference)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample std (n - 1); None below two values."""
        return statistics.stdev(self.values) if self.n >= 2 else None

    def text(self, digits: int) -> str:
        if self.mean is None:
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class StudentFiles:
    """What one trained (or floor) student of a cell left: its result file and, for a trained
    one, its run's ``metrics.jsonl``."""

    seed: int
    result: Path
    metrics: Path | None = None


@dataclass(frozen=True)
class Monitor:
    """A distillation run's dev-set monitor (``metrics.jsonl``): the dev loss and every student
    layer's std over time (``dev/student_std/s{i}``; near 0 means collapse), at the first and
    at the last dev evaluation."""

    steps: tuple[int, int]
    loss: tuple[float, float]
    std: dict[str, tuple[float, float]]

    @property
    def min_std_ratio(self) -> float:
        """The smallest last/first ratio of a layer's std (1: unchanged, -> 0: collapsed)."""
        return min(last / first for first, last in self.std.values())


STD_PREFIX = "dev/student_std/"


def read_monitor(path: Path | None) -> Monitor | None:
    """The monitor of a run's metrics file; None when there is no file or no dev evaluation
    with a loss (a floor cell, an old run)."""
    if path is None or not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    dev = [r for r in rows if "dev/loss" in r]
    if not dev:
        return None
    first, last = dev[0], dev[-1]
    layers = sorted((k[len(STD_PREFIX) :] for k in first if k.startswith(STD_PREFIX)), key=_layer)
    return Monitor(
        steps=(int(first["step"]), int(last["step"])),
        loss=(float(first["dev/loss"]), float(last["dev/loss"])),
        std={i: (float(first[STD_PREFIX + i]), float(last[STD_PREFIX + i])) for i in layers},
    )


def _layer(name: str) -> int:
    """ "s12" -> 12 (so that s10 sorts after s9)."""
    return int(name.lstrip("s"))


@dataclass(frozen=True)
class Entry:
    """One evaluated model of a row: a cell's student at one seed, or a reference."""

    seed: int | None
    path: Path
    result: dict[str, Any]
    score: Score
    dev_score: Score
    """The same score on probe-dev (what a choice between cells should read)."""
    metrics: Path | None = None
    monitor: Monitor | None = None


@dataclass
class Row:
    name: str
    label: str
    kind: str
    """"cell", "floor" or "reference"."""
    entries: list[Entry]
    tasks: dict[str, Spread]
    score: Spread
    dev_score: Spread

    @property
    def seeds(self) -> list[int]:
        return [e.seed for e in self.entries if e.seed is not None]

    @property
    def params(self) -> float | None:
        return (self.entries[0].result.get("efficiency") or {}).get("parameters")

    @property
    def claim_std(self) -> float | None:
        """The score std a claim uses: 0 for a reference, None for a single seed."""
        return 0.0 if self.kind == "reference" else self.score.std

    def copy_name(self, entry: Entry) -> str:
        """The result file's name in the page's folder."""
        return entry.path.name if entry.seed is None else f"{self.name}-seed-{entry.seed}.json"

    def metrics_name(self, entry: Entry) -> str:
        """The run's metrics file's name in the page's folder."""
        return f"{self.name}-seed-{entry.seed}.metrics.jsonl"

    @property
    def monitors(self) -> list[Monitor]:
        return [e.monitor for e in self.entries if e.monitor is not None]


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    difference: float | None
    combined_std: float | None
    verdict: str
    dev_difference: float | None = None
    """The same difference on probe-dev scores (None where a side has none)."""


@dataclass
class Summary:
    rows: list[Row]
    tasks: list[str]
    teacher: str
    verdicts: list[Verdict] = field(default_factory=list)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)


def summarize(
    grid: Grid,
    students: Mapping[str, Sequence[StudentFiles]],
    references: Mapping[str, Path],
) -> Summary:
    """Rows of the cells in ``students`` (cell -> one StudentFiles per seed), then the
    references (spec -> result file; all of ``grid.references``), and the verdict of every
    claim."""
    ref_paths = [Path(references[spec]) for spec in grid.references]
    refs = load_comparison(ref_paths, teacher=grid.teacher)
    tasks = list(refs.results[0]["settings"]["tasks"])
    rows = []
    for cell in grid.cells:
        if not students.get(cell.name):
            continue
        entries = []
        for files in students[cell.name]:
            cmp = load_comparison([*ref_paths, Path(files.result)], teacher=grid.teacher)
            result = cmp.results[-1]
            label = result["label"]
            scores = (cmp.scores[label], cmp.dev_scores[label])
            monitor = read_monitor(files.metrics)
            metrics = files.metrics if monitor is not None else None
            entries.append(Entry(files.seed, Path(files.result), result, *scores, metrics, monitor))
        rows.append(_row(cell.name, cell.label, "floor" if cell.floor else "cell", entries, tasks))
    for spec, path, result in zip(grid.references, ref_paths, refs.results, strict=True):
        label = result["label"]
        entry = Entry(None, path, result, refs.scores[label], refs.dev_scores[label])
        rows.append(_row(spec, spec, "reference", [entry], tasks))
    summary = Summary(rows, tasks, grid.teacher)
    summary.verdicts = [judge(c, summary.row(c.better), summary.row(c.worse)) for c in grid.claims]
    return summary


def _row(name: str, label: str, kind: str, entries: list[Entry], tasks: list[str]) -> Row:
    per_task = {}
    for task in tasks:
        summaries = [e.result["probes"].get(task) or {} for e in entries]
        per_task[task] = Spread(
            tuple(
                s["mean"] for s in summaries if not s.get("skipped") and s.get("mean") is not None
            )
        )
    score = Spread(tuple(e.score.value for e in entries if e.score.value is not None))
    dev = Spread(tuple(e.dev_score.value for e in entries if e.dev_score.value is not None))
    return Row(name, label, kind, entries, per_task, score, dev)


def judge(claim: Claim, better: Row | None, worse: Row | None) -> Verdict:
    """The claim's verdict by ``VERDICT_RULE`` (module doc)."""
    if better is None or worse is None:
        return Verdict(claim, None, None, NOT_RUN)
    if better.score.mean is None or worse.score.mean is None:
        return Verdict(claim, None, None, NO_SCORE)
    difference = better.score.mean - worse.score.mean
    dev_difference = (
        None
        if better.dev_score.mean is None or worse.dev_score.mean is None
        else better.dev_score.mean - worse.dev_score.mean
    )
    stds = (better.claim_std, worse.claim_std)
    if None in stds or "cell" not in (better.kind, worse.kind):
        return Verdict(claim, difference, None, NO_SPREAD, dev_difference)
    combined = math.hypot(*stds)
    if difference > RULE_SIGMAS * combined:
        verdict = HOLDS
    elif difference < -RULE_SIGMAS * combined:
        verdict = FAILS
    else:
        verdict = WITHIN
    return Verdict(claim, difference, combined, verdict, dev_difference)


# ---------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class PageInfo:
    """What the page says about how it was made."""

    title: str
    question: str
    command: str
    machine: dict[str, Any]
    date: str
    wall_seconds: float
    """This invocation."""
    recorded_seconds: float
    """Every unit's recorded time, over all invocations that ran one."""
    budget_line: str
    notes: list[str] = field(default_factory=list)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(summary: Summary) -> str:
    """One row per cell (floor included), then the references."""
    head = ["model", "cell", "seeds", "params (M)"]
    head += [TASK_TITLES.get(t, t) for t in summary.tasks] + ["score", "dev score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.rows:
        params = None if row.params is None else row.params / 1e6
        cells = [
            row.label,
            f"`{row.name}`" if row.kind != "reference" else "reference",
            ",".join(map(str, row.seeds)) or "—",
            _fmt(params, 2),
        ]
        cells += [row.tasks[t].text(3) for t in summary.tasks]
        cells += [row.score.text(0), row.dev_score.text(0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(summary: Summary) -> str:
    head = ["claim", "better", "worse", "score difference", "combined seed std", "verdict"]
    head.append("dev score difference")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in summary.verdicts:
        cells = [
            v.claim.claim,
            f"`{v.claim.better}`",
            f"`{v.claim.worse}`",
            _fmt(v.difference, 0),
            _fmt(v.combined_std, 0),
            v.verdict,
            _fmt(v.dev_difference, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def monitor_table(summary: Summary) -> str | None:
    """Trained cells' distillation monitor beside their score: dev loss and every student
    layer's std over time, first -> last dev evaluation (means over seeds). None when no row
    has one."""
    rows = [r for r in summary.rows if r.monitors]
    if not rows:
        return None
    head = ["model", "cell", "steps", "dev loss", "student std per layer at the end (first)"]
    head += ["min std ratio", "score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ms = row.monitors
        layers = list(ms[0].std)
        first = {i: statistics.fmean(m.std[i][0] for m in ms) for i in layers}
        last = {i: statistics.fmean(m.std[i][1] for m in ms) for i in layers}
        stds = " / ".join(f"{last[i]:.3g} ({first[i]:.3g})" for i in layers)
        cells = [
            row.label,
            f"`{row.name}`",
            f"{ms[0].steps[0]} -> {ms[0].steps[1]}",
            f"{statistics.fmean(m.loss[0] for m in ms):.3f} -> "
            f"{statistics.fmean(m.loss[1] for m in ms):.3f}",
            stds,
            Spread(tuple(m.min_std_ratio for m in ms)).text(2),
            row.score.text(0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MONITOR_NOTE = (
    "Distillation monitor: from each run's metrics.jsonl (its dev split, not the probes), at "
    "the first and the last dev evaluation, mean over seeds. Student std: a layer's std over "
    "time on valid frames, averaged over dims and utterances; min std ratio: the smallest "
    "last/first ratio over layers (mean ± std over seeds), near 0 when a layer collapses to "
    "a constant."
)


def spread_line(summary: Summary) -> str:
    stds = sorted(r.score.std for r in summary.rows if r.score.std is not None)
    if not stds:
        return "Seed spread: none measured (every cell ran with a single distillation seed)."
    return (
        f"Seed spread: the score's std over distillation seeds is {stds[0]:.0f} to "
        f"{stds[-1]:.0f} (median {statistics.median(stds):.0f}) over {len(stds)} cells."
    )


def _flag_lines(summary: Summary) -> list[str]:
    flagged: dict[str, str] = {}
    for row in summary.rows:
        for entry in row.entries:
            flagged.update(entry.score.flagged)
    return [f"- `{task}` left out of the score: {why}" for task, why in sorted(flagged.items())]


def render_page(summary: Summary, info: PageInfo, folder: str, figures: list[str]) -> str:
    machine = info.machine
    first = summary.rows[0].entries[0].result
    md = [f"# {info.title}", ""]
    md += [
        f"_Written by `{info.command}`; every number below is read from the result files in "
        f"[{folder}/]({folder}/). Rerun the command to update it; do not edit by hand._",
        "",
        "## Question",
        "",
        info.question.strip(),
        "",
        "## How it was made",
        "",
        f"- Command: `{info.command}`",
        f"- Machine: {machine.get('platform')}, {machine.get('cpus')} CPUs, torch "
        f"{machine.get('torch')}",
        f"- Date: {info.date}; wall time of this invocation {info.wall_seconds / 60:.1f} min; "
        f"recorded time of all the grid's steps (over every invocation) "
        f"{info.recorded_seconds / 60:.1f} min",
        f"- Budget: {info.budget_line}",
        f"- Evaluation: corpus `{first['corpus']['dir']}` (probe splits "
        f"`{first['corpus']['fingerprint']}`), probe seeds {first['settings']['seeds']}; "
        f"score teacher `{summary.teacher}` = 1000, fbank = 0",
    ]
    md += [f"- {note}" for note in info.notes]
    md += ["", "## Results", "", results_table(summary), ""]
    md.append(
        "Task metrics: each seed's value is the mean over probe seeds; cells show mean ± std "
        "(sample std) over distillation seeds, references one evaluation (mean over probe "
        "seeds). Score: 1000 x mean over tasks of (model - fbank) / (teacher - fbank), error "
        "rates as 1 - error, on probe-test; dev score: the same on probe-dev (each probe's "
        "selected epoch), the number to choose a configuration by, so that probe-test stays "
        "a report."
    )
    md += ["", spread_line(summary)]
    md += _flag_lines(summary)
    monitors = monitor_table(summary)
    if monitors is not None:
        md += ["", "## Distillation monitor", "", monitors, "", MONITOR_NOTE]
    md += ["", "## Claims", "", CLAIMS_BEGIN, "", claims_table(summary), "", VERDICT_RULE, ""]
    md += [CLAIMS_END, "", "## Plots", ""]
    md += [f"![{name}]({folder}/{name})" for name in figures]
    md += ["", "## Files", ""]
    for row in summary.rows:
        for e in row.entries:
            names = [row.copy_name(e)] + ([row.metrics_name(e)] if e.metrics else [])
            md += [f"- [{folder}/{name}]({folder}/{name})" for name in names]
    return "\n".join(md) + "\n"


def summary_json(summary: Summary) -> dict[str, Any]:
    """The page's numbers, machine-readable."""
    return {
        "teacher": summary.teacher,
        "tasks": summary.tasks,
        "rows": [
            {
                "name": r.name,
                "label": r.label,
                "kind": r.kind,
                "seeds": r.seeds,
                "params": r.params,
                "tasks": {t: _spread_json(s) for t, s in r.tasks.items()},
                "score": _spread_json(r.score),
                "dev_score": _spread_json(r.dev_score),
                "min_std_ratio": _spread_json(Spread(tuple(m.min_std_ratio for m in r.monitors))),
                "files": [r.copy_name(e) for e in r.entries],
            }
            for r in summary.rows
        ],
        "claims": [
            {
                "claim": v.claim.claim,
                "better": v.claim.better,
                "worse": v.claim.worse,
                "difference": v.difference,
                "combined_std": v.combined_std,
                "verdict": v.verdict,
                "dev_difference": v.dev_difference,
            }
            for v in summary.verdicts
        ],
    }


def _spread_json(spread: Spread) -> dict[str, Any]:
    return {"values": list(spread.values), "mean": spread.mean, "std": spread.std}


def write_page(summary: Summary, info: PageInfo, layout: Layout) -> Path:
    """Copy the result files, draw the plots, write ``summary.json`` and the page."""
    from colld.experiments.plots import write_plots

    layout.assets.mkdir(parents=True, exist_ok=True)
    for row in summary.rows:
        for entry in row.entries:
            shutil.copy2(entry.path, layout.assets / row.copy_name(entry))
            if entry.metrics is not None:
                shutil.copy2(entry.metrics, layout.assets / row.metrics_name(entry))
    figures = write_plots(summary, layout.assets)
    write_json_atomic(layout.assets / "summary.json", summary_json(summary))
    page = render_page(summary, info, layout.assets.name, figures)
    return write_text_atomic(layout.page, page)
