import json
from pathlib import Path
from typing import Any

import pytest

from colld.cli import main
from colld.eval.report import CompareError, load_comparison, write_report
from colld.testing import fake_result


def _result(
    label: str, kind: str, values: dict[str, float], *, corpus: str = "abc", **extra: Any
) -> dict[str, Any]:
    return fake_result(label, kind, values, corpus=corpus, **extra)


def _write(tmp_path: Path, results: list[dict[str, Any]]) -> list[Path]:
    paths = []
    for r in results:
        path = tmp_path / "results" / f"{r['label']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(r))
        paths.append(path)
    return paths


def _three(**student_extra: Any) -> list[dict[str, Any]]:
    return [
        _result("fbank", "fbank", {"lid": 0.5, "sid": 0.2, "pr": 0.9, "char": 0.95}),
        _result("whisper-base", "teacher", {"lid": 0.9, "sid": 0.6, "pr": 0.4, "char": 0.95}),
        _result(
            "student:run",
            "student",
            {"lid": 0.8, "sid": 0.4, "pr": 0.5, "char": 0.9},
            **student_extra,
        ),
    ]


def test_report_holds_the_numbers_of_the_json(tmp_path: Path) -> None:
    mimicry = {
        "teacher": "whisper-base",
        "split": "probe-test",
        "pair_cosine": {"s1->t1": 0.8123},
        "cka": [[0.9, 0.1], [0.2, 0.7]],
    }
    paths = _write(tmp_path, _three(mimicry=mimicry))
    cmp = load_comparison(paths)
    assert cmp.teacher["label"] == "whisper-base"  # named by the student's mimicry
    report = write_report(cmp, tmp_path / "report")
    text = report.read_text()
    for path in paths:
        result = json.loads(path.read_text())
        for task, summary in result["probes"].items():
            assert f"{summary['mean']:.3f} ± {summary['std']:.3f}" in text, (result["label"], task)
    # lid (0.8-0.5)/0.4 = 750, sid 500, pr (0.5-0.1)/(0.6-0.1) = 800; char flagged (equal)
    assert "| 683 |" in text
    assert "`char` left out of the score" in text
    assert "s1->t1 0.812" in text
    for name in ("tradeoff.png", "tasks.png", "layer_weights.png", "cka_student_run.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert sorted(p.name for p in (tmp_path / "report" / "results").iterdir()) == sorted(
        p.name for p in paths
    )


def test_compare_refuses_results_of_another_corpus(tmp_path: Path) -> None:
    results = _three()
    results[2]["corpus"]["fingerprint"] = "other"
    with pytest.raises(CompareError, match="different corpora or splits"):
        load_comparison(_write(tmp_path, results))


def test_compare_refuses_different_seeds(tmp_path: Path) -> None:
    results = _three()
    results[1]["settings"]["seeds"] = [0]
    with pytest.raises(CompareError, match="seeds"):
        load_comparison(_write(tmp_path, results))


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a colld evaluation result"):
        load_comparison([bad])


def test_compare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write(tmp_path, _three())
    out = tmp_path / "rep"
    assert main(["compare", *map(str, paths), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report written to" in printed and "whisper-base" in printed
    assert (out / "report.md").is_file()
    results = _three()
    results[0]["corpus"]["fingerprint"] = "zzz"
    bad_paths = _write(tmp_path / "b", results) if (tmp_path / "b").mkdir() is None else []
    assert main(["compare", *map(str, bad_paths), "--out", str(out)]) == 2
    assert "different corpora" in capsys.readouterr().err


def test_a_student_alone_has_no_score_and_a_named_missing_teacher_is_an_error(
    tmp_path: Path,
) -> None:
    """``colld evaluate STUDENT`` alone: the student's teacher is not among the files, so the
    table has no score (not an error); naming a teacher that is absent is an error."""
    student = _three(mimicry={"teacher": "whisper-base"})[2]
    paths = _write(tmp_path, [student])
    assert load_comparison(paths).scores == {}
    with pytest.raises(CompareError, match="no result for the reference teacher 'whisper-base'"):
        load_comparison(paths, teacher="whisper-base")
