"""Checkpoint retention (last N + best), the disk-space check before training, atomic writes."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import colld.train.recipe as recipe
from colld.cli import main
from colld.testing import tiny_distill_argv, tiny_teacher_dir, write_tones
from colld.train.checkpoint import (
    DiskSpaceError,
    TrainState,
    best_checkpoint,
    check_disk_space,
    estimate_checkpoint_bytes,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)

# Short clips and batches: the tiny wav2vec2 teacher makes 1600 frames per second, and
# attention cost grows with its square.
SHORT = ("data.max_duration=0.5", "data.batch_seconds=1")


def _names(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


def _toy() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # creates the AdamW moments
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return module, optimizer, scheduler


def _save(run_dir: Path, step: int, best: int | None, keep_last: int = 2) -> Path:
    module, optimizer, scheduler = _toy()
    return save_checkpoint(
        run_dir,
        trainable=module.state_dict(),
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainState(step=step, best_step=best, best_dev_loss=None if best is None else 1.0),
        config_yaml="{}\n",
        keep_last=keep_last,
        keep_steps=() if best is None else (best,),
    )


def test_keep_last_plus_best_and_resume_takes_the_latest(tmp_path: Path) -> None:
    for step in range(1, 7):
        _save(tmp_path, step, best=2 if step >= 2 else None)
    assert _names(tmp_path) == ["step_00000002", "step_00000005", "step_00000006"]
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert best_checkpoint(tmp_path).name == "step_00000002"
    _save(tmp_path, 7, best=7)  # a new best: the old one may go
    assert _names(tmp_path) == ["step_00000006", "step_00000007"]
    assert best_checkpoint(tmp_path).name == "step_00000007"
    _save(tmp_path, 7, best=7)  # the same step again (final save after a periodic one)
    assert _names(tmp_path) == ["step_00000006", "step_00000007"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_leftover_temporary_folders_are_ignored_and_cleaned(tmp_path: Path) -> None:
    _save(tmp_path, 2, best=None)
    partial = tmp_path / "checkpoints" / ".tmp-step_00000004-12345"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    _save(tmp_path, 4, best=None)
    assert not partial.exists()
    assert _names(tmp_path) == ["step_00000002", "step_00000004"]


def test_checkpoint_size_estimate_covers_what_is_written(tmp_path: Path) -> None:
    module, optimizer, _ = _toy()
    path = _save(tmp_path, 1, best=None)
    written = sum(f.stat().st_size for f in path.iterdir())
    estimate = estimate_checkpoint_bytes(module, optimizer)
    assert written <= estimate <= written + (2 << 20)


Usage = namedtuple("Usage", "total used free")


def test_disk_check_names_sizes_and_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 5 * 10**6, 5 * 10**6)
    )
    check_disk_space(tmp_path / "new" / "run", 4 * 10**6)  # 4.4 MB with the margin: fits
    with pytest.raises(DiskSpaceError, match=r"about 6\.0 MB.*5\.0 MB free.*train\.output_dir"):
        check_disk_space(tmp_path / "new" / "run", 6 * 10**6)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    teacher, audio = tmp_path / "teacher", tmp_path / "audio"
    if not teacher.exists():
        tiny_teacher_dir("wav2vec2", teacher)
    if not audio.exists():
        write_tones(audio, np.random.default_rng(0).uniform(0.3, 0.6, size=12).tolist())
    return tiny_distill_argv(teacher, audio, tmp_path / "run", *SHORT, *extra)


def test_full_disk_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    assert main(_args(tmp_path, "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space for a checkpoint" in err
    assert "0.0 MB free" in err and "train.output_dir" in err
    assert not list_checkpoints(tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_keeps_the_best_dev_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted dev losses: the best (step 2) is saved although ckpt_every=3, outlives
    keep_last=1, and resuming takes the latest; a later best replaces it."""
    dev_losses = iter([5.0, 3.0, 1.0, 4.0, 6.0, 7.0, 8.0, 9.0, 0.5])  # steps 0..6, then 7..8
    real = recipe.loss_scalars

    def scripted(out, prefix):
        scalars = real(out, prefix)
        if prefix == "dev":
            scalars["dev/loss"] = next(dev_losses)
        return scalars

    monkeypatch.setattr(recipe, "loss_scalars", scripted)
    common = (
        f"data.dev={tmp_path / 'audio'}",
        "train.eval_every=1",
        "train.eval_batches=1",
        "train.ckpt_every=3",
        "train.keep_last=1",
    )
    assert main(_args(tmp_path, "train.max_steps=6", *common)) == 0
    run_dir = tmp_path / "run"
    assert _names(run_dir) == ["step_00000002", "step_00000006"]
    assert best_checkpoint(run_dir).name == "step_00000002"
    student = run_dir / "student"
    assert not [p.name for p in student.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert main(["distill", "--resume", *_args(tmp_path, "train.max_steps=8", *common)[1:]]) == 0
    assert _names(run_dir) == ["step_00000008"]  # the new best is the latest
    assert best_checkpoint(run_dir).name == "step_00000008"
    with pytest.raises(StopIteration):
        next(dev_losses)  # resumed at 6: steps 7 and 8 evaluated once each


def test_keep_best_false_prunes_like_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        main(_args(tmp_path, "train.max_steps=4", "train.keep_last=1", "train.keep_best=false"))
        == 0
    )
    assert _names(tmp_path / "run") == ["step_00000004"]
