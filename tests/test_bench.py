"""The benchmarks under bench/ that have a tiny mode still run (they are not timed here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_onnx_tiny_prints_its_table() -> None:
    pytest.importorskip("onnxruntime")
    argv = [sys.executable, str(REPO / "bench" / "bench_onnx.py"), "--tiny", "--rounds", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    # header + 3 backends x (teacher, student)
    assert len(rows) == 7, done.stdout
    assert sum("onnxruntime int8" in row for row in rows) == 2


def test_bench_cache_times_whole_epochs_of_a_subset(tmp_path: Path) -> None:
    from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir, write_tones

    teacher = tiny_teacher_dir("whisper", tmp_path / "teacher")
    audio = write_tones(tmp_path / "audio", [2.0, 2.5, 1.5, 3.0, 2.2, 2.8, 1.9, 2.4])
    dev = write_tones(tmp_path / "dev", [1.0, 2.0], prefix="dev")
    argv = [
        sys.executable, str(REPO / "bench" / "bench_cache.py"), "--epoch", "--max-hours",
        str(12 / 3600), f"teacher.spec={teacher}", f"data.train={audio}", f"data.dev={dev}",
        *TINY_RUN_OVERRIDES, "train.eval_every=4",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    }
    assert set(rows) == {"run", "online", "cached"}, done.stdout
    # The shortest prefix reaching 12 s of the 18.3 s: six clips (2 + 2.5 + 1.5 + 3 + 2.2 + 2.8
    # s); none is longer than data.max_duration (3 s), so the cache holds six segments.
    assert rows["online"][2].strip() == "6" and rows["cached"][2].strip() == "6"
    assert "s/epoch (measured)" in rows["run"][-2]
    assert "speed-up per epoch (s/epoch (measured))" in done.stdout
    # One dev evaluation per run (the cached one from the cache's dev part), spread over the
    # epochs at the recipe's cadence.
    assert re.search(r"dev evaluation: online \d+\.\d s, cached \d+\.\d s", done.stdout)
    assert re.search(r"one dev evaluation every 4 updates: .* = \d+\.\d\dx", done.stdout)
