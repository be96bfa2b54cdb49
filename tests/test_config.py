"""Config: defaults, YAML + overrides, typed checks, unknown keys, validation, every shipped file."""

from __future__ import annotations

from pathlib import Path

import pytest

from colld.config import (
    QUICK_OVERRIDES,
    ConfigError,
    RunConfig,
    from_dict,
    load_config,
    parse_override,
    resolve,
    to_dict,
)
from colld.experiments.grid import load_grid

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_colld() -> None:
    cfg = load_config()
    assert cfg.teacher.spec == "whisper-base"
    assert cfg.objective.loss == "contrastive"
    assert cfg.objective.mask is True
    assert cfg.objective.tau == pytest.approx(0.1)
    assert cfg.objective.num_negatives == 100


@pytest.mark.parametrize(
    ("overrides", "head_init"),
    [
        ([], "select"),  # the default: teacher-initialised student, heads aligned with it
        (["student.init=random"], "random"),
        (["objective.head_hidden_dim=64"], "random"),  # select needs single-Linear heads
        (["objective.head_init=random"], "random"),  # an explicit choice is kept
        (["student.init=random", "objective.head_init=select"], "select"),
    ],
)
def test_head_init_auto_follows_student_init(overrides: list[str], head_init: str) -> None:
    cfg = load_config(None, overrides)
    assert cfg.objective.head_init == head_init
    assert resolve(cfg) == cfg  # idempotent: what a run records is what it used
    assert "auto" not in str(to_dict(cfg)["objective"])


def test_default_student_starts_from_the_teacher() -> None:
    assert load_config().student.init == "auto"  # prune where it can, else weight selection
    assert RunConfig().objective.head_init == "auto"  # resolved only by load_config / setup


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  tau: 0.2\ntrain:\n  max_steps: 50\n  warmup_steps: 5\n")
    cfg = load_config(path, ["objective.tau=0.05", "objective.layer_map=[2, 4, 6]"])
    assert cfg.objective.tau == pytest.approx(0.05)  # override wins over the file
    assert cfg.train.max_steps == 50  # file wins over the default
    assert cfg.objective.layer_map == [2, 4, 6]


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"objective\.tua.*did you mean 'tau'"):
        load_config(None, ["objective.tua=0.1"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps.*integer.*'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"objective\.mask.*true or false"):
        load_config(None, ["objective.mask=yes please"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.tau=0", "tau"),
        ("objective.tau=-1", "tau"),
        ("objective.num_negatives=0", "num_negatives"),
        ("train.lr=0", "train.lr"),
        ("data.batch_seconds=5", "batch_seconds"),
        ("train.precision=fp8", "precision"),
    ],
)
def test_bad_values_stop_before_work(override: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(None, [override, "data.max_duration=10"])


def test_override_values_are_yaml_not_code() -> None:
    keys, value = parse_override("train.output_dir=__import__('os').getcwd()")
    assert keys == ["train", "output_dir"]
    assert value == "__import__('os').getcwd()"  # a plain string, never evaluated


def test_round_trip_through_dict() -> None:
    cfg = load_config(None, list(QUICK_OVERRIDES))
    again = from_dict(RunConfig, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_every_shipped_config_loads() -> None:
    # configs/accelerate/ holds accelerate launcher configs and configs/experiments/ grids
    # (colld experiment), not colld run configs.
    other = ("accelerate", "experiments")
    files = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not set(other) & set(p.parts))
    assert len(files) >= 1, "configs/ should ship at least one recipe"
    for path in files:
        load_config(path)
        assert path.read_text().startswith("#"), f"{path} needs a header comment with its command"
    grids = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert len(grids) >= 3
    for path in grids:
        load_grid(path)
        assert path.read_text().startswith("#"), f"{path} needs a header comment with its command"


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'train: !!python/object/apply:os.mkdir ["{marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        load_config(None, [f"train.output_dir=!!python/object/apply:os.mkdir ['{marker}']"])
    assert not marker.exists()


def test_code_in_an_override_is_a_string_or_refused() -> None:
    cfg = load_config(None, ["train.output_dir=__import__('os').getcwd()"])
    assert cfg.train.output_dir == "__import__('os').getcwd()"
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer"):
        load_config(None, ["train.max_steps=__import__('os').cpu_count()"])


def test_hardening_options() -> None:
    cfg = load_config()
    assert cfg.train.keep_best is True and cfg.train.deterministic is False
    cfg = load_config(None, ["train.keep_best=false", "train.deterministic=true"])
    assert cfg.train.keep_best is False and cfg.train.deterministic is True
    with pytest.raises(ConfigError, match=r"train\.keep_best.*true or false"):
        load_config(None, ["train.keep_best=maybe"])


def test_exponent_without_a_dot_is_a_number() -> None:
    """YAML 1.1 reads 1e-4 as a string; float fields accept it (overrides and files alike)."""
    cfg = load_config(None, ["train.lr=1e-4", "objective.tau=5E-2"])
    assert cfg.train.lr == 1e-4 and cfg.objective.tau == 0.05
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["train.lr=fast"])
