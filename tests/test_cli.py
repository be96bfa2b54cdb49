"""The CLI's own paths: data scan, bad input exit codes, python -m colld."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from colld.cli import main, parse_args
from colld.data.manifest import read_manifest


def test_data_scan_writes_a_manifest_with_durations(tmp_path: Path) -> None:
    audio = tmp_path / "audio" / "spk1"
    audio.mkdir(parents=True)
    sf.write(audio / "a.wav", np.zeros(16000, np.float32), 16000)
    sf.write(audio / "b.flac", np.zeros(8000, np.float32), 8000)
    (audio / "notes.txt").write_text("not audio")
    assert main(["data", "scan", str(tmp_path / "audio")]) == 0
    rows, problems = read_manifest(tmp_path / "audio" / "manifest.jsonl")
    assert not problems
    assert sorted((r.id, round(r.duration, 3)) for r in rows) == [("spk1/a", 1.0), ("spk1/b", 1.0)]


def test_bad_config_exits_2_with_the_key(tmp_path: Path, capsys) -> None:
    code = main(["distill", "--output", str(tmp_path / "run"), "objective.tua=0.1"])
    assert code == 2
    assert "objective.tua" in capsys.readouterr().err


def test_missing_data_path_names_it(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "distill",
            "--data",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "r"),
            "--teacher",
            "whisper-tiny.en",
        ]
    )
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_python_dash_m_colld_help() -> None:
    out = subprocess.run([sys.executable, "-m", "colld", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "distill" in out.stdout


def test_overrides_may_follow_the_options() -> None:
    args = parse_args(["finetune", "m", "a.b=1", "--task", "ctc", "--units", "phonemes", "c.d=2"])
    assert (args.model, args.task, args.units) == ("m", "ctc", "phonemes")
    assert args.overrides == ["a.b=1", "c.d=2"]
    args = parse_args(["distill", "--quick", "train.max_steps=3"])
    assert args.overrides == ["train.max_steps=3"] and args.quick


def test_stray_arguments_are_still_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["finetune", "m", "--task", "ctc", "--bogus", "a.b=1"])
    assert "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # evaluate takes no overrides
        parse_args(["evaluate", "fbank", "--out", "x", "a.b=1"])
    assert "a.b=1" in capsys.readouterr().err
