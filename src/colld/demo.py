"""``colld demo``: the whole story in one command, resumable stage by stage.

1. corpus    synthesise the embedded espeak-ng corpus (skipped when complete)
2. distill   CoLLD-distil the embedded Whisper base into the default student (a run directory
             with checkpoints is continued; a finished one only re-exports)
3. evaluate  fbank, the teacher, the student and Whisper tiny.en (a smaller model pre-trained
             from scratch) on the evaluation part (result files are reused when current)
4. report    ``colld compare`` over the four results: report.md + plots

Every stage shows its own progress bar with an ETA; the default finishes in about half an hour
on 2 CPU cores, ``--quick`` in a few minutes (CI runs it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from colld.config import QUICK_OVERRIDES, RunConfig, load_config
from colld.eval.evaluate import QUICK_EVAL, EvalSettings, evaluate_model, result_path
from colld.eval.models import FBANK
from colld.eval.report import Comparison, headline_table, load_comparison, write_report

log = logging.getLogger(__name__)

REFERENCE = "whisper-tiny.en"
"""The off-the-shelf small model evaluated beside the student."""

# The demo's distillation budget: about 17 minutes of the half hour here (2 CPU cores).
DEMO_OVERRIDES: tuple[str, ...] = (
    "train.max_steps=150",
    "train.warmup_steps=15",
    "train.eval_every=75",
    "train.ckpt_every=25",
    "train.output_dir=runs/demo/run",
)
QUICK_DEMO_OVERRIDES: tuple[str, ...] = (*QUICK_OVERRIDES, "train.output_dir=runs/demo-quick/run")

DEMO_SETTINGS = EvalSettings(seeds=(0, 1, 2))
QUICK_SETTINGS = EvalSettings(**QUICK_EVAL)


@dataclass
class DemoResult:
    report: Path
    comparison: Comparison
    seconds: float


def demo_config(
    *, quick: bool, config: str | None = None, overrides: tuple[str, ...] = ()
) -> RunConfig:
    base = QUICK_DEMO_OVERRIDES if quick else DEMO_OVERRIDES
    return load_config(config, [*base, *overrides])


def _stage(number: int, name: str, started: float) -> None:
    elapsed = time.perf_counter() - started
    print(f"\n[{number}/4] {name} (demo time so far {elapsed / 60:.1f} min)", flush=True)


def run_demo(
    *,
    quick: bool = False,
    config: str | None = None,
    overrides: tuple[str, ...] = (),
    output: str | None = None,
) -> DemoResult:
    """Run the four stages; returns where the report is and what it holds."""
    from colld.train.data_setup import ensure_embedded_corpus
    from colld.train.recipe import distill

    started = time.perf_counter()
    if output is not None:
        overrides = (*overrides, f"train.output_dir={Path(output) / 'run'}")
    cfg = demo_config(quick=quick, config=config, overrides=overrides)
    demo_dir = Path(cfg.train.output_dir).parent
    corpus = Path(cfg.data.corpus_dir)

    _stage(1, f"corpus: {corpus}", started)
    ensure_embedded_corpus(corpus, cfg.data.corpus_hours, cfg.train.seed)

    _stage(2, f"distill {cfg.teacher.spec} -> student in {cfg.train.output_dir}", started)
    student_dir = distill(cfg)

    settings = replace(QUICK_SETTINGS if quick else DEMO_SETTINGS, corpus_dir=str(corpus))
    models = [FBANK, cfg.teacher.spec, str(student_dir), REFERENCE]
    results_dir = demo_dir / "results"
    _stage(3, f"evaluate {', '.join(models)} on {corpus}'s evaluation part", started)
    paths = []
    for k, spec in enumerate(models, start=1):
        print(f"  model {k}/{len(models)}: {spec}", flush=True)
        evaluate_model(spec, settings, results_dir, cache_dir=demo_dir / "features")
        paths.append(result_path(results_dir, spec))

    _stage(4, "report", started)
    comparison = load_comparison(paths, teacher=cfg.teacher.spec)
    report = write_report(comparison, demo_dir / "report", title="colld demo")
    seconds = time.perf_counter() - started
    print(f"\nreport: {report}\n\n{headline_table(comparison)}\n", flush=True)
    print(f"demo finished in {seconds / 60:.1f} min", flush=True)
    return DemoResult(report=report, comparison=comparison, seconds=seconds)
