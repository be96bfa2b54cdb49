"""``colld experiment``: grid validation, the results table and claims on known numbers, the
skip-finished logic, and (slow) a quick two-cell grid through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from colld.cli import main
from colld.config import ConfigError, to_dict
from colld.eval.evaluate import SCHEMA, EvalSettings
from colld.experiments import runner
from colld.experiments.grid import (
    GRID_DIR,
    GridError,
    Layout,
    load_grid,
    make_layout,
    plan_units,
    unit_config,
)
from colld.experiments.runner import eval_settings, unit_finished, unit_result_path
from colld.experiments.summary import (
    CLAIMS_BEGIN,
    CLAIMS_END,
    FAILS,
    HOLDS,
    NO_SPREAD,
    NOT_RUN,
    WITHIN,
    PageInfo,
    StudentFiles,
    read_monitor,
    summarize,
    write_page,
)
from colld.students.export import PROVENANCE_FILE
from colld.testing import fake_result

REPO = Path(__file__).resolve().parents[1]


def _grid(**changes: Any) -> dict[str, Any]:
    grid: dict[str, Any] = {
        "name": "grid",
        "title": "a test grid",
        "question": "Does a beat b?",
        "budget": {
            "corpus_hours": 0.05,
            "max_steps": 20,
            "batch_seconds": 24,
            "seeds": [0, 1, 2],
            "probe_seeds": [0],
            "expected_minutes": 5,
        },
        "base": ["train.warmup_steps=2"],
        "cells": [
            {"name": "a", "label": "A", "overrides": ["objective.loss=contrastive"]},
            {"name": "b", "label": "B", "overrides": ["objective.loss=l1cos"]},
            {"name": "c", "label": "C"},
            {"name": "d", "label": "D (one seed)"},
            {"name": "e", "label": "E (never run)"},
            {"name": "floor", "label": "untrained", "floor": True},
        ],
        "references": ["fbank", "whisper-base", "whisper-tiny.en"],
        "claims": [
            {"claim": "a beats b", "better": "a", "worse": "b"},
            {"claim": "b beats a", "better": "b", "worse": "a"},
            {"claim": "a beats c", "better": "a", "worse": "c"},
            {"claim": "a beats tiny", "better": "a", "worse": "whisper-tiny.en"},
            {
                "claim": "tiny beats the teacher",
                "better": "whisper-tiny.en",
                "worse": "whisper-base",
            },
            {"claim": "a beats d", "better": "a", "worse": "d"},
            {"claim": "a beats e", "better": "a", "worse": "e"},
            {"claim": "floor beats tiny", "better": "floor", "worse": "whisper-tiny.en"},
            {"claim": "b beats the floor", "better": "b", "worse": "floor"},
        ],
    }
    grid.update(changes)
    return grid


def _write_grid(tmp_path: Path, grid: dict[str, Any]) -> Path:
    path = tmp_path / f"{grid.get('name', 'grid')}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _error(tmp_path: Path, grid: dict[str, Any]) -> str:
    path = _write_grid(tmp_path, grid)
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


# ---------------------------------------------------------------------------- validation


# Every grid of configs/experiments; ablation's --quick run has a test of its own below.
GRIDS = [
    "ablation",
    "collapse",
    "hours",
    "masking",
    "sensitivity",
    "shape",
    "steps",
    "target-layers",
    "targets",
    "vs-compression",
]


def test_the_repos_grids_load() -> None:
    paths = sorted((REPO / GRID_DIR).rglob("*.yaml"))
    assert [p.stem for p in paths] == GRIDS
    for path in paths:
        grid = load_grid(path)
        assert grid.teacher == "whisper-base"


def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][0]["overides"] = grid["cells"][0].pop("overrides")
    message = _error(tmp_path, grid)
    assert "cells[0].overides" in message and "did you mean 'overrides'" in message


def test_a_bad_override_names_the_cell_and_the_key(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][1]["overrides"] = ["objective.tua=0.1"]
    message = _error(tmp_path, grid)
    assert "cell 'b'" in message and "objective.tua" in message


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    grid = _grid()
    del grid["budget"]["max_steps"]
    assert "missing key 'budget.max_steps'" in _error(tmp_path, grid)


def test_an_unknown_cell_in_a_claim_is_named(tmp_path: Path) -> None:
    grid = _grid(claims=[{"claim": "x", "better": "a", "worse": "zz"}])
    message = _error(tmp_path, grid)
    assert "claims[0].worse: 'zz'" in message and "a, b, c" in message


def test_duplicate_cell_names_are_refused(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][1]["name"] = "a"
    assert "cells[1].name: 'a' is already the name of cells[0]" in _error(tmp_path, grid)


def test_budget_and_runner_keys_have_one_home(tmp_path: Path) -> None:
    assert "budget.max_steps" in _error(tmp_path, _grid(base=["train.max_steps=5"]))
    grid = _grid()
    grid["cells"][0]["overrides"] = ["train.seed=3"]
    assert "the runner sets it" in _error(tmp_path, grid)
    grid["cells"][0]["overrides"] = ["teacher.spec=whisper-tiny.en"]
    assert "keep base's teacher" in _error(tmp_path, grid)


def test_a_cell_may_have_its_own_step_budget(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][1]["max_steps"] = 60
    loaded = load_grid(_write_grid(tmp_path, grid))
    layout = make_layout(loaded, quick=False, out=str(tmp_path / "out"), runs=str(tmp_path))
    steps = {c.name: unit_config(loaded, c, 0, layout, quick=False).train.max_steps
             for c in loaded.cells if not c.floor}  # fmt: skip
    assert steps == {"a": 20, "b": 60, "c": 20, "d": 20, "e": 20}
    grid["cells"][5]["max_steps"] = 60  # the floor cell
    assert "a floor cell is never trained" in _error(tmp_path, grid)
    grid["cells"][5].pop("max_steps")
    grid["cells"][1]["max_steps"] = 0
    assert "cells[1] (b).max_steps: 0; expected an integer > 0" in _error(tmp_path, grid)


def test_quick_overrides_apply_with_quick_only(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][0]["overrides"] = ["data.train_hours=0.5"]
    grid["cells"][0]["quick_overrides"] = ["data.train_hours=0.01"]
    loaded = load_grid(_write_grid(tmp_path, grid))
    layout = make_layout(loaded, quick=False, out=str(tmp_path / "out"), runs=str(tmp_path))
    cell = loaded.cells[0]
    assert unit_config(loaded, cell, 0, layout, quick=False).data.train_hours == 0.5
    assert unit_config(loaded, cell, 0, layout, quick=True).data.train_hours == 0.01
    grid["cells"][0]["quick_overrides"] = ["train.seed=1"]
    assert "quick_overrides[0]" in _error(tmp_path, grid)
    grid["cells"][0]["quick_overrides"] = ["data.train_hours=-1"]
    assert "cell 'a' with --quick" in _error(tmp_path, grid)


def test_one_target_cache_per_target_kind_and_one_segment_length(tmp_path: Path) -> None:
    grid = _grid()
    grid["cells"][1]["overrides"] = ["objective.target=ffn"]
    loaded = load_grid(_write_grid(tmp_path, grid))
    layout = make_layout(loaded, quick=False, out=str(tmp_path / "out"), runs=str(tmp_path))
    caches = {c.name: unit_config(loaded, c, 0, layout, quick=False).data.target_cache
              for c in loaded.cells}  # fmt: skip
    grid_runs = tmp_path / loaded.name
    assert caches["a"] == caches["c"] == str(grid_runs / "target-cache")
    assert caches["b"] == str(grid_runs / "target-cache-ffn")
    assert caches["floor"] is None  # never trained
    grid["cells"][2]["overrides"] = ["data.max_duration=10"]
    message = _error(tmp_path, grid)
    assert "cell 'c' sets data.max_duration=10.0 but cell 'a' has" in message


def test_references_must_hold_fbank_and_the_teacher(tmp_path: Path) -> None:
    message = _error(tmp_path, _grid(references=["fbank", "whisper-tiny.en"], claims=[]))
    assert "lack 'whisper-base'" in message


def test_quick_never_writes_docs_results(tmp_path: Path) -> None:
    grid = load_grid(_write_grid(tmp_path, _grid()))
    with pytest.raises(GridError, match="refusing"):
        make_layout(grid, quick=True, out="docs/results")
    assert make_layout(grid, quick=True).out == Path("runs/experiments-quick/results")


def test_cli_bad_grid_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_grid(tmp_path, _grid(claims=[{"claim": "x", "better": "a", "worse": "zz"}]))
    assert main(["experiment", str(path), "--runs", str(tmp_path / "runs")]) == 2
    assert "zz" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the numbers


def _result(label: str, kind: str, lid: float, sid: float, **extra: Any) -> dict[str, Any]:
    # probe-dev: a student's LID 0.02 higher than on probe-test (its dev score 25 higher), a
    # reference's the same
    dev = {"lid": lid + (0.02 if kind == "student" else 0.0), "sid": sid}
    return fake_result(label, kind, {"lid": lid, "sid": sid}, parameters=6e6, dev=dev, **extra)


def _dump(path: Path, result: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


# Scores (fbank lid .5 sid .2, teacher lid .9 sid .6): 2500 x (lid - .5) and 2500 x (sid - .2),
# averaged. a: 500/525/550, b: 250 x 3, c: 525/500/475, d: 600 (one seed), tiny: 750.
_STUDENTS = {
    "a": [(0.70, 0.40), (0.72, 0.40), (0.74, 0.40)],
    "b": [(0.60, 0.30)] * 3,
    "c": [(0.70, 0.42), (0.70, 0.40), (0.70, 0.38)],
    "d": [(0.74, 0.44)],
    "floor": [(0.52, 0.22)] * 3,
}


def _metrics(path: Path, seed: int, collapse: bool) -> Path:
    """A run's metrics.jsonl: dev evaluations at steps 0 and 80 (a training row between), two
    student layers; with ``collapse`` layer s2's std falls to a tenth (seed 1: a fifth)."""
    end = (0.1 if seed == 0 else 0.2) if collapse else 1.0
    rows = [
        {"step": 0, "dev/loss": 4.0, "dev/student_std/s1": 0.5, "dev/student_std/s2": 0.8},
        {"step": 40, "train/loss": 3.0},
        {"step": 80, "dev/loss": 2.0, "dev/student_std/s1": 0.5, "dev/student_std/s2": 0.8 * end},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fabricated(tmp_path: Path) -> tuple[dict[str, list[StudentFiles]], dict[str, Path]]:
    refs = {
        "fbank": _result("fbank", "fbank", 0.5, 0.2),
        "whisper-base": _result("whisper-base", "teacher", 0.9, 0.6),
        "whisper-tiny.en": _result("whisper-tiny.en", "teacher", 0.8, 0.5),
    }
    references = {spec: _dump(tmp_path / "refs" / f"{spec}.json", r) for spec, r in refs.items()}
    students = {
        cell: [
            StudentFiles(
                seed,
                _dump(tmp_path / cell / f"seed-{seed}.json", _result(f"student:seed-{seed}", "student", lid, sid)),
                # a and c have run metrics (c collapsing); the others none (like old runs)
                _metrics(tmp_path / cell / f"seed-{seed}.metrics.jsonl", seed, cell == "c")
                if cell in ("a", "c") else None,
            )
            for seed, (lid, sid) in enumerate(values)
        ]
        for cell, values in _STUDENTS.items()
    }  # fmt: skip
    return students, references


def test_table_and_claims_on_known_numbers(tmp_path: Path) -> None:
    grid = load_grid(_write_grid(tmp_path, _grid()))
    students, references = _fabricated(tmp_path)
    summary = summarize(grid, students, references)

    a = summary.row("a")
    assert a.tasks["lid"].mean == pytest.approx(0.72) and a.tasks["lid"].std == pytest.approx(0.02)
    assert a.score.values == pytest.approx((500, 525, 550))
    assert (a.score.mean, a.score.std) == pytest.approx((525, 25))
    assert a.dev_score.values == pytest.approx((525, 550, 575))
    assert summary.row("b").score.std == pytest.approx(0)
    assert summary.row("d").score.std is None
    assert summary.row("e") is None
    assert summary.row("whisper-tiny.en").score.values == pytest.approx((750,))
    assert summary.row("fbank").score.values == pytest.approx((0,))

    verdicts = {v.claim.claim: v for v in summary.verdicts}
    assert verdicts["a beats b"].difference == pytest.approx(275)
    assert verdicts["a beats b"].combined_std == pytest.approx(25)
    assert verdicts["a beats b"].verdict == HOLDS
    assert verdicts["b beats a"].verdict == FAILS
    assert verdicts["a beats c"].combined_std == pytest.approx(25 * 2**0.5)
    assert verdicts["a beats c"].verdict == WITHIN  # 25 < 2 x 35.4
    assert verdicts["a beats tiny"].combined_std == pytest.approx(25)  # a reference counts 0
    assert verdicts["a beats tiny"].verdict == FAILS
    assert verdicts["a beats b"].dev_difference == pytest.approx(275)
    assert verdicts["a beats tiny"].dev_difference == pytest.approx(-200)
    assert verdicts["tiny beats the teacher"].verdict == NO_SPREAD
    assert verdicts["a beats d"].verdict == NO_SPREAD
    assert verdicts["a beats e"].verdict == NOT_RUN
    # A floor's seeds agree (it is the teacher's weights): against a reference nothing measures
    # noise, however small the difference; against a trained cell its 0 counts like a reference's.
    assert verdicts["floor beats tiny"].verdict == NO_SPREAD
    assert verdicts["b beats the floor"].verdict in (HOLDS, FAILS)

    layout = Layout(name="grid", runs=tmp_path / "runs", out=tmp_path / "out")
    info = PageInfo(
        title="t",
        question="q?",
        command="colld experiment grid",
        machine={"platform": "linux", "cpus": 2, "torch": "2.x"},
        date="today",
        wall_seconds=60,
        recorded_seconds=120,
        budget_line="b",
    )
    page = write_page(summary, info, layout).read_text()
    assert (
        "| A | `a` | 0,1,2 | 6.00 | 0.720 ± 0.020 | 0.400 ± 0.000 | 525 ± 25 | 550 ± 25 |" in page
    )
    assert "| whisper-tiny.en | reference | — | 6.00 | 0.800 | 0.500 | 750 | 750 |" in page
    claims = page[page.index(CLAIMS_BEGIN) : page.index(CLAIMS_END)]
    assert "| a beats b | `a` | `b` | 275 | 25 | holds | 275 |" in claims
    monitor = page[page.index("## Distillation monitor") : page.index("## Claims")]
    assert (
        "| A | `a` | 0 -> 80 | 4.000 -> 2.000 | 0.5 (0.5) / 0.8 (0.8) | 1.00 ± 0.00 | 525 ± 25 |"
        in monitor
    )
    assert (
        "| C | `c` | 0 -> 80 | 4.000 -> 2.000 | 0.5 (0.5) / 0.133 (0.8) | 0.17 ± 0.06 | 500 ± 25 |"
        in monitor
    )
    assert "`b`" not in monitor  # no metrics: no monitor row
    assert "Seed spread" in page
    assets = tmp_path / "out" / "grid"
    assert "[grid/c-seed-1.metrics.jsonl](grid/c-seed-1.metrics.jsonl)" in page
    assert "b-seed-0.metrics.jsonl" not in page
    names = ("a-seed-2.json", "c-seed-0.metrics.jsonl", "floor-seed-0.json", "fbank.json")
    for name in (*names, "tasks.png", "summary.json"):
        assert (assets / name).is_file(), name
    saved = json.loads((assets / "summary.json").read_text())
    assert saved["claims"][0]["verdict"] == HOLDS
    assert saved["rows"][0]["dev_score"]["mean"] == pytest.approx(550)
    assert saved["rows"][2]["min_std_ratio"]["mean"] == pytest.approx(0.5 / 3)


def test_read_monitor(tmp_path: Path) -> None:
    monitor = read_monitor(_metrics(tmp_path / "m.jsonl", 0, collapse=True))
    assert monitor is not None
    assert monitor.steps == (0, 80) and monitor.loss == (4.0, 2.0)
    assert monitor.std == {"s1": (0.5, 0.5), "s2": (0.8, pytest.approx(0.08))}
    assert monitor.min_std_ratio == pytest.approx(0.1)
    assert read_monitor(None) is None
    assert read_monitor(tmp_path / "missing.jsonl") is None
    (tmp_path / "train-only.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    assert read_monitor(tmp_path / "train-only.jsonl") is None


# ---------------------------------------------------------------------------- resuming


def _finish(unit: Any, settings: EvalSettings) -> None:
    """Fabricate what a finished unit leaves: an exported student and its result file."""
    from colld.teachers.hf import weight_files_fingerprint

    unit.student_dir.mkdir(parents=True)
    (unit.student_dir / "model.safetensors").write_bytes(f"weights of {unit.key}".encode())
    steps = 0 if unit.cell.floor else unit.cfg.train.max_steps
    provenance = {"config": to_dict(unit.cfg), "steps": steps}
    (unit.student_dir / PROVENANCE_FILE).write_text(json.dumps(provenance))
    result = {
        "schema": SCHEMA,
        "settings": settings.key(),
        "fingerprint": weight_files_fingerprint(unit.student_dir),
    }
    _dump(unit_result_path(unit), result)


def test_finished_units_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = load_grid(_write_grid(tmp_path, _grid()))
    layout = make_layout(grid, quick=False, out=tmp_path / "out", runs=tmp_path / "runs")
    units = plan_units(grid, layout, quick=False, cells=["a", "floor"])
    settings = eval_settings(grid, "data/corpus", quick=False)
    assert [u.key for u in units][:3] == ["a/seed-0", "floor/seed-0", "a/seed-1"]
    assert not any(unit_finished(u, settings) for u in units)
    for unit in (units[0], units[-1]):  # a/seed-0 and the floor at seed 2
        _finish(unit, settings)
    assert [unit_finished(u, settings) for u in units] == [True] + [False] * 4 + [True]

    only = plan_units(grid, layout, quick=False, cells=["a", "floor"], only_seeds=[1])
    assert [u.key for u in only] == ["a/seed-1", "floor/seed-1"]
    with pytest.raises(ConfigError, match=r"--seeds \[7\] not among the distillation seeds"):
        plan_units(grid, layout, quick=False, only_seeds=[7])

    # another probe setting, another config or changed weights: not finished any more
    assert not unit_finished(units[0], eval_settings(grid, "data/corpus", quick=True))
    other = plan_units(grid, layout, quick=True, cells=["a"])[0]
    assert other.student_dir == units[0].student_dir and not unit_finished(other, settings)
    (units[-1].student_dir / "model.safetensors").write_bytes(b"retrained")
    assert not unit_finished(units[-1], settings)

    ran: list[str] = []
    monkeypatch.setattr(runner, "run_unit", lambda unit, *_: ran.append(unit.key))
    left = [u for u in units if not unit_finished(u, settings)]
    timings = runner.Timings(layout.timings)
    students = runner._run_units(grid, units, left, settings, layout, timings, quick=False)
    assert ran == [u.key for u in units[1:]]
    assert [files.seed for files in students["a"]] == [0, 1, 2]
    assert students["a"][0].metrics == units[0].run_dir / "metrics.jsonl"
    assert set(timings.seconds) == set(ran)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow  # two quick cells, three quick reference evaluations: minutes on 2 cores
def test_quick_ablation_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # configs/experiments and data/corpus-quick
    argv = ["experiment", "ablation", "--quick", "--cells", "floor,colld"]
    argv += ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    assert main(argv) == 0
    page = tmp_path / "out" / "ablation.md"
    assert page.is_file()
    text = page.read_text()
    assert "CoLLD (contrastive + mask)" in text and "untrained student (floor)" in text
    assets = tmp_path / "out" / "ablation"
    for name in ("colld-seed-0.json", "floor-seed-0.json", "fbank.json", "whisper-base.json"):
        assert json.loads((assets / name).read_text())["schema"] == SCHEMA
    floor = json.loads((tmp_path / "runs/ablation/floor/seed-0/student/colld.json").read_text())
    assert floor["steps"] == 0
    capsys.readouterr()
    assert main(argv) == 0  # a rerun skips both cells
    assert capsys.readouterr().out.count("finished, skipped") == 2


@pytest.mark.slow  # one quick cell and three quick reference evaluations per grid
@pytest.mark.parametrize("name", [g for g in GRIDS if g != "ablation"])
def test_every_grid_runs_quick(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    first = load_grid(REPO / GRID_DIR / f"{name}.yaml").cells[0].name
    argv = ["experiment", name, "--quick", "--cells", first]
    assert main([*argv, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]) == 0
    page = (tmp_path / "out" / f"{name}.md").read_text()
    assert "## Distillation monitor" in page and f"| `{first}` | 0 -> " in page
    result = json.loads((tmp_path / "out" / name / f"{first}-seed-0.json").read_text())
    assert result["schema"] == SCHEMA
