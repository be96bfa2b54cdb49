"""``colld evaluate`` on ONNX exports (fp32 and int8) of a tiny distilled Whisper student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxruntime", reason="needs the deploy extra: pip install -e '.[deploy]'")

from test_evaluate import tiny_probe_corpus  # noqa: E402  (same folder, on pytest's sys.path)

from colld.cli import main  # noqa: E402
from colld.deploy.onnx import FRONT_END_FILE  # noqa: E402
from colld.eval.evaluate import load_probe_data, result_path  # noqa: E402
from colld.eval.features import extract_features  # noqa: E402
from colld.eval.models import describe, load_eval_model, load_model_spec  # noqa: E402
from colld.testing import TINY_RUN_OVERRIDES, tiny_teacher_dir  # noqa: E402

FP32, INT8 = "model.onnx", "model.int8.onnx"
# Features are stored in float16: one float16 step is ~1e-3 of the value.
FEATURE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_probe_corpus(tmp_path_factory.mktemp("probe-corpus"))


@pytest.fixture(scope="module")
def distilled(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher dir, student dir): a tiny Whisper teacher and a 2-step distilled student."""
    tmp = tmp_path_factory.mktemp("distill")
    teacher = tiny_teacher_dir("whisper", tmp / "teacher", num_layers=2, heads=2)
    train = str(corpus / "manifests" / "probe-train.jsonl")
    argv = ["distill", "--teacher", str(teacher), "--data", train, "--output", str(tmp / "run")]
    assert main([*argv, *TINY_RUN_OVERRIDES, "train.max_steps=2"]) == 0
    return teacher, tmp / "run" / "student"


@pytest.fixture(scope="module")
def exported(distilled: tuple[Path, Path], corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """The folder ``colld export STUDENT --onnx --int8`` writes."""
    out = tmp_path_factory.mktemp("onnx") / "student"
    argv = ["export", str(distilled[1]), "--onnx", "--int8", "--out", str(out)]
    assert main([*argv, "--corpus", str(corpus)]) == 0
    assert (out / FRONT_END_FILE).is_file()
    return out


def test_fp32_and_int8_evaluated_through_the_cli(
    corpus: Path,
    distilled: tuple[Path, Path],
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    teacher, student = (str(p) for p in distilled)
    fp32, int8 = str(exported / FP32), str(exported / INT8)
    specs = ["fbank", teacher, student, fp32, int8]
    out = tmp_path / "results"
    assert main(["evaluate", *specs, "--corpus", str(corpus), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    paths = [result_path(out, s) for s in specs]
    assert len(set(paths)) == 5 and all(p.is_file() for p in paths)
    results = {s: json.loads(p.read_text()) for s, p in zip(specs, paths, strict=True)}
    torch_result, fp32_result, int8_result = results[student], results[fp32], results[int8]
    assert fp32_result["label"] == "onnx:model.onnx (student)" in printed
    assert int8_result["label"] == "onnx:model.int8.onnx (student)" in printed
    for result, precision in ((fp32_result, "float32"), (int8_result, "int8")):
        assert result["kind"] == "onnx" and result["onnx"]["precision"] == precision
        assert result["onnx"]["source"] == student
        assert set(result["probes"]) == set(torch_result["probes"])
        eff = result["efficiency"]
        assert eff["parameters"] == torch_result["efficiency"]["parameters"] > 0
        assert eff["flops_per_audio_second"] is None and "FlopCounterMode" in str(eff["skipped"])
        assert eff["runtime"].startswith("onnxruntime") and precision in eff["runtime"]
        assert eff["model_file_mb"] > 0 and eff["rtf_batch1"] > 0
        assert result["mimicry"]["teacher"] == teacher
        assert result["mimicry"]["student_dir"] == student
        assert np.array(result["mimicry"]["cka"]).shape == (3, 3)
    assert fp32_result["onnx"]["unbatched_reason"] is None
    assert "int8" in int8_result["onnx"]["unbatched_reason"]
    cosines = torch_result["mimicry"]["pair_cosine"]
    assert fp32_result["mimicry"]["pair_cosine"] == pytest.approx(cosines, abs=1e-3)
    assert set(int8_result["mimicry"]["pair_cosine"]) == set(cosines)
    report = tmp_path / "report"
    assert main(["compare", *(str(p) for p in paths), "--out", str(report)]) == 0
    assert "onnx:model.int8.onnx (student)" in (report / "report.md").read_text()


def test_fp32_onnx_features_equal_the_torch_features(
    corpus: Path, distilled: tuple[Path, Path], exported: Path
) -> None:
    data = load_probe_data(corpus)
    rows = data.splits["probe-test"]
    reference = extract_features(load_model_spec(str(distilled[1])), rows, data.root)
    for name in (FP32, INT8):
        onnx_features = extract_features(load_eval_model(str(exported / name)), rows, data.root)
        assert [u.id for u in onnx_features.utterances] == [u.id for u in reference.utterances]
        assert onnx_features.frame_rate == reference.frame_rate
        assert onnx_features.num_frames() == reference.num_frames()
        assert onnx_features.num_layers == reference.num_layers == 3
        diffs = [
            float((a.float() - b.float()).abs().max())
            for a, b in zip(onnx_features.states, reference.states, strict=True)
        ]
        print(f"{name}: max abs diff to torch {max(diffs):.2e}")
        if name == FP32:
            for a, b in zip(onnx_features.states, reference.states, strict=True):
                torch.testing.assert_close(
                    a.float(), b.float(), atol=FEATURE_TOLERANCE, rtol=FEATURE_TOLERANCE
                )
        else:
            assert np.isfinite(diffs).all() and max(diffs) > 0  # int8 differs, and says so


def test_a_file_not_written_by_colld_is_refused(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    opset = [onnx.helper.make_opsetid("", 18)]
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=opset), plain)
    argv = ["evaluate", str(plain), "--corpus", str(corpus), "--out", str(tmp_path / "out")]
    assert main([*argv, "--quick"]) == 2
    error = capsys.readouterr().err
    assert "plain.onnx lacks the metadata" in error and "'colld.family'" in error
    with pytest.raises(ValueError, match=r"plain\.onnx lacks the metadata \['colld\.family'"):
        load_eval_model(str(plain))


def test_front_end_file_and_folder_specs(exported: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(exported / INT8, alone / INT8)
    with pytest.raises(FileNotFoundError, match=rf"{FRONT_END_FILE} not found.*re-export"):
        load_eval_model(str(alone / INT8))
    shutil.copy2(exported / FRONT_END_FILE, alone / FRONT_END_FILE)
    loaded = load_eval_model(str(alone))  # a folder holding one .onnx names it
    assert loaded is not None and loaded.encoder.precision == "int8"
    assert describe(str(alone)) == describe(str(alone / INT8)) == "onnx:model.int8.onnx (alone)"
    with pytest.raises(ValueError, match=r"holds 2 ONNX files \(model\.int8\.onnx, model\.onnx\)"):
        load_eval_model(str(exported))
    with pytest.raises(ValueError, match="is an ONNX export; this needs a PyTorch model"):
        load_model_spec(str(exported / FP32))  # colld export, s3prl, finetune
