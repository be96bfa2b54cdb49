"""Numeric guards and safe loading: a poisoned batch is skipped and named, N bad updates in a
row stop the run with a usable checkpoint, and pickled code in weights or training state is
never run."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import colld.train.recipe as recipe
from colld.cli import main
from colld.teachers.hf import TeacherLoadError, load_hf_teacher
from colld.testing import (
    harmonic_tone,
    logged_steps,
    tiny_distill_argv,
    tiny_teacher_dir,
    write_tones,
)
from colld.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

POISON = "poison"
# The poisoned file overflows numpy's normalisation on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)


# Short clips and batches: the tiny wav2vec2 teacher makes 1600 frames per second, and
# attention cost grows with its square.
SHORT = ("data.max_duration=0.5", "data.batch_seconds=1")


def _poisoned_corpus(directory: Path) -> Path:
    """Eight good tones and one whose samples are finite but huge (~3e38, near float32's
    limit): the front end's normalisation overflows to inf - inf, so every batch holding it
    gives a NaN loss."""
    write_tones(directory, np.random.default_rng(0).uniform(0.3, 0.6, size=8).tolist())
    tone = (0.8 + 0.1 * harmonic_tone(0.4, np.random.default_rng(1))) * np.float32(3e38)
    assert np.isfinite(tone).all()
    sf.write(directory / f"{POISON}.wav", tone, 16000, subtype="FLOAT")
    return directory


def _args(tmp_path: Path, *extra: str) -> list[str]:
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        tiny_teacher_dir("wav2vec2", teacher)
    data = tmp_path / "audio"
    if not data.exists():
        _poisoned_corpus(data)
    return tiny_distill_argv(teacher, data, tmp_path / "run", *SHORT, *extra)


def _skip_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "non-finite loss or gradient" in r.getMessage()
    ]


@pytest.mark.parametrize("target_norm", ["layer_norm", "standardize"])
def test_poisoned_batch_is_skipped_logged_with_its_ids_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target_norm: str
) -> None:
    """With running target statistics the skipped forward pass must not leave NaN in them."""
    caplog.set_level(logging.WARNING, logger="colld.train.recipe")
    norm = f"objective.target_norm={target_norm}"
    assert main(_args(tmp_path, "train.max_steps=8", "train.max_bad_steps=3", norm)) == 0
    skipped = _skip_lines(caplog)
    assert skipped, "the poisoned file was never drawn"
    assert all("batch ids: " in line and POISON in line for line in skipped)
    assert logged_steps(tmp_path / "run", "train/loss") == list(
        range(1, 9)
    )  # skipped updates are not steps
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    for name in ("model.safetensors", "distill_heads.safetensors"):
        weights = load_file(str(tmp_path / "run" / "student" / name))
        assert all(torch.isfinite(t).all() for t in weights.values()), name


def test_bad_updates_in_a_row_stop_with_a_message_and_a_resumable_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(recipe.BadStepsError) as stop:
        main(["-v", *_args(tmp_path, "train.max_steps=10", "train.max_bad_steps=1")])
    message = str(stop.value)
    assert "1 non-finite steps in a row" in message and "train.max_bad_steps=1" in message
    assert "batch ids " in message and POISON in message  # the cause
    assert "--verify" in message and "train.lr" in message  # what to do
    ckpt = latest_checkpoint(tmp_path / "run")
    assert str(ckpt) in message
    loaded = load_checkpoint(ckpt, restore_rng=False)
    assert loaded.state.bad_steps == 1
    assert all(torch.isfinite(t).all() for t in loaded.trainable.values())
    # The checkpoint is usable: the run goes on with a looser guard (a resumable change).
    caplog.set_level(logging.INFO, logger="colld.train.recipe")
    assert main(["distill", "--resume", *_args(tmp_path, "train.max_steps=10")[1:]]) == 0
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    assert logged_steps(tmp_path / "run", "train/loss")[-1] == 10


def test_nan_gradient_with_a_finite_loss_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard looks at the gradient too: update 2's loss is finite, its gradient NaN."""
    real, calls = recipe.distill_loss, []

    def nan_gradient_once(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.total.register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(recipe, "distill_loss", nan_gradient_once)
    caplog.set_level(logging.WARNING, logger="colld.train.recipe")
    args = _args(tmp_path, "train.max_steps=3")
    args[args.index("--data") + 1] = str(write_tones(tmp_path / "clean", [0.4, 0.5, 0.6, 0.45]))
    assert main(args) == 0
    (line,) = _skip_lines(caplog)
    assert line.startswith("step 1: non-finite") and "grad norm nan" in line
    assert "loss nan" not in line  # the loss itself was finite
    assert logged_steps(tmp_path / "run", "train/loss") == [1, 2, 3]


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _write_payload(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"state": _Payload(marker)}, f, protocol=2)


def test_pickled_code_in_a_checkpoint_is_refused_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = tmp_path / "clean"
    args = _args(tmp_path, "train.max_steps=2")
    args[args.index("--data") + 1] = str(write_tones(clean, [0.4, 0.5, 0.6, 0.45]))
    assert main(args) == 0
    ckpt = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "rng.pt"):
        original = (ckpt / name).read_bytes()
        _write_payload(ckpt / name, marker)
        with pytest.raises(CheckpointError, match=f"{name} cannot be read safely"):
            load_checkpoint(ckpt)
        assert not marker.exists()
        (ckpt / name).write_bytes(original)
    _write_payload(ckpt / "scheduler.pt", marker)
    capsys.readouterr()
    assert main(["distill", "--resume", *args[1:]]) == 2  # resuming: refused with the remedy
    err = capsys.readouterr().err
    assert "scheduler.pt cannot be read safely" in err and "Delete that checkpoint" in err
    assert not marker.exists()


def test_teacher_weights_with_pickled_code_are_refused_not_run(tmp_path: Path) -> None:
    teacher = tiny_teacher_dir("wav2vec2", tmp_path / "teacher")
    (teacher / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _write_payload(teacher / "pytorch_model.bin", marker)
    with pytest.raises(TeacherLoadError, match="weights_only=True"):
        load_hf_teacher(str(teacher))
    assert not marker.exists()


def test_teacher_feature_extractor_with_custom_code_needs_trust(tmp_path: Path) -> None:
    teacher = tiny_teacher_dir("wav2vec2", tmp_path / "teacher")
    path = teacher / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoFeatureExtractor": "custom.Extractor"}
    path.write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match="teacher.trust_remote_code=true"):
        load_hf_teacher(str(teacher))
