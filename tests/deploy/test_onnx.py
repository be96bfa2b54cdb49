"""ONNX export, int8 and the onnxruntime runner on tiny random models (colld.deploy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxruntime", reason="needs the deploy extra: pip install -e '.[deploy]'")

from colld.audio import FrontEnd  # noqa: E402
from colld.cli import main  # noqa: E402
from colld.deploy.check import REPORT_FILE, compare_with_torch  # noqa: E402
from colld.deploy.onnx import (  # noqa: E402
    FRONT_END_FILE,
    OnnxEncoder,
    OnnxExportError,
    export_onnx,
    quantize_int8,
)
from colld.students.build import StudentSpec, build_student, count_encoder_parameters  # noqa: E402
from colld.students.export import export_student, load_student  # noqa: E402
from colld.teachers.hf import wrap_hf_teacher  # noqa: E402
from colld.testing import harmonic_tone, tiny_model  # noqa: E402

FP32_BOUND = 1e-4
SIZES = dict(num_layers=2, hidden=32, heads=2, ffn=64)


def tones(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [harmonic_tone(s, rng) for s in seconds]


@pytest.fixture(scope="module")
def whisper_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Whisper student exported as colld does it (4-layer teacher -> 2-layer student)."""
    teacher = wrap_hf_teacher(tiny_model("whisper", num_layers=4, hidden=32, heads=2, ffn=64))
    student = build_student(
        teacher.encoder, StudentSpec(num_layers=2, hidden_dim=16, init="teacher"), seed=0
    )
    out = tmp_path_factory.mktemp("student") / "student"
    return export_student(student.eval(), teacher.feature_extractor, out, metadata={})


@pytest.fixture(scope="module")
def cli_export(whisper_student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "whisper"
    argv = ["export", str(whisper_student_dir), "--onnx", "--int8", "--out", str(out)]
    argv += ["--corpus", str(out / "no-corpus")]  # synthetic tones
    assert main(argv) == 0
    return out


def test_cli_export_writes_files_and_report(cli_export: Path) -> None:
    assert (cli_export / "model.onnx").is_file() and (cli_export / "model.int8.onnx").is_file()
    assert (cli_export / FRONT_END_FILE).is_file()  # the front end, for colld evaluate
    report = json.loads((cli_export / REPORT_FILE).read_text())
    assert report["family"] == "whisper" and report["num_layers"] == 2 and report["fp32_ok"]
    assert report["exporter"].startswith("torch.onnx.export(dynamo=True)")
    fp32, int8 = report["diffs"]["max_abs_diff"]["fp32"], report["diffs"]["max_abs_diff"]["int8"]
    assert len(fp32) == len(int8) == 3 and max(fp32) < FP32_BOUND
    assert 0 < max(int8) < 1.0  # reported (larger than fp32), not hidden
    print(f"whisper fp32 {fp32} int8 {int8}")


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_whisper_one_file_two_lengths(cli_export: Path, whisper_student_dir: Path, name) -> None:
    """The same file on two other lengths (dynamic time) and a padded batch of 2."""
    torch_model = load_student(whisper_student_dir)
    runner = OnnxEncoder(cli_export / name, threads=1)
    assert (runner.family, runner.num_layers, runner.frame_rate) == ("whisper", 2, 50.0)
    assert runner.precision == ("float32" if name == "model.onnx" else "int8")
    assert runner.batch_invariant is True and runner.source == str(whisper_student_dir)
    assert runner.parameters == count_encoder_parameters(torch_model.encoder)
    front_end = FrontEnd(torch_model.feature_extractor)
    diffs = compare_with_torch(torch_model.encoder, front_end, tones(0.7, 1.9), {name: runner})
    bound = FP32_BOUND if name == "model.onnx" else 1.0
    assert max(diffs.max_abs_diff[name]) < bound, diffs
    out = runner(front_end(tones(0.5)[0])[None], torch.tensor([50]), layers=[2])
    assert list(out.hidden_states) == [2] and out.hidden_states[2].shape == (1, 25, 16)
    with pytest.raises(ValueError, match="at most 3000"):
        runner(torch.zeros(1, 3002, 80), torch.tensor([3002]))


def test_wav2vec2_export_two_lengths_and_int8(tmp_path: Path) -> None:
    loaded = wrap_hf_teacher(tiny_model("wav2vec2", **SIZES))
    front_end = FrontEnd(loaded.feature_extractor)
    path = export_onnx(loaded.encoder, front_end, tmp_path / "model.onnx", source="tiny")
    int8 = quantize_int8(path, tmp_path / "model.int8.onnx")
    runners = {"fp32": OnnxEncoder(path, threads=1), "int8": OnnxEncoder(int8, threads=1)}
    assert runners["fp32"].batch_invariant is False  # the tiny model's group-normed conv
    diffs = compare_with_torch(loaded.encoder, front_end, tones(0.6, 1.3), runners)
    print(f"wav2vec2 fp32 {diffs.max_abs_diff['fp32']} int8 {diffs.max_abs_diff['int8']}")
    assert max(diffs.max_abs_diff["fp32"]) < FP32_BOUND
    assert max(diffs.max_abs_diff["int8"]) > max(diffs.max_abs_diff["fp32"])
    assert diffs.max_abs_diff["int8"][0] < FP32_BOUND  # feature_projection kept in float32
    assert np.isfinite(diffs.max_abs_diff["int8"]).all()
    shortest = runners["fp32"].min_input_frames  # the tiny conv stack's receptive field
    with pytest.raises(ValueError, match=rf"should lie in {shortest}\.\.100"):
        runners["fp32"](torch.zeros(1, 100), torch.tensor([shortest - 1]))


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    @torch.library.custom_op("colld_test::scramble", mutates_args=())
    def scramble(x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)

    scramble.register_fake(lambda x: torch.empty_like(x))
    loaded = wrap_hf_teacher(tiny_model("whisper", num_layers=1, hidden=16, heads=2, ffn=32))
    loaded.encoder.model.layers[0].register_forward_hook(lambda _m, _a, out: scramble(out))
    with pytest.raises(OnnxExportError, match=r"cannot export tiny-whisper.*colld_test\.scramble"):
        export_onnx(
            loaded.encoder,
            FrontEnd(loaded.feature_extractor),
            tmp_path / "m.onnx",
            source="tiny-whisper",
        )


def test_cli_bad_inputs(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--onnx", "--out", str(tmp_path / "o")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["export", "fbank", "--onnx"]) == 2
    assert "no encoder to export" in capsys.readouterr().err
    assert main(["export", str(empty)]) == 2
    assert "--onnx" in capsys.readouterr().err
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="onnxruntime cannot load .*notes.onnx"):
        OnnxEncoder(tmp_path / "notes.onnx")
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    opset = [onnx.helper.make_opsetid("", 18)]
    onnx.save(
        onnx.helper.make_model(graph, ir_version=10, opset_imports=opset), tmp_path / "plain.onnx"
    )
    with pytest.raises(ValueError, match="lacks the metadata"):
        OnnxEncoder(tmp_path / "plain.onnx")
