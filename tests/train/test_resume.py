"""Exact resume: SIGKILL a training process at a random step and in the middle of a checkpoint
write, resume it, and end with the weights of an uninterrupted run; config changes that matter
are refused by name."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from colld.cli import main
from colld.testing import kill_when, logged_steps, tiny_distill_argv, tiny_teacher_dir, write_tones
from colld.train.checkpoint import STALL_ENV, latest_checkpoint, list_checkpoints, load_checkpoint

MAX_STEPS = 10
CKPT_EVERY = 2
STARTUP_TIMEOUT_S = 120.0


# Short clips and batches: the tiny wav2vec2 teacher makes 1600 frames per second, and
# attention cost grows with its square.
SHORT = ("data.max_duration=0.5", "data.batch_seconds=1")


def _inputs(tmp_path: Path, family: str) -> tuple[Path, Path]:
    teacher, audio = tmp_path / f"teacher-{family}", tmp_path / "audio"
    if not teacher.exists():
        tiny_teacher_dir(family, teacher)
    if not audio.exists():
        write_tones(audio, np.random.default_rng(0).uniform(0.3, 0.6, size=12).tolist())
    return teacher, audio


def _args(tmp_path: Path, family: str, run: str, *extra: str) -> list[str]:
    teacher, audio = _inputs(tmp_path, family)
    return tiny_distill_argv(
        teacher,
        audio,
        tmp_path / run,
        *SHORT,
        f"train.max_steps={MAX_STEPS}",
        f"train.ckpt_every={CKPT_EVERY}",
        *extra,
    )


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """``python -m colld`` with one intra-op thread (exact results need the same count)."""
    full_env = {k: v for k, v in os.environ.items() if k != STALL_ENV}
    full_env.update({"OMP_NUM_THREADS": "1", **env})
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "colld", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """In-process runs with train.deterministic=true switch global torch flags: undo them."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:3]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    for name in ("student/model.safetensors", "student/distill_heads.safetensors"):
        got, want = load_file(str(run_dir / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    got = load_checkpoint(latest_checkpoint(run_dir), restore_rng=False)
    want = load_checkpoint(latest_checkpoint(reference), restore_rng=False)
    assert got.state.step == want.state.step == MAX_STEPS
    assert all(torch.equal(got.trainable[k], want.trainable[k]) for k in want.trainable)


def _kill_resume_cycle(tmp_path: Path, family: str, seed: int, deterministic: bool = True) -> None:
    """Reference run; a run killed at a random step, resumed, killed inside a checkpoint
    write, resumed to the end; both end with identical weights. The runs that are killed are
    ``python -m colld`` subprocesses; the others run in this process (one intra-op thread,
    as tests/conftest.py sets, the same as the subprocesses) to save their start-up time."""
    log = tmp_path / f"{family}-{seed}.log"
    flag = f"train.deterministic={str(deterministic).lower()}"
    assert main(_args(tmp_path, family, "reference", flag)) == 0
    reference = tmp_path / "reference"
    assert logged_steps(reference) == list(range(1, MAX_STEPS + 1))

    rng = random.Random(seed)
    kill_step = rng.randint(1, MAX_STEPS - 4)
    args = _args(tmp_path, family, "killed", flag)
    resume_args = ["distill", "--resume", *args[1:]]
    run_dir = tmp_path / "killed"
    proc = _start(args, log)
    kill_when(
        proc,
        lambda: max(logged_steps(run_dir), default=0) >= kill_step,
        "the kill",
        log,
        STARTUP_TIMEOUT_S,
    )
    before = latest_checkpoint(run_dir)
    resumed_from = 0 if before is None else load_checkpoint(before, restore_rng=False).state.step
    assert resumed_from < MAX_STEPS

    # Resume, and kill it while it writes the next checkpoint but one (part of the files done).
    stall_step = min((resumed_from // CKPT_EVERY + 2) * CKPT_EVERY, MAX_STEPS)
    marker = f"{STALL_ENV}={stall_step}: stalling"
    proc = _start(resume_args, log, **{STALL_ENV: str(stall_step)})
    kill_when(
        proc,
        lambda: marker in log.read_text(),
        "the stalled checkpoint write",
        log,
        STARTUP_TIMEOUT_S,
    )
    partial = list((run_dir / "checkpoints").glob(f".tmp-step_{stall_step:08d}-*"))
    assert len(partial) == 1 and (partial[0] / "trainable.safetensors").is_file()
    assert not (partial[0] / "state.json").exists()
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"step_{stall_step - CKPT_EVERY:08d}"
    assert f"step_{stall_step:08d}" not in [p.name for p in list_checkpoints(run_dir)]

    assert torch.get_num_threads() == 1
    assert main(resume_args) == 0
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial write is gone
    assert logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))  # each step logged once
    _assert_same_weights(run_dir, reference)


@pytest.mark.usefixtures("restore_determinism")
def test_sigkill_at_random_step_and_mid_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    _kill_resume_cycle(tmp_path, "wav2vec2", seed=0)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize(
    ("family", "seed", "deterministic"),
    [("whisper", 1, True), ("hubert", 2, True), ("wav2vec2", 3, True), ("wav2vec2", 4, False)],
)
def test_sigkill_resume_is_exact_for_more_families_and_steps(
    tmp_path: Path, family: str, seed: int, deterministic: bool
) -> None:
    """More kill points and families; on CPU even without train.deterministic."""
    _kill_resume_cycle(tmp_path, family, seed, deterministic)


def test_resume_refuses_a_changed_config_naming_each_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train.max_steps=2"]
    assert main(_args(tmp_path, "wav2vec2", "run", *base)) == 0
    before = sorted(p.name for p in list_checkpoints(tmp_path / "run"))
    capsys.readouterr()
    changed = ("objective.tau=0.5", "student.hidden_dim=24", "data.max_duration=0.4")
    assert (
        main(["distill", "--resume", *_args(tmp_path, "wav2vec2", "run", *base, *changed)[1:]]) == 2
    )
    message = capsys.readouterr().err
    assert "cannot resume" in message and "the config changed in ways that matter" in message
    for key in ("objective.tau", "student.hidden_dim", "data.max_duration"):
        assert key in message
    assert "train.output_dir" in message  # what to do
    assert sorted(p.name for p in list_checkpoints(tmp_path / "run")) == before
    # Keys that do not change the math may differ.
    allowed = (
        "train.max_steps=3",
        "train.keep_last=3",
        "train.keep_best=false",
        "train.log_every=2",
    )
    assert (
        main(["distill", "--resume", *_args(tmp_path, "wav2vec2", "run", *base, *allowed)[1:]]) == 0
    )
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"


def test_an_incomplete_step_directory_is_never_the_latest(tmp_path: Path) -> None:
    """Writes are atomic; a step folder emptied by hand is skipped, not loaded."""
    assert main(_args(tmp_path, "wav2vec2", "run", "train.max_steps=4")) == 0
    run_dir = tmp_path / "run"
    newest = list_checkpoints(run_dir)[-1]
    (newest / "optimizer.pt").unlink()
    assert latest_checkpoint(run_dir) == list_checkpoints(run_dir)[-2]
