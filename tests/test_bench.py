"""The benchmarks under bench/ that have a tiny mode still run (they are not timed here)."""

from __future__ import annotations

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
