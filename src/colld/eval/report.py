"""``colld compare``: evaluation results -> one markdown report with plots.

The report folder holds ``report.md``, PNG plots (score vs parameters and vs real-time factor,
per-task bars, learned layer weights, CKA heatmaps, training curves) and ``results/`` (copies of
the JSON files it was made from). Every number in the markdown is read from those JSON files.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colld.eval.evaluate import read_result
from colld.eval.score import DEFAULT_MARGIN, Score, aggregate_score, task_values
from colld.fsutil import write_text_atomic

log = logging.getLogger(__name__)

TASK_TITLES = {
    "lid": "LID acc",
    "sid": "SID acc",
    "pr": "PER",
    "char": "CER",
}


class CompareError(ValueError):
    """Results that cannot be put in one table; the message says which and why."""


@dataclass
class Comparison:
    """Results of one corpus and settings, with the reference models and the scores."""

    results: list[dict[str, Any]]
    paths: list[Path]
    teacher: dict[str, Any] | None
    fbank: dict[str, Any] | None
    scores: dict[str, Score]
    margin: float
    dev_scores: dict[str, Score] = field(default_factory=dict)
    """The same score on probe-dev (``task_values(split="dev")``): for choosing, not reporting."""


def load_comparison(
    paths: Sequence[str | Path], *, teacher: str | None = None, margin: float = DEFAULT_MARGIN
) -> Comparison:
    """Read result files, check they are comparable, pick the references, score every model."""
    if not paths:
        raise CompareError("no result files given")
    files = [Path(p) for p in paths]
    results = [read_result(p) for p in files]
    _check_comparable(results, files)
    ref_teacher = _find_teacher(results, teacher)
    fbank = next((r for r in results if r["kind"] == "fbank"), None)
    scores, dev_scores = {}, {}
    if ref_teacher is not None and fbank is not None:
        scores = _scores(results, ref_teacher, fbank, margin, split="test")
        dev_scores = _scores(results, ref_teacher, fbank, margin, split="dev")
    else:
        log.warning("no score: it needs a teacher result and the fbank result among the files")
    return Comparison(results, files, ref_teacher, fbank, scores, margin, dev_scores)


def _scores(
    results: list[dict[str, Any]],
    teacher: dict[str, Any],
    fbank: dict[str, Any],
    margin: float,
    *,
    split: str,
) -> dict[str, Score]:
    """Label -> score of every result on ``split`` against the teacher and fbank results."""
    t_values = task_values(teacher["probes"], split=split)
    f_values = task_values(fbank["probes"], split=split)
    return {
        r["label"]: aggregate_score(
            task_values(r["probes"], split=split), t_values, f_values, margin=margin
        )
        for r in results
    }


def _check_comparable(results: list[dict[str, Any]], files: list[Path]) -> None:
    first, first_file = results[0], files[0]
    labels: dict[str, Path] = {}
    for r, f in zip(results, files, strict=True):
        if r["corpus"]["fingerprint"] != first["corpus"]["fingerprint"]:
            raise CompareError(
                f"{f} was evaluated on corpus {r['corpus']['dir']} (probe splits fingerprint "
                f"{r['corpus']['fingerprint']}) but {first_file} on {first['corpus']['dir']} "
                f"({first['corpus']['fingerprint']}): results of different corpora or splits "
                "cannot share a table; evaluate all models on one corpus"
            )
        for key in ("tasks", "seeds"):
            if r["settings"][key] != first["settings"][key]:
                raise CompareError(
                    f"{f} used {key}={r['settings'][key]} but {first_file} used "
                    f"{first['settings'][key]}; evaluate all models with the same {key}"
                )
        if r["label"] in labels:
            raise CompareError(f"{f} and {labels[r['label']]} both hold '{r['label']}'")
        labels[r["label"]] = f


def _find_teacher(results: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    """The reference teacher: ``name`` (an error when absent), else the teacher the students
    (or the ONNX exports of students) were distilled from, else the only teacher result; None (no score) when the files hold no
    such result, e.g. ``colld evaluate STUDENT`` alone."""
    by_model = {r["model"]: r for r in results}
    if name is not None:
        if name not in by_model:
            raise CompareError(f"no result for the reference teacher '{name}' among the files")
        return by_model[name]
    named = {
        (r.get("mimicry") or {}).get("teacher")
        for r in results
        if r["kind"] in ("student", "onnx") and (r.get("mimicry") or {}).get("teacher")
    }
    if len(named) > 1:
        raise CompareError(f"students were distilled from different teachers {sorted(named)}")
    if named:
        return by_model.get(named.pop())
    teachers = [r for r in results if r["kind"] == "teacher"]
    return teachers[0] if len(teachers) == 1 else None


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _task_cell(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("skipped") or summary.get("mean") is None:
        return "skipped"
    return f"{summary['mean']:.3f} ± {summary.get('std') or 0.0:.3f}"


def _eff(r: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    eff = r.get("efficiency") or {}
    value = eff.get(key)
    return "—" if value is None else f"{value * scale:.{digits}f}"


def headline_table(cmp: Comparison) -> str:
    """Model | size | speed | every task (mean ± std over probe seeds) | score."""
    tasks = list(cmp.results[0]["settings"]["tasks"])
    head = ["model", "params (M)", "GFLOPs / audio s", "RTF b=1", "RTF batched"]
    head += [TASK_TITLES.get(t, t) for t in tasks] + ["score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in cmp.results:
        score = cmp.scores.get(r["label"])
        row = [
            f"{r['label']}",
            _eff(r, "parameters", 1e-6, 2),
            _eff(r, "flops_per_audio_second", 1e-9, 2),
            _eff(r, "rtf_batch1", 1.0, 4),
            _eff(r, "rtf_batched", 1.0, 4),
        ]
        row += [_task_cell(r["probes"].get(t)) for t in tasks]
        row.append(_fmt(score.value if score else None, 0))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _flag_lines(cmp: Comparison) -> list[str]:
    flagged: dict[str, str] = {}
    for score in cmp.scores.values():
        flagged.update(score.flagged)
    return [f"- `{task}` left out of the score: {why}" for task, why in sorted(flagged.items())]


def per_language_table(cmp: Comparison, task: str) -> str | None:
    """Task metric per language (mean over probe seeds), one column per model."""
    columns = [
        (r["label"], r["probes"][task].get("per_language") or {})
        for r in cmp.results
        if task in r["probes"] and not r["probes"][task].get("skipped")
    ]
    languages = sorted({lang for _, per in columns for lang in per})
    if not languages:
        return None
    lines = ["| language | " + " | ".join(label for label, _ in columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for lang in languages:
        cells = [_fmt(per.get(lang)) for _, per in columns]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mimicry_lines(cmp: Comparison) -> list[str]:
    lines = []
    for r in cmp.results:
        mim = r.get("mimicry")
        if not mim:
            continue
        if mim.get("skipped"):
            lines.append(f"- {r['label']}: {mim['skipped']}")
            continue
        pairs = ", ".join(f"{k} {v:.3f}" for k, v in (mim.get("pair_cosine") or {}).items())
        lines.append(
            f"- {r['label']} vs {mim['teacher']} on {mim['split']}: cosine(projected student, "
            f"normalised target) per pair: {pairs or 'n/a'}"
        )
        if mim.get("warning"):
            lines.append(f"  - warning: {mim['warning']}")
    return lines


def position_table(cmp: Comparison) -> str | None:
    """Per model and hidden state: the share of frames whose best match in ANOTHER utterance
    is the frame at the same index (1 = position only, chance ~ 1 / T)."""
    rows = [(r["label"], r.get("position_retrieval")) for r in cmp.results]
    rows = [(label, values) for label, values in rows if values]
    if not rows:
        return None
    width = max(len(values) for _, values in rows)
    head = ["model"] + [f"h{j}" for j in range(width)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in rows:
        cells = [_fmt(v, 2) for v in values] + [""] * (width - len(values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_table(cmp: Comparison) -> str:
    head = ["model", "latency b=1 (s)", "clip (s)", "batch", "peak RSS (MB)", "threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in cmp.results:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    _eff(r, "latency_batch1_s", 1.0, 3),
                    _eff(r, "clip_seconds", 1.0, 1),
                    _eff(r, "batch_size", 1.0, 0),
                    _eff(r, "peak_memory_mb", 1.0, 0),
                    _eff(r, "threads", 1.0, 0),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_report(cmp: Comparison, out_dir: str | Path, *, title: str = "colld evaluation") -> Path:
    """Write ``out_dir/report.md``, the plots and ``results/``; returns the markdown path."""
    from colld.eval import plots

    out_dir = Path(out_dir)
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    for path in cmp.paths:
        if path.resolve() != (out_dir / "results" / path.name).resolve():
            shutil.copy2(path, out_dir / "results" / path.name)
    figures = plots.write_all(cmp, out_dir)
    first = cmp.results[0]
    md = [f"# {title}", ""]
    md.append(
        f"Corpus `{first['corpus']['dir']}` (probe splits fingerprint "
        f"`{first['corpus']['fingerprint']}`: "
        + ", ".join(f"{k} {v}" for k, v in first["corpus"]["utterances"].items())
        + f" utterances); probe seeds {first['settings']['seeds']}; machine: "
        f"{first['machine']['processor']}, {first['machine']['cpus']} CPUs, "
        f"torch {first['machine']['torch']}; evaluated {first['created']}."
    )
    md += ["", "## Headline", "", headline_table(cmp), ""]
    if cmp.teacher is not None and cmp.fbank is not None:
        md.append(
            f"Score: 1000 x mean over tasks of (model - fbank) / (teacher - fbank), teacher = "
            f"`{cmp.teacher['label']}` (1000), fbank = 0; error rates as 1 - error. "
            f"Margin {cmp.margin}."
        )
    md += _flag_lines(cmp)
    md += ["", "Task metrics are mean ± std over probe seeds on probe-test.", ""]
    md += [f"![{name}]({name})" for name in figures if not name.startswith(("cka_", "training_"))]
    for task in ("char", "lid"):
        table = per_language_table(cmp, task)
        if table:
            md += ["", f"## {TASK_TITLES[task]} per language", "", table]
    mim = mimicry_lines(cmp)
    if mim:
        md += ["", "## Mimicry", ""] + mim + [""]
        md += [f"![{name}]({name})" for name in figures if name.startswith("cka_")]
    positions = position_table(cmp)
    if positions:
        md += ["", "## Position signal", "", positions, ""]
        md.append(
            "Share of probe-test frames whose most similar frame in another utterance is the one "
            "at the same index (h0 = front-end output). Near 1: the state says where a frame is, "
            "not what it holds."
        )
    md += ["", "## Efficiency", "", efficiency_table(cmp), ""]
    training = [name for name in figures if name.startswith("training_")]
    if training:
        md += ["", "## Training curves", ""] + [f"![{name}]({name})" for name in training]
    md += ["", "## Files", ""] + [f"- results/{p.name}" for p in cmp.paths]
    return write_text_atomic(out_dir / "report.md", "\n".join(md) + "\n")


def run_metrics(student_dir: str | Path) -> list[dict[str, Any]]:
    """The run log beside an exported student (``<run>/metrics.jsonl``), or [] if absent."""
    path = Path(student_dir).parent / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a line that is not JSON", path)
    return rows
