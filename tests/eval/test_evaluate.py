"""``colld evaluate`` and ``colld compare`` end to end on a tiny corpus and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from colld.cli import main
from colld.data.manifest import Utterance, write_manifest
from colld.eval.evaluate import EvalSettings, evaluate_model, load_probe_data, result_path
from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir

SR = 16000


def _tone(f0: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 4))
    return (0.2 * wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def tiny_probe_corpus(out: Path) -> Path:
    """Two languages (told apart by pitch) x two voices, in probe-train / -dev / -test."""
    rng = np.random.default_rng(0)
    (out / "manifests").mkdir(parents=True)
    (out / "audio").mkdir()
    sizes = {"probe-train": 4, "probe-dev": 2, "probe-test": 2}
    texts = {"en": ("a cat", "ə k æ t"), "de": ("ein hund", "aɪ n h ʊ n t")}
    for split, per_cell in sizes.items():
        rows = []
        for lang, f0 in (("en", 120.0), ("de", 260.0)):
            for voice in ("v1", "v2"):
                for n in range(per_cell):
                    uid = f"{split}-{lang}-{voice}-{n}"
                    seconds = float(rng.uniform(0.8, 1.6))
                    sf.write(out / "audio" / f"{uid}.flac", _tone(f0, seconds, rng), SR)
                    text, phonemes = texts[lang]
                    rows.append(
                        Utterance(
                            id=uid,
                            path=f"../audio/{uid}.flac",
                            duration=seconds,
                            language=lang,
                            voice=voice,
                            text=text,
                            phonemes=phonemes,
                            split=split,
                        )
                    )
        write_manifest(rows, out / "manifests" / f"{split}.jsonl")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_probe_corpus(tmp_path_factory.mktemp("probe-corpus"))


def _settings(corpus: Path, **kw: object) -> EvalSettings:
    base = dict(
        corpus_dir=str(corpus), seeds=(0,), max_epochs=2, clip_seconds=1.0, batch_size=2, repeats=1
    )
    return EvalSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_probe_data_fingerprint_changes_with_the_splits(corpus: Path, tmp_path: Path) -> None:
    data = load_probe_data(corpus)
    assert {k: len(v) for k, v in data.splits.items()} == {
        "probe-train": 16,
        "probe-dev": 8,
        "probe-test": 8,
    }
    other = tiny_probe_corpus(tmp_path / "other")
    rows = (other / "manifests" / "probe-test.jsonl").read_text().splitlines()
    (other / "manifests" / "probe-test.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    assert load_probe_data(other).fingerprint != data.fingerprint


def test_missing_evaluation_part_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="probe-train.jsonl"):
        load_probe_data(tmp_path)


def test_fbank_result_is_written_and_reused(corpus: Path, tmp_path: Path) -> None:
    settings = _settings(corpus, efficiency=False)
    result = evaluate_model("fbank", settings, tmp_path)
    path = result_path(tmp_path, "fbank")
    assert json.loads(path.read_text())["probes"] == result["probes"]
    assert result["kind"] == "fbank" and result["num_hidden_states"] == 1
    assert set(result["probes"]) == {"lid", "sid", "pr", "char"}
    mtime = path.stat().st_mtime_ns
    assert evaluate_model("fbank", settings, tmp_path) == result
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten


def test_not_a_model_is_refused(corpus: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    assert main(["evaluate", str(empty), "--corpus", str(corpus), "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="holds no model"):
        evaluate_model(str(empty), _settings(corpus), tmp_path)


def test_teacher_student_fbank_end_to_end_through_the_cli(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tiny_teacher_dir("whisper", tmp_path / "teacher", num_layers=2, heads=2)
    run = tmp_path / "run"
    train = str(corpus / "manifests" / "probe-train.jsonl")
    distill = ["distill", "--teacher", str(teacher), "--data", train, "--output", str(run)]
    assert main([*distill, *TINY_RUN_OVERRIDES, "train.max_steps=2"]) == 0
    student = run / "student"
    out = tmp_path / "results"
    common = ["--corpus", str(corpus), "--out", str(out), "--quick"]
    assert main(["evaluate", "fbank", str(teacher), str(student), *common]) == 0
    printed = capsys.readouterr().out
    assert "score" in printed and "student:run" in printed
    result = json.loads(result_path(out, str(student)).read_text())
    assert result["kind"] == "student"
    mimicry = result["mimicry"]
    assert mimicry["teacher"] == str(teacher)
    assert set(mimicry["pair_cosine"]) == {"s1->t1", "s2->t2"}
    assert np.array(mimicry["cka"]).shape == (3, 3)  # student states 0..2 x teacher 0..2
    assert result["efficiency"]["parameters"] > 0
    files = [str(result_path(out, s)) for s in ("fbank", str(teacher), str(student))]
    assert main(["compare", *files, "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "student:run" in report and "![tradeoff.png](tradeoff.png)" in report


def test_a_result_of_an_older_schema_is_recomputed_not_an_error(
    corpus: Path, tmp_path: Path
) -> None:
    path = result_path(tmp_path, "fbank")
    path.write_text(json.dumps({"schema": "colld-eval/1", "probes": {}}))
    result = evaluate_model("fbank", _settings(corpus, efficiency=False), tmp_path)
    assert json.loads(path.read_text())["schema"] == result["schema"] != "colld-eval/1"
