"""The s3prl upstream contract on tiny random models (colld.deploy.s3prl), without s3prl."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colld.audio import WAV2VEC2_CONV_KERNEL, WAV2VEC2_CONV_STRIDE, FrontEnd
from colld.cli import main
from colld.deploy.s3prl import (
    EXPERT_FILE,
    HUBCONF_FILE,
    UpstreamExpert,
    write_s3prl_upstream,
)
from colld.students.build import StudentSpec, build_student
from colld.students.export import export_student
from colld.teachers.hf import wrap_hf_teacher
from colld.testing import TINY_CONV, harmonic_tone, tiny_model, tiny_teacher_dir

# Models whose upstream is checked: exported students of three families (wav2vec2 with its
# group-normed first conv run clip by clip, data2vec-audio and whisper batched) and two
# teachers loaded from HF dirs (batched).
KINDS = (
    "whisper-student",
    "wav2vec2-student",
    "data2vec-audio-student",
    "whisper-teacher",
    "w2v-bert-teacher",
)
TINY_CONV_RATE = math.prod(TINY_CONV["conv_stride"])  # 10 samples per frame
SAMPLES_PER_FRAME = {
    "whisper-student": 320,
    "wav2vec2-student": TINY_CONV_RATE,
    "data2vec-audio-student": TINY_CONV_RATE,
    "whisper-teacher": 320,
    "w2v-bert-teacher": 320,
}
# s3prl's Featurizer needs |T - round(max S / rate)| < 5; colld guarantees <= 2.
FRAME_TOLERANCE = 2
LENGTHS = (4810, 2723, 7201)  # samples: three different frame counts, none a multiple of 320


def tones(*num_samples: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    return [torch.from_numpy(harmonic_tone((n + 1) / 16000, rng)[:n].copy()) for n in num_samples]


def _student_dir(family: str, out: Path) -> Path:
    teacher = wrap_hf_teacher(tiny_model(family, num_layers=4, hidden=32, heads=2, ffn=64))
    student = build_student(
        teacher.encoder, StudentSpec(num_layers=2, hidden_dim=16, init="teacher"), seed=0
    )
    return export_student(student.eval(), teacher.feature_extractor, out, metadata={})


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    specs = {
        f"{family}-student": str(_student_dir(family, root / f"{family}-student"))
        for family in ("whisper", "wav2vec2", "data2vec-audio")
    }
    specs["whisper-teacher"] = str(tiny_teacher_dir("whisper", root / "whisper-teacher"))
    specs["w2v-bert-teacher"] = str(tiny_teacher_dir("wav2vec2-bert", root / "w2v-bert"))
    return specs


@pytest.fixture(scope="module", params=KINDS)
def kind_and_upstream(request, specs: dict[str, str]) -> tuple[str, UpstreamExpert]:
    return request.param, UpstreamExpert(specs[request.param])


def test_all_hidden_states_cover_each_waveform(
    kind_and_upstream: tuple[str, UpstreamExpert],
) -> None:
    kind, upstream = kind_and_upstream
    rate = upstream.get_downsample_rates("hidden_states")
    assert rate == SAMPLES_PER_FRAME[kind] == upstream.get_downsample_rates("last_hidden_state")
    wavs = tones(*LENGTHS)
    with torch.no_grad():
        out = upstream(wavs)
    states = out["hidden_states"]
    assert isinstance(states, tuple) and len(states) == upstream.num_layers + 1
    assert out["last_hidden_state"] is states[-1]
    num_frames = states[0].shape[1]
    for state in states:
        assert state.shape == (len(wavs), num_frames, upstream.hidden_dim)
    assert abs(num_frames - round(max(LENGTHS) / rate)) <= FRAME_TOLERANCE
    own_frames = []
    for b, wav in enumerate(wavs):
        with torch.no_grad():
            alone = upstream([wav])["hidden_states"]
        frames = alone[0].shape[1]
        own_frames.append(frames)
        assert abs(frames - round(LENGTHS[b] / rate)) <= FRAME_TOLERANCE, (kind, b, frames)
        for j, (batched, single) in enumerate(zip(states, alone, strict=True)):
            assert single.shape == (1, frames, upstream.hidden_dim)
            torch.testing.assert_close(batched[b, :frames], single[0], atol=1e-4, rtol=1e-4)
            assert not batched[b, frames:].any(), f"{kind}: padded frames of h{j}[{b}] not 0"
    assert len(set(own_frames)) == len(wavs) and max(own_frames) == num_frames


def test_frame_count_bounds_of_the_full_size_front_ends() -> None:
    """The bounds the docs state for real models (320 samples per frame), S from 25 ms to 20 s:
    Whisper and the wav2vec 2.0 conv stack within 1 frame of round(S / 320), w2v-BERT 2."""
    samples = np.arange(560, 20 * 16000)
    whisper_mel = FrontEnd.for_family("whisper").frames
    fbank_pairs = FrontEnd.for_family("wav2vec2-bert").frames

    def conv_stack(num: int) -> int:
        for kernel, stride in zip(WAV2VEC2_CONV_KERNEL, WAV2VEC2_CONV_STRIDE, strict=True):
            num = (num - kernel) // stride + 1
        return num

    counts = {
        "whisper": np.array([(whisper_mel(int(s)) - 1) // 2 + 1 for s in samples]),
        "wav2vec2": np.array([conv_stack(int(s)) for s in samples]),
        "w2v-bert": np.array([fbank_pairs(int(s)) for s in samples]),
    }
    expected = np.round(
        samples / 320
    )  # what s3prl computes (numpy and Python both round half to even)
    worst = {name: int(np.abs(frames - expected).max()) for name, frames in counts.items()}
    assert worst == {"whisper": 1, "wav2vec2": 1, "w2v-bert": 2}


def test_numpy_and_float64_input_give_the_same_states(
    kind_and_upstream: tuple[str, UpstreamExpert],
) -> None:
    _, upstream = kind_and_upstream
    wav = tones(3000)[0]
    with torch.no_grad():
        reference = upstream([wav])["last_hidden_state"]
        from_numpy = upstream([wav.double().numpy()])["last_hidden_state"]
    torch.testing.assert_close(from_numpy, reference)
    assert reference.device == next(upstream.parameters()).device


def test_gradients_flow_unless_the_caller_disables_them(specs: dict[str, str]) -> None:
    upstream = UpstreamExpert(specs["whisper-teacher"])  # the loader froze this teacher
    positions = upstream.encoder.model.embed_positions.weight
    assert not positions.requires_grad  # the fixed sinusoid stays fixed
    with torch.no_grad():
        assert not upstream(tones(1600))["last_hidden_state"].requires_grad
    upstream(tones(1600, 2400))["last_hidden_state"].pow(2).mean().backward()
    layer = upstream.encoder.model.layers[0].fc1.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    assert positions.grad is None
    student = UpstreamExpert(specs["wav2vec2-student"]).train()  # s3prl's -f sets train()
    assert student(tones(800))["last_hidden_state"].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_takes_cpu_waveforms(specs: dict[str, str]) -> None:
    upstream = UpstreamExpert(specs["whisper-student"])
    wavs = tones(*LENGTHS)
    with torch.no_grad():
        cpu = upstream(wavs)["hidden_states"]
        gpu = upstream.to("cuda")([w.to("cuda") for w in wavs])["hidden_states"]
    assert all(state.device.type == "cuda" for state in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)


def test_bad_specs_raise_the_loaders_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        UpstreamExpert(str(empty))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="is a file"):
        UpstreamExpert(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="fbank baseline"):
        UpstreamExpert("fbank")
    with pytest.raises(ValueError, match="needs ckpt"):
        UpstreamExpert(None, model_config=None, refresh=False)


def test_bad_waveforms_are_named(specs: dict[str, str]) -> None:
    upstream = UpstreamExpert(specs["whisper-student"])
    good = tones(1600)[0]
    with pytest.raises(ValueError, match=r"non-empty list.*found \[\]"):
        upstream([])
    with pytest.raises(ValueError, match=r"non-empty list.*found Shape \(2, 1600\)"):
        upstream(torch.zeros(2, 1600))
    with pytest.raises(ValueError, match=r"wavs\[1\] has shape \(2, 800\)"):
        upstream([good, torch.zeros(2, 800)])
    with pytest.raises(ValueError, match=r"wavs\[1\] has shape \(\)"):
        upstream([good, torch.tensor(0.5)])
    with pytest.raises(ValueError, match=r"wavs\[0\] of shape \(10,\).*shorter than"):
        upstream([torch.zeros(10), good])
    with pytest.raises(ValueError, match=r"wavs\[1\] of shape \(1600,\).*NaN"):
        upstream([good, torch.full((1600,), float("nan"))])
    with pytest.raises(ValueError, match=r"wavs\[0\] holds 480001 samples.*at most 480000"):
        upstream([torch.zeros(480_001)])


def test_written_files_import_and_build_the_upstream(
    specs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    student = Path(specs["whisper-student"])
    monkeypatch.chdir(student.parent)  # a relative model path is stored absolute
    info = write_s3prl_upstream(student.name, tmp_path / "colld_tiny")
    assert info.ckpt == str(student.resolve()) and info.entry == "colld_tiny"
    assert "from s3prl.upstream.colld_tiny.hubconf import *" in info.summary()
    for name in (EXPERT_FILE, HUBCONF_FILE):
        assert len((tmp_path / "colld_tiny" / name).read_text().splitlines()) <= 15
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        hubconf = importlib.import_module("colld_tiny.hubconf")
        expert = importlib.import_module("colld_tiny.expert")
        assert expert.UpstreamExpert is UpstreamExpert
        # s3prl registers every public callable of hubconf.py as an upstream name
        public = [
            n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))
        ]
        assert public == ["colld_tiny"]
        # what s3prl's runner does: Upstream(ckpt=-k or None, model_config=-g, refresh=-r)
        default = hubconf.colld_tiny(ckpt=None, model_config=None, refresh=False)
        other = hubconf.colld_tiny(specs["w2v-bert-teacher"])
    finally:
        for name in ("colld_tiny", "colld_tiny.hubconf", "colld_tiny.expert"):
            sys.modules.pop(name, None)
    assert default.source == str(student.resolve()) and other.source == specs["w2v-bert-teacher"]
    with torch.no_grad():
        states = default(tones(*LENGTHS))["hidden_states"]
    assert len(states) == 3 and states[0].shape[:2] == (3, 23)  # 7201 samples -> 23 frames
    assert other.num_layers == 4 and other.hidden_dim == 32


def test_cli_writes_the_upstream_files(specs: dict[str, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "colld_cli"
    assert main(["export", specs["data2vec-audio-student"], "--s3prl", str(out)]) == 0
    assert "from s3prl.upstream.colld_cli.hubconf import *" in capsys.readouterr().out
    assert (out / EXPERT_FILE).is_file() and (out / HUBCONF_FILE).is_file()
    assert main(["export", specs["whisper-teacher"], "--s3prl", str(out)]) == 0  # ours: replaced
    assert repr(str(Path(specs["whisper-teacher"]).resolve())) in (out / HUBCONF_FILE).read_text()
    capsys.readouterr()

    assert main(["export", specs["whisper-student"], "--s3prl", str(tmp_path / "bad-name")]) == 2
    assert "'bad-name'" in capsys.readouterr().err
    foreign = tmp_path / "hubert"
    foreign.mkdir()
    (foreign / EXPERT_FILE).write_text("class UpstreamExpert: ...\n")
    assert main(["export", specs["whisper-student"], "--s3prl", str(foreign)]) == 2
    assert "was not written by colld" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--s3prl", str(tmp_path / "colld_none")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert not (tmp_path / "colld_none").exists()  # nothing written for a bad model
    assert main(["export", specs["whisper-student"]]) == 2
    assert "--s3prl" in capsys.readouterr().err
