"""``colld finetune --task ctc`` end to end on tiny models and manifests: the report, the
export, a killed and resumed run, and bad input named in the error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colld.cli import main
from colld.finetune.export import CTC_INFO_FILE, SCORES_FILE, load_ctc_model
from colld.testing import kill_when, logged_steps, tiny_teacher_dir
from colld.train.checkpoint import STALL_ENV, latest_checkpoint, load_checkpoint

STARTUP_TIMEOUT_S = 120.0


TINY_FINETUNE = (
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.device=cpu",
    "data.batch_seconds=1.2",
    "data.max_duration=0.6",
    "data.num_workers=0",
)


def _args(tmp_path: Path, family: str, data: dict[str, Path], run: str, *extra: str) -> list[str]:
    model = tmp_path / f"model-{family}"
    if not model.exists():
        tiny_teacher_dir(family, model, num_layers=2, hidden=32, heads=2, ffn=64)
    return [
        "finetune",
        str(model),
        "--task",
        "ctc",
        "--data",
        str(data["train"]),
        "--out",
        str(tmp_path / run),
        *TINY_FINETUNE,
        *(f"data.{key}={data[key]}" for key in ("dev", "test") if key in data),
        *extra,
    ]


@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_finetune_end_to_end_reports_and_exports(
    tmp_path: Path,
    family: str,
    transcribed: Callable[..., dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = transcribed()
    assert main(_args(tmp_path, family, data, "run", "train.max_steps=4")) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert logged_steps(run_dir, "train/loss") == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("dev/cer" in r for r in rows)
    model_dir = run_dir / "model"
    report = json.loads((model_dir / SCORES_FILE).read_text())
    assert report["metric"] == "cer" and report["test"]["utterances"] == 3
    assert 0.0 <= report["test"]["value"] and "en" in report["test"]["per_language"]
    assert report["test"]["aggregate_utterances"] == 3  # English: an alphabetic language
    assert report["selected_step"] in (2, 4)  # the best dev step
    assert report["data"]["test"]["oov_symbols"] == {"z": 1, "é": 1}
    assert report["data"]["test"]["oov_utterances"]["ids"] == ["test-0", "test-1"]
    assert "CTC model written to" in printed and "CER" in printed and "aggregate" in printed
    info = json.loads((model_dir / CTC_INFO_FILE).read_text())
    assert info["units"] == "chars" and info["pretrained"]["spec"].endswith(f"model-{family}")
    loaded = load_ctc_model(model_dir)
    assert loaded.model.vocab_size == len(info["tokens"])


def test_finetune_on_phonemes_reports_per(
    tmp_path: Path, transcribed: Callable[..., dict[str, Path]]
) -> None:
    data = transcribed()
    args = _args(tmp_path, "wav2vec2", data, "run", "train.max_steps=2", "--units", "phonemes")
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "model" / SCORES_FILE).read_text())
    assert report["metric"] == "per" and report["units"] == "phonemes"


def test_missing_transcripts_are_named(
    tmp_path: Path, manifest_writer: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train = manifest_writer(tmp_path / "data", "train", [None, None, None])
    assert main(_args(tmp_path, "wav2vec2", {"train": train}, "run", "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert str(train) in err and "'text'" in err and "--units chars" in err
    args = _args(tmp_path, "wav2vec2", {"train": train}, "run", "--units", "phonemes")
    assert main(args) == 2
    assert "'phonemes' field" in capsys.readouterr().err


def test_bad_vocabulary_file_and_config_are_named(
    tmp_path: Path,
    transcribed: Callable[..., dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = transcribed()
    vocab = tmp_path / "vocab.json"
    vocab.write_text('{"a": 0}')
    assert main(_args(tmp_path, "wav2vec2", data, "run", f"ctc.vocab={vocab}")) == 2
    assert f"{vocab}: expected id 0 = '<blank>'" in capsys.readouterr().err
    assert main(_args(tmp_path, "wav2vec2", data, "run", "ctc.unit=chars")) == 2
    assert "unknown config key 'ctc.unit'; did you mean 'units'?" in capsys.readouterr().err
    assert main(_args(tmp_path, "wav2vec2", data, "run", "data.max_duration=0.1")) == 2
    err = capsys.readouterr().err
    assert "no usable row" in err and "longer than data.max_duration=0.1 s" in err
    too_long = ("data.max_duration=31", "data.batch_seconds=31")
    assert main(_args(tmp_path, "whisper", data, "run", *too_long)) == 2
    assert "data.max_duration=31 s exceeds" in capsys.readouterr().err


def test_given_vocabulary_counts_training_symbols_outside_it(
    tmp_path: Path, transcribed: Callable[..., dict[str, Path]]
) -> None:
    data = transcribed()
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<blank>": 0, "<unk>": 1, "a": 2, "b": 3, "|": 4}))
    assert (
        main(_args(tmp_path, "wav2vec2", data, "run", "train.max_steps=2", f"ctc.vocab={vocab}"))
        == 0
    )
    report = json.loads((tmp_path / "run" / "model" / SCORES_FILE).read_text())
    train = report["data"]["train"]
    assert set(train["oov_symbols"]) <= {"c", "d"} and train["oov_symbols"]
    assert train["oov_utterances"]["count"] > 0
    assert report["vocab_size"] == 5


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != STALL_ENV}
    env["OMP_NUM_THREADS"] = "1"
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "colld", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def test_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, transcribed: Callable[..., dict[str, Path]]
) -> None:
    data = {"train": transcribed()["train"]}  # no dev: the last step is exported
    steps = ("train.max_steps=6", "train.ckpt_every=2")
    assert main(_args(tmp_path, "wav2vec2", data, "reference", *steps)) == 0
    args = _args(tmp_path, "wav2vec2", data, "killed", *steps)
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _start(args, log)
    reached = lambda: max(logged_steps(run_dir, "train/loss"), default=0) >= 3  # noqa: E731
    kill_when(proc, reached, "step 3", log, STARTUP_TIMEOUT_S)
    assert load_checkpoint(latest_checkpoint(run_dir), restore_rng=False).state.step < 6
    assert main(["finetune", *args[1:], "--resume"]) == 0
    assert logged_steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]  # each step logged once
    got = load_file(str(run_dir / "model" / "model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_default_data_is_the_corpus_probe_splits(
    tmp_path: Path,
    manifest_writer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --data: probe-train trains, probe-dev selects, probe-test is reported on."""
    import colld.finetune.recipe as recipe

    corpus = tmp_path / "corpus"
    words = ["ab ba", "cab", "ba ab", "dab", "bad ca", "ab"]
    for split, texts in {
        "probe-train": words,
        "probe-dev": words[:2],
        "probe-test": words[2:4],
    }.items():
        manifest_writer(corpus / "manifests", split, texts, seed=len(split))
    monkeypatch.setattr(recipe, "ensure_embedded_corpus", lambda path, hours, seed: path)
    model = tmp_path / "model-wav2vec2"
    tiny_teacher_dir("wav2vec2", model, num_layers=2, hidden=32, heads=2, ffn=64)
    args = ["finetune", str(model), "--task", "ctc", "--out", str(tmp_path / "run"),
            *TINY_FINETUNE, f"data.corpus_dir={corpus}", "train.max_steps=2"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "model" / SCORES_FILE).read_text())
    assert report["test_split"] == "probe-test"
    assert {k: v["name"] for k, v in report["data"].items()} == {
        "train": "probe-train", "dev": "probe-dev", "test": "probe-test"
    }  # fmt: skip
    assert report["data"]["train"]["utterances"] == 6 and report["test"]["utterances"] == 2
