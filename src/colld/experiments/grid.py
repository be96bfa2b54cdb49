"""The grid config of ``colld experiment``: what to run, and where it goes on disk.

A grid file (``configs/experiments/NAME.yaml``) holds:
    name, title, question  the results page's name (docs/results/NAME.md, equal to the file's
                           name), its title, and the one paragraph the grid answers
    budget                 corpus hours, steps, batch seconds, distillation and probe seeds, and
                           the expected wall time with evaluation (printed at start)
    base                   ``a.b=c`` config overrides shared by every cell
    cells                  {name, label, overrides, floor, max_steps, quick_overrides}: one row
                           of the results table each; a ``floor`` cell is the student as
                           initialised, exported untrained; ``max_steps`` replaces the budget's
                           steps for that cell; ``quick_overrides`` apply with --quick only,
                           last (a value that the quick corpus cannot hold, e.g. hours)
    references             models evaluated as they are; fbank and the teacher are required (the
                           score is normalised between them)
    claims                 {claim, better, worse}: score differences the page judges

A cell's config at seed S is: defaults <- budget <- base <- cell <- (--quick, then the cell's
quick_overrides) <- the runner's keys
(``train.output_dir`` = RUNS/NAME/CELL/seed-S, ``train.seed`` = S, ``data.target_cache``). The
budget and the runner own their keys; setting one in ``base`` or a cell is an error, so every
value has one home. Cells must also keep the teacher and the data of ``base``: one teacher is the
score's reference and one corpus is every probe's.

The teacher-target cache: every trained cell without augmentation reads the teacher's targets
from one cache (RUNS/NAME/target-cache), built once with the union of the teacher layers the
grid's cells map to. The cache is keyed by the teacher, the target kind, the layers (a superset
is fine), the front end, the segment length (``data.max_duration``), the training data and the
augmentation (colld.train.teacher_cache); masking, loss, student shape and seed do not enter
it, so cells that agree on the teacher, ``objective.target`` and ``data.max_duration`` can share
it: the runner builds one cache per target kind (RUNS/NAME/target-cache for hidden states,
target-cache-ffn for feed-forward outputs) and every cached cell must use the same
``data.max_duration`` (checked here), so all cells train on the same segments. Cached training uses fixed segments whole, not random crops: every trained
cell of one grid sees the same data either way.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from colld.config import QUICK_OVERRIDES, ConfigError, RunConfig, from_dict, load_config
from colld.config import parse_override as parse_config_override
from colld.eval.models import FBANK

GRID_DIR = Path("configs/experiments")
DOCS_RESULTS = Path("docs/results")
RUNS = Path("runs/experiments")
QUICK_RUNS = Path("runs/experiments-quick")
QUICK_RESULTS = QUICK_RUNS / "results"

# budget field -> the config key it sets
BUDGET_KEYS = {
    "corpus_hours": "data.corpus_hours",
    "max_steps": "train.max_steps",
    "batch_seconds": "data.batch_seconds",
}
RUNNER_KEYS = ("train.output_dir", "train.seed", "data.target_cache")
# Keys a cell may not change: the score's reference teacher and the data every cell trains on.
SHARED_KEYS = ("teacher", "data.corpus_dir", "data.train", "data.dev")
# Folders of RUNS/NAME that are not cells.
RESERVED_NAMES = ("target-cache", "references", "features")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class GridError(ConfigError):
    """A grid config problem; the message names the file, the key, the value and what was
    expected."""


@dataclass(kw_only=True)
class Budget:
    corpus_hours: float
    """Hours of speech of the embedded corpus (``data.corpus_hours``)."""
    max_steps: int
    """Optimizer updates per trained cell and seed (``train.max_steps``)."""
    batch_seconds: float
    """Seconds of audio per batch (``data.batch_seconds``)."""
    seeds: list[int]
    """Distillation seeds (``train.seed``): every cell runs once per seed."""
    probe_seeds: list[int]
    """Probe seeds of every evaluation (a model's metric is the mean over them)."""
    expected_minutes: float
    """Wall time of the whole grid, evaluation included, on the machine the file's comment
    names (the arithmetic belongs in that comment)."""

    def overrides(self) -> list[str]:
        return [f"{key}={getattr(self, name)}" for name, key in BUDGET_KEYS.items()]


@dataclass(kw_only=True)
class Cell:
    name: str
    """Folder name (RUNS/NAME/CELL); claims and ``--cells`` use it."""
    label: str
    """The row label on the results page."""
    overrides: list[str] = field(default_factory=list)
    """``a.b=c`` config overrides on top of the grid's ``base``."""
    floor: bool = False
    """Export the student as initialised at each seed, without a training step."""
    max_steps: int | None = None
    """This cell's optimizer updates instead of ``budget.max_steps``: for a grid whose question
    is the training length (e.g. ``steps``); every other grid keeps one step budget."""
    quick_overrides: list[str] = field(default_factory=list)
    """Overrides for ``--quick`` only, after the quick ones: where a cell's value does not fit
    the tiny quick run (e.g. ``data.train_hours`` beyond the quick corpus)."""


@dataclass(kw_only=True)
class Claim:
    claim: str
    """What the comparison tests, in words."""
    better: str
    """The cell or reference the claim says scores higher."""
    worse: str
    """The cell or reference it says scores lower."""


@dataclass(kw_only=True)
class Grid:
    name: str
    title: str
    question: str
    budget: Budget
    base: list[str] = field(default_factory=list)
    cells: list[Cell]
    references: list[str]
    claims: list[Claim] = field(default_factory=list)
    source: Path = field(default=Path("."), init=False)
    """The file the grid was read from."""

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise GridError(
            f"{self.source}: no cell '{name}'; cells: {', '.join(c.name for c in self.cells)}"
        )

    @property
    def teacher(self) -> str:
        """The teacher spec every cell distils (the score's reference)."""
        return load_config(None, [*self.budget.overrides(), *self.base]).teacher.spec


@dataclass(frozen=True)
class Unit:
    """One student of the grid: a cell at one distillation seed, with its full config."""

    cell: Cell
    seed: int
    cfg: RunConfig

    @property
    def key(self) -> str:
        return f"{self.cell.name}/seed-{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def student_dir(self) -> Path:
        """Where ``distill`` (and the floor's export) writes the student."""
        return self.run_dir / "student"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def cached(self) -> bool:
        return self.cfg.data.target_cache is not None


@dataclass(frozen=True)
class Layout:
    """Where a grid's runs and its results page go."""

    name: str
    runs: Path
    """RUNS/NAME: the cells' run directories and the shared folders below."""
    out: Path
    """The results folder: the page ``NAME.md`` and its folder ``NAME/``."""

    def run_dir(self, cell: str, seed: int) -> Path:
        return self.runs / cell / f"seed-{seed}"

    def target_cache(self, target: str) -> Path:
        """The shared teacher-target cache of one target kind (``objective.target``)."""
        return self.runs / ("target-cache" if target == "hidden" else f"target-cache-{target}")

    @property
    def references(self) -> Path:
        return self.runs / "references"

    @property
    def features(self) -> Path:
        """The evaluation feature cache, shared (its files are keyed by model fingerprint)."""
        return self.runs / "features"

    @property
    def timings(self) -> Path:
        return self.runs / "timings.json"

    @property
    def page(self) -> Path:
        return self.out / f"{self.name}.md"

    @property
    def assets(self) -> Path:
        """Plots, the summary and copies of every result JSON the page was made from."""
        return self.out / self.name


# ---------------------------------------------------------------------------- loading


def resolve_grid_path(name: str) -> Path:
    """``NAME`` -> configs/experiments/NAME.yaml; a path (with / or .yaml) is taken as it is."""
    path = Path(name) if ("/" in name or name.endswith((".yaml", ".yml"))) else None
    path = path or GRID_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in GRID_DIR.glob("*.yaml"))
        raise GridError(
            f"no grid config {path}; expected a file, or a name of {GRID_DIR}: "
            f"{', '.join(known) or 'none found'}"
        )
    return path


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file (every cell's config included, quick and full)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise GridError(f"{path} is not valid YAML: {err}") from err
    try:
        _check_required(Grid, data, "")
        grid = from_dict(Grid, data)
    except ConfigError as err:
        raise GridError(f"{path}: {err}") from err
    grid.source = path
    validate_grid(grid)
    return grid


def _check_required(cls: type, data: Any, where: str) -> None:
    """``from_dict`` checks the keys given; this names the required ones that are missing."""
    if not isinstance(data, dict):
        return  # from_dict names the type problem
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if _required(f):
                needed = [g.name for g in dataclasses.fields(cls) if _required(g)]
                raise ConfigError(
                    f"missing key '{path}'; expected the keys {', '.join(needed)} there "
                    "(colld.experiments.grid documents each)"
                )
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            _check_required(tp, value, path)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            for i, item in enumerate(value if isinstance(value, list) else []):
                _check_required(typing.get_args(tp)[0], item, f"{path}[{i}]")


def _required(f: dataclasses.Field) -> bool:
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return f.init and no_default


# ---------------------------------------------------------------------------- validation


def validate_grid(grid: Grid) -> None:
    """Every check that needs no model, before any heavy work (GridError names the file)."""
    where = grid.source
    _check(
        grid.name == where.stem,
        where,
        f"name: '{grid.name}' differs from the file's name '{where.stem}'; they must agree "
        "(the page is docs/results/NAME.md)",
    )
    _check(bool(_NAME.fullmatch(grid.name)), where, f"name: '{grid.name}' {_NAME_RULE}")
    for key in ("title", "question"):
        _check(bool(getattr(grid, key).strip()), where, f"{key}: expected text, found ''")
    _validate_budget(grid.budget, where)
    for i, text in enumerate(grid.base):
        _check_override(text, f"base[{i}]", (*BUDGET_KEYS.values(), *RUNNER_KEYS), where)
    try:
        load_config(None, [*grid.budget.overrides(), *grid.base])
    except ConfigError as err:
        raise GridError(f"{where}: budget and base: {err}") from err
    _validate_cells(grid)
    _validate_references(grid)
    _validate_claims(grid)
    for cell in grid.cells:
        for quick in (False, True):
            try:
                cfg = load_config(None, cell_overrides(grid, cell, quick=quick))
            except ConfigError as err:
                mode = " with --quick" if quick else ""
                raise GridError(f"{where}: cell '{cell.name}'{mode}: {err}") from err
            _check(
                not (cell.floor and cfg.data.augment.enabled),
                where,
                f"cell '{cell.name}': a floor cell is never trained; data.augment.enabled=true "
                "has no meaning there (remove it)",
            )
    _check_shared_cache(grid)


_NAME_RULE = "must be lower-case letters, digits, '.', '_' or '-' (it names a folder)"


def _check(ok: bool, where: Path, message: str) -> None:
    if not ok:
        raise GridError(f"{where}: {message}")


def _validate_budget(budget: Budget, where: Path) -> None:
    for key in ("seeds", "probe_seeds"):
        seeds = getattr(budget, key)
        _check(bool(seeds), where, f"budget.{key}: expected at least one seed, found []")
        _check(
            len(set(seeds)) == len(seeds) and min(seeds) >= 0,
            where,
            f"budget.{key}: {seeds}; expected distinct integers >= 0",
        )
    _check(
        budget.expected_minutes > 0,
        where,
        f"budget.expected_minutes: {budget.expected_minutes}; expected minutes > 0",
    )


def _check_override(text: str, key: str, owned: tuple[str, ...], where: Path) -> None:
    try:
        keys, _ = parse_config_override(text)
    except ConfigError as err:
        raise GridError(f"{where}: {key}: {err}") from err
    dotted = ".".join(keys)
    for owner in owned:
        if owner == dotted or owner.startswith(dotted + ".") or dotted.startswith(owner + "."):
            home = next((f"budget.{b}" for b, k in BUDGET_KEYS.items() if k == owner), None)
            why = (
                f"the budget owns it (set {home})"
                if home
                else "the runner sets it"
                if owner in RUNNER_KEYS
                else "every cell must keep base's teacher and data (set it in base)"
            )
            raise GridError(f"{where}: {key}: '{text}' sets {owner}; {why}")


def _validate_cells(grid: Grid) -> None:
    where = grid.source
    _check(bool(grid.cells), where, "cells: expected at least one cell, found []")
    seen: dict[str, int] = {}
    labels: dict[str, str] = {}
    for i, cell in enumerate(grid.cells):
        _check(
            bool(_NAME.fullmatch(cell.name)), where, f"cells[{i}].name: '{cell.name}' {_NAME_RULE}"
        )
        _check(
            cell.name not in RESERVED_NAMES,
            where,
            f"cells[{i}].name: '{cell.name}' is reserved (runs folders {RESERVED_NAMES})",
        )
        _check(
            cell.name not in seen,
            where,
            f"cells[{i}].name: '{cell.name}' is already the name of cells[{seen.get(cell.name)}]; "
            "expected unique cell names",
        )
        _check(
            cell.label not in labels,
            where,
            f"cells[{i}].label: '{cell.label}' is already the label of cell "
            f"'{labels.get(cell.label)}'; expected unique labels",
        )
        seen[cell.name], labels[cell.label] = i, cell.name
        if cell.max_steps is not None:
            _check(
                not cell.floor,
                where,
                f"cells[{i}] ({cell.name}).max_steps: {cell.max_steps}; a floor cell is never "
                "trained, drop max_steps",
            )
            _check(
                isinstance(cell.max_steps, int) and cell.max_steps > 0,
                where,
                f"cells[{i}] ({cell.name}).max_steps: {cell.max_steps!r}; expected an integer > 0",
            )
        owned = (*BUDGET_KEYS.values(), *RUNNER_KEYS, *SHARED_KEYS)
        for key in ("overrides", "quick_overrides"):
            for j, text in enumerate(getattr(cell, key)):
                _check_override(text, f"cells[{i}] ({cell.name}).{key}[{j}]", owned, where)


def _validate_references(grid: Grid) -> None:
    where, refs = grid.source, grid.references
    _check(len(set(refs)) == len(refs), where, f"references: {refs}; expected each model once")
    for needed in (FBANK, grid.teacher):
        _check(
            needed in refs,
            where,
            f"references: {refs} lack '{needed}'; the score is normalised between fbank and the "
            "teacher, so both are required",
        )
    clash = sorted({c.name for c in grid.cells} & set(refs))
    _check(not clash, where, f"references {clash} are also cell names; rename the cells")


def _validate_claims(grid: Grid) -> None:
    known = [c.name for c in grid.cells] + list(grid.references)
    for i, claim in enumerate(grid.claims):
        for side in ("better", "worse"):
            name = getattr(claim, side)
            _check(
                name in known,
                grid.source,
                f"claims[{i}].{side}: '{name}' is neither a cell nor a reference; expected one "
                f"of {', '.join(known)}",
            )
        _check(
            claim.better != claim.worse,
            grid.source,
            f"claims[{i}]: better and worse are both '{claim.better}'; expected two models",
        )


def _check_shared_cache(grid: Grid) -> None:
    """Cells that read the shared target caches (one per ``objective.target``) must agree on
    the segment length that keys them all, so that every cell sees the same segments."""
    first: tuple[str, float | None] | None = None
    for cell in grid.cells:
        cfg = load_config(None, cell_overrides(grid, cell, quick=False))
        if not uses_target_cache(cell, cfg):
            continue
        if first is None:
            first = (cell.name, cfg.data.max_duration)
            continue
        _check(
            cfg.data.max_duration == first[1],
            grid.source,
            f"cell '{cell.name}' sets data.max_duration={cfg.data.max_duration!r} but cell "
            f"'{first[0]}' has {first[1]!r}: the grid's trained cells read teacher-target caches "
            "cut into segments of that length; give them the same value (or enable "
            "augmentation, which runs the teacher online)",
        )


# ---------------------------------------------------------------------------- configs


def uses_target_cache(cell: Cell, cfg: RunConfig) -> bool:
    """Trained cells read the shared cache unless augmentation changes their audio."""
    return not cell.floor and not cfg.data.augment.enabled


def cell_overrides(grid: Grid, cell: Cell, *, quick: bool) -> list[str]:
    """budget (with the cell's own ``max_steps``) <- base <- cell <- (quick); the runner's own
    keys come after these."""
    quick_part = [*QUICK_OVERRIDES, *cell.quick_overrides] if quick else []
    budget = grid.budget.overrides()
    if cell.max_steps is not None:
        budget.append(f"{BUDGET_KEYS['max_steps']}={cell.max_steps}")
    return [*budget, *grid.base, *cell.overrides, *quick_part]


def seeds(grid: Grid, *, quick: bool) -> list[int]:
    """Distillation seeds: the budget's, or its first alone with ``--quick``."""
    return grid.budget.seeds[:1] if quick else list(grid.budget.seeds)


def unit_config(grid: Grid, cell: Cell, seed: int, layout: Layout, *, quick: bool) -> RunConfig:
    """The full config of ``cell`` at ``seed`` (module doc for the order)."""
    runner = [
        f"train.output_dir={json.dumps(str(layout.run_dir(cell.name, seed)))}",
        f"train.seed={seed}",
    ]
    overrides = [*cell_overrides(grid, cell, quick=quick), *runner]
    cfg = load_config(None, overrides)
    if uses_target_cache(cell, cfg):
        cache = json.dumps(str(layout.target_cache(cfg.objective.target)))
        cfg = load_config(None, [*overrides, f"data.target_cache={cache}"])
    return cfg


def plan_units(
    grid: Grid,
    layout: Layout,
    *,
    quick: bool,
    cells: list[str] | None = None,
    only_seeds: Sequence[int] = (),
) -> list[Unit]:
    """Every (cell, seed) to run, seed by seed (every cell at the first seed, then the next),
    cells in the grid's order; ``cells`` picks a subset. Seed-major, so a grid stopped part way
    (it resumes across sessions) already holds one comparable run of every cell."""
    chosen = [grid.cell(name) for name in cells] if cells else grid.cells
    planned = seeds(grid, quick=quick)
    unknown = [seed for seed in only_seeds if seed not in planned]
    if unknown:
        raise ConfigError(
            f"{grid.source}: --seeds {list(unknown)} not among the distillation seeds "
            f"{planned}{' (--quick runs the first only)' if quick else ''}"
        )
    return [
        Unit(cell, seed, unit_config(grid, cell, seed, layout, quick=quick))
        for seed in planned
        if not only_seeds or seed in only_seeds
        for cell in chosen
    ]


def make_layout(
    grid: Grid, *, quick: bool, out: str | Path | None = None, runs: str | Path | None = None
) -> Layout:
    """Full grids write RUNS/NAME and docs/results; quick ones their own folders, and never
    docs/results (quick numbers are a smoke test, not results)."""
    out_dir = Path(out) if out is not None else (QUICK_RESULTS if quick else DOCS_RESULTS)
    runs_dir = Path(runs) if runs is not None else (QUICK_RUNS if quick else RUNS)
    if quick and out_dir.resolve() == DOCS_RESULTS.resolve():
        raise GridError(
            f"--quick writes smoke-test numbers; refusing to write them into {DOCS_RESULTS} "
            f"(leave --out unset for {QUICK_RESULTS})"
        )
    return Layout(name=grid.name, runs=runs_dir / grid.name, out=out_dir)
