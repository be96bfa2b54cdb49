"""The whole distillation loop on tiny random teachers of every family, through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from colld.cli import main
from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir, write_tones
from colld.train.checkpoint import list_checkpoints


def _audio_dir(out: Path, num: int = 12) -> Path:
    """Noisy harmonic tones of 0.6-2.5 s at 16 kHz (enough structure for a few steps)."""
    return write_tones(out, np.random.default_rng(0).uniform(0.6, 2.5, size=num).tolist())


def _args(tmp_path: Path, family: str, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    """CLI arguments of a tiny run of ``family`` (teacher and audio made on first use)."""
    teacher = tmp_path / f"teacher-{family}"
    if not teacher.exists():
        tiny_teacher_dir(family, teacher)
    data = tmp_path / "audio"
    if not data.exists():
        _audio_dir(data)
    paths = ["--teacher", str(teacher), "--data", str(data)]
    return [
        "distill",
        *flags,
        *paths,
        "--output",
        str(tmp_path / f"run-{family}"),
        *TINY_RUN_OVERRIDES,
        *extra,
    ]


def _run(tmp_path: Path, family: str, *extra: str) -> Path:
    assert main(_args(tmp_path, family, "train.max_steps=4", *extra)) == 0
    return tmp_path / f"run-{family}"


@pytest.mark.parametrize(
    "family", ["whisper", "wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert"]
)
def test_distill_every_family_end_to_end(tmp_path: Path, family: str) -> None:
    run_dir = _run(tmp_path, family)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any(k.startswith("train/acc/") for k in rows[-1])  # contrastive accuracy is logged
    assert any(k.startswith("train/student_std/") for k in rows[-1])  # collapse monitor
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002", "step_00000004"]
    student = run_dir / "student"
    assert (student / "model.safetensors").is_file()
    assert (student / "distill_heads.safetensors").is_file()
    assert (student / "preprocessor_config.json").is_file()


def test_resume_refuses_changed_config_and_continues(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "wav2vec2")
    # A changed objective: refused (with or without --resume), nothing overwritten.
    assert main(_args(tmp_path, "wav2vec2", "train.max_steps=6", "objective.tau=0.5")) == 2
    resume = ("--resume",)
    assert (
        main(_args(tmp_path, "wav2vec2", "train.max_steps=6", "objective.tau=0.5", flags=resume))
        == 2
    )
    # More steps: continues from step 4 (--resume is implied by an existing checkpoint).
    assert main(_args(tmp_path, "wav2vec2", "train.max_steps=6", flags=resume)) == 0
    # The same command again: idempotent, nothing trained twice.
    assert main(_args(tmp_path, "wav2vec2", "train.max_steps=6")) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert list_checkpoints(run_dir)[-1].name == "step_00000006"


def test_pruned_student_distills_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """student.init=prune through the CLI: the plan is measured on training audio before the
    student exists, the heads start on the kept channels, each student layer is trained on the
    teacher layer it was cut from (layer_map=source), and a resumed run plans the same."""
    caplog.set_level(logging.INFO, logger="colld")
    # init=auto prunes a Whisper teacher where the student keeps whole heads (here 8 dims)
    extra = ("student.init=auto", "student.prune_seconds=4", "objective.layer_map=source")
    run_dir = _run(tmp_path, "whisper", *extra)
    plans = [r.getMessage() for r in caplog.records if "init='prune': teacher" in r.getMessage()]
    assert len(plans) == 1 and "keeps teacher layers" in plans[0]
    kept = yaml.safe_load(plans[0].split("keeps teacher layers ")[1].split("]")[0] + "]")
    assert "calibration audio: " in caplog.text
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["student"]["init"] == "auto" and config["objective"]["head_init"] == "select"
    assert config["objective"]["layer_map"] == "source"  # as asked: a resume compares this
    provenance = json.loads((run_dir / "student" / "colld.json").read_text())
    assert provenance["student_init"] == {"init": "prune", "from_layers": kept}
    card = (run_dir / "student" / "README.md").read_text()
    assert (
        f"Initialisation: structured pruning of the teacher by activation importance, from teacher layers {kept}"
        in card
    )
    assert provenance["objective"]["layer_map"] == kept  # the export records the resolved map
    assert provenance["pairs"] == [[i + 1, j] for i, j in enumerate(kept)]
    caplog.clear()
    assert main(_args(tmp_path, "whisper", "train.max_steps=6", *extra)) == 0
    again = [r.getMessage() for r in caplog.records if "init='prune': teacher" in r.getMessage()]
    assert again == plans
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_prediction_heads_and_l1cos_baselines_run(tmp_path: Path) -> None:
    run_dir = _run(
        tmp_path,
        "hubert",
        "objective.mode=prediction-heads",
        "objective.loss=l1cos",
        "objective.mask=false",
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    parts = [k for k in rows[-1] if k.startswith("train/loss/")]
    assert parts and all(k.startswith("train/loss/s2->") for k in parts)  # last student layer only


def test_non_finite_steps_are_skipped_then_stop_with_good_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN loss never reaches the weights; N bad steps in a row stop the run cleanly."""
    from safetensors.torch import load_file

    import colld.train.recipe as recipe

    real = recipe.distill_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(recipe, "distill_loss", poisoned)
    code = main(_args(tmp_path, "wav2vec2", "train.max_steps=4", "train.max_bad_steps=3"))
    assert code == 1  # stopped with a message, not a traceback
    assert "3 non-finite steps in a row" in capsys.readouterr().err
    ckpt = list_checkpoints(tmp_path / "run-wav2vec2")[-1]
    assert ckpt.name == "step_00000000"  # no step was applied
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_run_written_before_a_config_key_existed_still_continues(tmp_path: Path) -> None:
    import yaml

    run = _run(tmp_path, "whisper")
    for ckpt in list_checkpoints(run):
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
        del saved["objective"]["batch_negatives"]  # as written by an older colld
        (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(_args(tmp_path, "whisper", "train.max_steps=6")) == 0
    assert list_checkpoints(run)[-1].name == "step_00000006"
