"""``colld experiment NAME``: run a grid, resumably, and write its results page.

Stages: the corpus; the shared teacher-target cache (when a trained unit still has to run); the
references; every unit (cell x distillation seed): distil, or export the untrained floor, then
evaluate; the page. A unit is *finished* when its student was exported from exactly its config
and its result file evaluates those weights with the current settings (``unit_finished``): it
is skipped without loading a model. An unfinished unit continues where it stopped: ``distill``
resumes from the run directory's checkpoints (a finished run only re-exports) and
``evaluate_model`` reuses a current result.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from colld.config import RunConfig, to_dict
from colld.eval.evaluate import (
    QUICK_EVAL,
    EvalSettings,
    evaluate_model,
    machine_info,
    read_result,
    result_path,
)
from colld.experiments.grid import (
    Grid,
    Layout,
    Unit,
    load_grid,
    make_layout,
    plan_units,
    resolve_grid_path,
    seeds,
    unit_config,
)
from colld.experiments.summary import (
    PageInfo,
    StudentFiles,
    results_table,
    summarize,
    write_page,
)
from colld.fsutil import write_json_atomic
from colld.students.export import read_provenance
from colld.teachers.hf import weight_files_fingerprint


def eval_settings(grid: Grid, corpus_dir: str, *, quick: bool) -> EvalSettings:
    """The grid's probe seeds on its corpus; ``--quick``: QUICK_EVAL's smoke-test settings."""
    settings = EvalSettings(corpus_dir=corpus_dir, seeds=tuple(grid.budget.probe_seeds))
    return replace(settings, **QUICK_EVAL) if quick else settings


def unit_result_path(unit: Unit) -> Path:
    return result_path(unit.eval_dir, str(unit.student_dir))


def student_current(unit: Unit) -> bool:
    """The exported student comes from exactly this unit's config, fully trained (or, for a
    floor cell, untrained)."""
    info = read_provenance(unit.student_dir)
    if info is None:
        return False
    steps = 0 if unit.cell.floor else unit.cfg.train.max_steps
    return info.get("config") == _json_plain(to_dict(unit.cfg)) and info.get("steps") == steps


def unit_finished(unit: Unit, settings: EvalSettings) -> bool:
    """The student is current and its result file holds these weights' evaluation with these
    settings (the checks of ``evaluate_model``'s reuse, without loading the model)."""
    if not student_current(unit):
        return False
    try:
        result = read_result(unit_result_path(unit))
        fingerprint = weight_files_fingerprint(unit.student_dir)
    except (FileNotFoundError, ValueError):
        return False
    return (
        result.get("settings") == _json_plain(settings.key())
        and result.get("fingerprint") == fingerprint
    )


def _json_plain(data: object) -> object:
    """``data`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(data))


def export_untrained(cfg: RunConfig) -> Path:
    """The floor: the student exactly as ``distill`` initialises it at ``train.seed`` (heads
    included), exported like a trained one (provenance ``steps`` 0), with no training step."""
    from colld.train.recipe import export, setup

    run = setup(cfg, resume=False)
    try:
        return export(run)
    finally:
        run.logger.close()
        run.train.close()


def run_unit(unit: Unit, settings: EvalSettings, layout: Layout) -> None:
    """Distil (or export the floor) unless the student is current, then evaluate it."""
    from colld.train.recipe import distill

    if not student_current(unit):
        (export_untrained if unit.cell.floor else distill)(unit.cfg)
    evaluate_model(str(unit.student_dir), settings, unit.eval_dir, cache_dir=layout.features)


def build_shared_cache(grid: Grid, layout: Layout, *, quick: bool) -> float:
    """Build (or complete) the grid's teacher-target caches, one per target kind, each with the
    union of the teacher layers that its cells map to (all cells, not only ``--cells``: a later
    run may need theirs). Returns the seconds spent building (0 when all were complete)."""
    from colld.teachers import load_teacher
    from colld.train.teacher_cache import build_cache, cache_teacher_layers

    seed = seeds(grid, quick=quick)[0]
    cfgs = [unit_config(grid, cell, seed, layout, quick=quick) for cell in grid.cells]
    groups: dict[str, list[RunConfig]] = {}
    for cfg in cfgs:
        if cfg.data.target_cache is not None:
            groups.setdefault(cfg.data.target_cache, []).append(cfg)
    first = next(iter(groups.values()))[0]
    teacher = load_teacher(
        first.teacher.spec,
        trust_remote_code=first.teacher.trust_remote_code,
        revision=first.teacher.revision,
    )
    seconds = 0.0
    for directory, group in groups.items():
        layers = sorted({j for cfg in group for j in cache_teacher_layers(cfg, teacher)})
        summary = build_cache(group[0], Path(directory), teacher=teacher, layers=layers)
        print("\n".join(summary.lines()), flush=True)
        seconds += summary.build_seconds if summary.built else 0.0
    return seconds


class Timings:
    """Seconds each part of the grid took when it last did work (RUNS/NAME/timings.json)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        )

    def record(self, key: str, seconds: float) -> None:
        self.seconds[key] = round(seconds, 1)
        write_json_atomic(self.path, self.seconds)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class Progress:
    """Unit headers with position, elapsed time and an ETA: the mean time of the units run so
    far times those left, or the budget's average per unit before the first one ends."""

    def __init__(self, total: int, left: int, budget_unit_seconds: float | None) -> None:
        self.total, self.left = total, left
        self.budget_unit_seconds = budget_unit_seconds
        self.started = time.perf_counter()
        self.run_seconds: list[float] = []
        self.count = 0

    def header(self, text: str) -> None:
        self.count += 1
        elapsed = (time.perf_counter() - self.started) / 60
        line = f"[cell {self.count}/{self.total}] {text} | elapsed {elapsed:.1f} min"
        print(f"\n{line} | ETA {self.eta()}", flush=True)

    def ran(self, seconds: float) -> None:
        self.run_seconds.append(seconds)
        self.left -= 1

    def eta(self) -> str:
        per_unit = (
            statistics.fmean(self.run_seconds) if self.run_seconds else self.budget_unit_seconds
        )
        if self.left == 0:
            return "0 min"
        return "unknown" if per_unit is None else f"~{self.left * per_unit / 60:.0f} min"


def _size(grid: Grid) -> int:
    """Students and references of the whole grid: what ``budget.expected_minutes`` covers."""
    return len(grid.cells) * len(grid.budget.seeds) + len(grid.references)


def estimate_line(grid: Grid, units: list[Unit], left: list[Unit], *, quick: bool) -> str:
    """The one line printed at start: what runs, and how long the budget says it takes."""
    trained = [u for u in units if not u.cell.floor]
    line = (
        f"experiment {grid.name}: {len(units)} students ({len(trained)} trained x "
        f"{_steps_text(trained)} steps, "
        f"{len(units) - len(trained)} untrained floor) + {len(grid.references)} references; "
        f"{len(units) - len(left)} students finished already"
    )
    if quick:
        return line + "; --quick: tiny runs (the budget's estimate does not apply)"
    remaining = grid.budget.expected_minutes * (len(left) + len(grid.references)) / _size(grid)
    return (
        line + f"; budget: ~{grid.budget.expected_minutes:.0f} min for the whole grid, "
        f"~{remaining:.0f} min for what is left (2-core CPU estimate, evaluation included)"
    )


@dataclass(frozen=True)
class Options:
    """What ``colld experiment`` was asked; the page writes it back as the command."""

    name: str
    """A grid of configs/experiments, or a path to a grid file."""
    quick: bool = False
    out: str | None = None
    """Results folder (None: docs/results, or the quick results folder)."""
    cells: tuple[str, ...] = ()
    """A subset of the grid's cells (empty: all)."""
    runs: str | None = None
    """Runs folder (None: runs/experiments or runs/experiments-quick)."""
    seeds: tuple[int, ...] = ()
    """A subset of the budget's distillation seeds (empty: all)."""

    def command(self) -> str:
        parts = ["colld", "experiment", self.name]
        parts += ["--quick"] if self.quick else []
        parts += ["--out", self.out] if self.out else []
        parts += ["--cells", ",".join(self.cells)] if self.cells else []
        parts += ["--runs", self.runs] if self.runs else []
        parts += ["--seeds", ",".join(map(str, self.seeds))] if self.seeds else []
        return shlex.join(parts)


def run_experiment(options: Options) -> Path:
    """Run the grid, resumably (module doc); returns the results page."""
    from colld.train.data_setup import ensure_embedded_corpus

    started = time.perf_counter()
    quick, cells = options.quick, list(options.cells) or None
    grid = load_grid(resolve_grid_path(options.name))
    layout = make_layout(grid, quick=quick, out=options.out, runs=options.runs)
    units = plan_units(grid, layout, quick=quick, cells=cells, only_seeds=options.seeds)
    first = units[0].cfg
    settings = eval_settings(grid, first.data.corpus_dir, quick=quick)
    left = [u for u in units if not unit_finished(u, settings)]
    print(estimate_line(grid, units, left, quick=quick), flush=True)
    ensure_embedded_corpus(Path(first.data.corpus_dir), first.data.corpus_hours, first.train.seed)
    timings = Timings(layout.timings)
    if any(u.cached for u in left):
        print("\n[teacher-target cache] the grid's union of teacher layers", flush=True)
        seconds = build_shared_cache(grid, layout, quick=quick)
        if seconds:
            timings.record("target-cache", seconds)
    references = {}
    for k, spec in enumerate(grid.references, start=1):
        print(f"\n[reference {k}/{len(grid.references)}] {spec}", flush=True)
        result = evaluate_model(spec, settings, layout.references, cache_dir=layout.features)
        timings.record(f"references/{spec}", result.get("seconds") or 0.0)
        references[spec] = result_path(layout.references, spec)
    students = _run_units(grid, units, left, settings, layout, timings, quick=quick)
    summary = summarize(grid, students, references)
    info = PageInfo(
        title=grid.title + (" (--quick smoke test)" if quick else ""),
        question=grid.question,
        command=options.command(),
        machine=machine_info(),
        date=time.strftime("%Y-%m-%d %H:%M %Z"),
        wall_seconds=time.perf_counter() - started,
        recorded_seconds=timings.total,
        budget_line=_budget_line(grid, units, settings, quick=quick),
        notes=_notes(units, cells, quick=quick, seeds=options.seeds),
    )
    page = write_page(summary, info, layout)
    print(f"\nresults page: {page}\n\n{results_table(summary)}\n", flush=True)
    print(f"experiment {grid.name} finished in {info.wall_seconds / 60:.1f} min", flush=True)
    return page


def _run_units(
    grid: Grid,
    units: list[Unit],
    left: list[Unit],
    settings: EvalSettings,
    layout: Layout,
    timings: Timings,
    *,
    quick: bool,
) -> dict[str, list[StudentFiles]]:
    """Every unit, finished ones skipped; returns cell -> its students' files, by seed."""
    budget_unit = None if quick else grid.budget.expected_minutes * 60 / _size(grid)
    progress = Progress(len(units), len(left), budget_unit)
    students: dict[str, list[StudentFiles]] = {}
    for unit in units:
        to_run = any(unit is u for u in left)
        progress.header(f"{unit.cell.label} ({unit.key}){'' if to_run else ': finished, skipped'}")
        if to_run:
            unit_started = time.perf_counter()
            run_unit(unit, settings, layout)
            seconds = time.perf_counter() - unit_started
            progress.ran(seconds)
            timings.record(unit.key, seconds)
        metrics = None if unit.cell.floor else unit.run_dir / "metrics.jsonl"
        files = StudentFiles(unit.seed, unit_result_path(unit), metrics)
        students.setdefault(unit.cell.name, []).append(files)
    return students


def _steps_text(units: list[Unit]) -> str:
    """ "80", or "80-480" where cells have their own step budgets."""
    steps = sorted({u.cfg.train.max_steps for u in units if not u.cell.floor}) or [0]
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _budget_line(grid: Grid, units: list[Unit], settings: EvalSettings, *, quick: bool) -> str:
    cfg = units[0].cfg
    line = (
        f"corpus {cfg.data.corpus_hours:g} h (`{cfg.data.corpus_dir}`), {_steps_text(units)} "
        f"steps of {cfg.data.batch_seconds:g} s batches per trained student, distillation seeds "
        f"{sorted({u.seed for u in units})}, probe seeds {list(settings.seeds)}"
    )
    if quick:
        return line + "; --quick: tiny runs and QUICK_EVAL probes, a smoke test only"
    return line + f"; expected ~{grid.budget.expected_minutes:.0f} min on 2 CPU cores"


def _notes(
    units: list[Unit], cells: list[str] | None, *, quick: bool, seeds: tuple[int, ...] = ()
) -> list[str]:
    notes = []
    cached = [u for u in units if u.cached]
    caches = sorted({str(u.cfg.data.target_cache) for u in cached})
    if cached:
        where = (
            f"one shared cache (`{caches[0]}`)"
            if len(caches) == 1
            else f"shared caches, one per target kind ({', '.join(f'`{c}`' for c in caches)})"
        )
        notes.append(
            f"Trained cells read the teacher's targets from {where}: fixed "
            f"{cached[0].cfg.data.max_duration:g} s segments used whole, no random crops"
        )
    if cells:
        notes.append(f"Cells run by this command: {', '.join(cells)} (`--cells`)")
    if seeds:
        notes.append(
            f"Distillation seeds run by this command: {', '.join(map(str, seeds))} (`--seeds`); "
            "rerun without it to add the others"
        )
    if quick:
        notes.append("**--quick: these numbers are a smoke test, not results**")
    return notes
