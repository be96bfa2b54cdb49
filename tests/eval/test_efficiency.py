"""Inference cost: FLOP counting (checked against the closed form), timings, memory, fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import WhisperFeatureExtractor

from colld.audio import SAMPLE_RATE, FrontEnd
from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.eval.efficiency import (
    count_flops,
    measure_efficiency,
    peak_rss,
    run_model,
    synthetic_clip,
)
from colld.students.build import count_encoder_parameters
from colld.students.export import export_student
from colld.testing import tiny_model

LAYERS, WIDTH, HEADS, FFN, MELS = 2, 32, 2, 64, 80
FAST = dict(batch_size=2, repeats=1, warmup=0, threads=1, isolated=False)


def _student() -> SpeechEncoder:
    model = tiny_model("whisper", num_layers=LAYERS, hidden=WIDTH, heads=HEADS, ffn=FFN)
    return wrap_encoder(model).eval()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("efficiency") / "student"
    return export_student(_student(), WhisperFeatureExtractor(feature_size=MELS), out_dir)


def _whisper_flops(num_samples: int) -> int:
    """Closed form: 2 FLOPs per multiply-add of both convs, the projections, FFN, attention."""
    mel_frames = num_samples // 160
    frames = (mel_frames - 1) // 2 + 1
    conv = 2 * 3 * (mel_frames * MELS * WIDTH + frames * WIDTH * WIDTH)
    projections = 2 * frames * (4 * WIDTH * WIDTH + 2 * WIDTH * FFN)
    attention = 2 * 2 * frames * frames * WIDTH  # scores and weighted sum
    return conv + LAYERS * (projections + attention)


def test_count_flops_matches_closed_form_and_grows_with_length() -> None:
    encoder, front_end = _student(), FrontEnd.for_family("whisper")
    one, two = (count_flops(encoder, front_end, synthetic_clip(s)) for s in (1.0, 2.0))
    assert one == _whisper_flops(SAMPLE_RATE)  # attention included (CPU flash kernel mapped)
    assert two == _whisper_flops(2 * SAMPLE_RATE)
    assert 2.0 <= two / one < 2.5  # linear, plus attention (quadratic; large at width 32)


def test_measure_efficiency_of_an_exported_student(student_dir: Path) -> None:
    result = measure_efficiency(str(student_dir), clip_seconds=1.0, **FAST)
    assert result.parameters == count_encoder_parameters(_student()) > 0
    assert result.flops_per_audio_second == _whisper_flops(SAMPLE_RATE)
    assert result.latency_batch1_s > 0 and result.rtf_batch1 == pytest.approx(
        result.latency_batch1_s
    )
    assert result.rtf_batched > 0 and result.threads == 1 and result.batch_size == 2
    assert result.peak_memory_mb >= result.memory_after_load_mb > 0
    assert result.peak_memory_increase_mb >= 0 and result.measurement_s > 0
    assert result.device.startswith("cpu") and result.torch_version == torch.__version__
    assert result.model == str(student_dir) and not result.isolated


def test_measure_efficiency_of_fbank() -> None:
    result = measure_efficiency("fbank", clip_seconds=0.5, **FAST)
    assert (result.parameters, result.flops_per_audio_second) == (0, 0.0)
    assert result.latency_batch1_s > 0 and result.rtf_batched > 0 and result.memory_method
    with pytest.raises(ValueError, match="clip_seconds must be > 0"):
        measure_efficiency("fbank", clip_seconds=0.0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_efficiency("fbank", repeats=0)


def test_run_model_pads_a_batch_and_returns_the_last_state() -> None:
    encoder, front_end = _student(), FrontEnd.for_family("whisper")
    clips = [synthetic_clip(1.0, seed=0), synthetic_clip(0.5, seed=1)]
    assert run_model(encoder, front_end, clips).shape == (2, 50, WIDTH)
    assert run_model(None, front_end, clips).shape == (2, 100, MELS)


def test_synthetic_clip() -> None:
    clip = synthetic_clip(0.25, seed=3)
    assert clip.shape == (4000,) and clip.dtype == np.float32 and np.isfinite(clip).all()
    assert 0.05 < np.abs(clip).max() < 1.0
    assert not np.array_equal(clip, synthetic_clip(0.25, seed=4))


def test_peak_rss_sees_a_transient_allocation() -> None:
    with peak_rss() as peak:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written, then freed
        del block
    assert peak.method in ("vmhwm", "sampled")
    assert peak.bytes - psutil.Process().memory_info().rss > 48 << 20


@pytest.mark.slow  # a fresh Python process imports torch and transformers (~10-20 s here)
def test_isolated_measurement_runs_in_a_fresh_process(student_dir: Path) -> None:
    result = measure_efficiency(
        str(student_dir), clip_seconds=1.0, batch_size=2, repeats=1, threads=1
    )
    assert result.isolated and result.parameters == count_encoder_parameters(_student())
    assert result.flops_per_audio_second == _whisper_flops(SAMPLE_RATE)
