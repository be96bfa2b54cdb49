"""Relative manifest paths cannot leave the corpus root (``../../etc/passwd`` rows are skipped
with a problem line naming the row); absolute paths are explicit and allowed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from colld.data.manifest import corpus_root, escapes_root, read_manifest
from colld.data.readers import read_any, read_hf_dataset, read_jsonl, read_lhotse, read_tsv


def _tone(path: Path, seconds: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    return path


def _jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": i, "path": p, "duration": 1.0}) for i, p in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("path", "escapes"),
    [
        ("a.wav", False),
        ("sub/../a.wav", False),
        ("../a.wav", True),
        ("../../etc/passwd", True),
        ("sub/../../a.wav", True),
        ("./../corpus-x/a.wav", True),  # a sibling whose name starts like the root
        ("/etc/passwd", False),  # absolute: explicit, allowed
    ],
)
def test_escapes_root(tmp_path: Path, path: str, escapes: bool) -> None:
    root = tmp_path / "corpus"
    assert escapes_root(path, root, root) is escapes


def test_corpus_root_of_colld_layout(tmp_path: Path) -> None:
    assert corpus_root(tmp_path / "c" / "train.jsonl") == tmp_path / "c"
    assert corpus_root(tmp_path / "c" / "manifests" / "train.jsonl") == tmp_path / "c"
    assert corpus_root(tmp_path / "c" / "lhotse" / "train_cuts.jsonl.gz") == tmp_path / "c"


def test_jsonl_rows_leaving_the_root_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = tmp_path / "corpus"
    _tone(corpus / "a.wav")
    outside = _tone(tmp_path / "elsewhere" / "b.wav")
    manifest = _jsonl(
        corpus / "train.jsonl",
        [
            ("good", "a.wav"),
            ("passwd", "../../etc/passwd"),
            ("sneaky", "sub/../../elsewhere/b.wav"),
            ("absolute", str(outside)),  # allowed: the manifest names it explicitly
        ],
    )
    caplog.set_level(logging.WARNING, logger="colld.data.readers")
    utterances, _, problems = read_jsonl(manifest)
    assert [u.id for u in utterances] == ["good", "absolute"]
    assert len(problems) == 2
    assert problems[0].startswith(f"{manifest}:2: id 'passwd': relative path '../../etc/passwd'")
    assert "leads outside the corpus root" in problems[0] and "absolute path" in problems[0]
    assert problems[1].startswith(f"{manifest}:3: id 'sneaky'")
    assert any("skipped 2 entries" in r.getMessage() for r in caplog.records)
    # read_manifest (the embedded corpus' reader) applies the same rule.
    assert [u.id for u in read_manifest(manifest)[0]] == ["good", "absolute"]


def test_colld_corpus_layout_may_reach_its_audio_folder(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _tone(corpus / "audio" / "train" / "a.wav")
    _tone(tmp_path / "secret.wav")
    manifest = _jsonl(
        corpus / "manifests" / "train.jsonl",
        [("a", "../audio/train/a.wav"), ("secret", "../../secret.wav")],
    )
    utterances, root, problems = read_any(manifest)
    assert [u.id for u in utterances] == ["a"] and root == corpus / "manifests"
    assert len(problems) == 1 and f"corpus root {corpus}" in problems[0]


def test_tsv_rows_leaving_the_root_are_skipped(tmp_path: Path) -> None:
    _tone(tmp_path / "data" / "a.wav")
    _tone(tmp_path / "secret.wav")
    tsv = tmp_path / "data" / "train.tsv"
    tsv.write_text("path\tduration\na.wav\t1.0\n../secret.wav\t1.0\n")
    utterances, _, problems = read_tsv(tsv)
    assert [u.id for u in utterances] == ["a"]
    assert len(problems) == 1 and problems[0].startswith(f"{tsv}:3: id '../secret'")


def test_fairseq_rows_stay_under_the_root_line(tmp_path: Path) -> None:
    _tone(tmp_path / "audio" / "a.wav")
    _tone(tmp_path / "secret.wav")
    tsv = tmp_path / "manifests" / "train.tsv"
    tsv.parent.mkdir()
    tsv.write_text("../audio\na.wav\t16000\n../secret.wav\t16000\n")  # the root line may point up
    utterances, _, problems = read_tsv(tsv)
    assert [u.path for u in utterances] == ["a.wav"]
    assert len(problems) == 1 and "'../secret.wav' leads outside" in problems[0]


def test_lhotse_relative_sources_leaving_the_root_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lhotse import CutSet, Recording

    _tone(tmp_path / "corpus" / "wav" / "a.wav")
    _tone(tmp_path / "secret.wav")
    monkeypatch.chdir(tmp_path / "corpus")
    good = Recording.from_file("wav/a.wav", recording_id="a")
    bad = Recording.from_file("../secret.wav", recording_id="secret")
    CutSet.from_cuts([good.to_cut(), bad.to_cut()]).to_file(tmp_path / "corpus" / "c.jsonl")
    utterances, _, problems = read_lhotse(tmp_path / "corpus" / "c.jsonl")
    assert [u.id for u in utterances] == ["a"]
    assert len(problems) == 1 and "id 'secret': relative path '../secret.wav'" in problems[0]


def test_hf_dataset_path_strings_leaving_the_folder_are_skipped(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    _tone(tmp_path / "secret.wav")
    ds = datasets.Dataset.from_dict({"file": ["files/x.wav", "../secret.wav"], "id": ["u1", "u2"]})
    ds.save_to_disk(str(tmp_path / "paths"))
    _tone(tmp_path / "paths" / "files" / "x.wav")
    utterances, _, problems = read_hf_dataset(tmp_path / "paths", audio_column="file")
    assert [u.id for u in utterances] == ["u1"]
    assert len(problems) == 1 and "id 'u2': relative path '../secret.wav'" in problems[0]
