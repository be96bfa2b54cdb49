"""Waveform augmentation: changes audio, reproducible, keeps length where it should."""

from __future__ import annotations

import random

import numpy as np
import pytest

from colld.data.augment import (
    AugmentConfig,
    Augmenter,
    SyntheticReverb,
    config_from_dict,
    synthetic_impulse_response,
)

RATE = 16000


def speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120-220 Hz pitch under a syllable-rate envelope, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120 + 100 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wave = 0.1 * voiced * envelope + 0.003 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


ALWAYS = dict(
    prob=1.0,
    noise_prob=1.0,
    speed_prob=1.0,
    pitch_prob=1.0,
    band_limit_prob=1.0,
    gain_prob=1.0,
    reverb_prob=1.0,
)


def test_augmentation_changes_audio_and_is_reproducible() -> None:
    wave = speechlike()
    augmenter = Augmenter(AugmentConfig(enabled=True, seed=3, **ALWAYS), RATE)
    first = augmenter(wave, utterance_id="a", epoch=0)
    again = augmenter(wave, utterance_id="a", epoch=0)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.float32 and np.isfinite(first).all()
    # The input is not modified in place, and the output differs from it.
    np.testing.assert_array_equal(wave, speechlike())
    n = min(first.shape[0], wave.shape[0])
    assert np.abs(first[:n] - wave[:n]).mean() > 0.1 * np.abs(wave).mean()
    # Another epoch, utterance or seed draws other parameters.
    for other in (
        augmenter(wave, utterance_id="a", epoch=1),
        augmenter(wave, utterance_id="b", epoch=0),
        Augmenter(AugmentConfig(enabled=True, seed=4, **ALWAYS), RATE)(
            wave, utterance_id="a", epoch=0
        ),
    ):
        assert other.shape != first.shape or not np.allclose(other, first)


def test_global_random_generators_are_left_untouched() -> None:
    augmenter = Augmenter(AugmentConfig(enabled=True, **ALWAYS), RATE)
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    augmenter(speechlike(), utterance_id="a", epoch=0)
    assert (random.random(), np.random.random()) == expected


def test_length_is_kept_unless_speed_changes() -> None:
    wave = speechlike(1.5)
    no_speed = Augmenter(AugmentConfig(enabled=True, **{**ALWAYS, "speed_prob": 0.0}), RATE)
    for epoch in range(4):
        assert no_speed(wave, utterance_id="x", epoch=epoch).shape == wave.shape
    off = {name: 0.0 for name in ALWAYS}
    speed_only = AugmentConfig(enabled=True, **{**off, "prob": 1.0, "speed_prob": 1.0})
    augmenter = Augmenter(speed_only, RATE)
    ratios = [augmenter(wave, utterance_id="x", epoch=e).shape[0] / wave.shape[0] for e in range(8)]
    assert all(1 / 1.1 - 0.01 <= r <= 1 / 0.9 + 0.01 for r in ratios)
    assert max(ratios) - min(ratios) > 0.02  # the speed factor is drawn per clip


def test_disabled_is_the_identity_and_describe_says_so() -> None:
    wave = speechlike(0.5)
    augmenter = Augmenter(AugmentConfig(), RATE)
    assert not augmenter.enabled
    assert augmenter(wave, utterance_id="a", epoch=0) is wave
    assert augmenter.describe() == {"enabled": False}
    assert Augmenter(AugmentConfig(seed=5), RATE).describe() == {"enabled": False}


def test_describe_records_the_chain() -> None:
    described = Augmenter(AugmentConfig(enabled=True), RATE).describe()
    assert described["enabled"] is True and described["varies_with_epoch"] is True
    names = [t["name"] for t in described["transforms"]]
    assert names == [
        "SpeedPerturb",
        "PitchShift",
        "SyntheticReverb",
        "OneOf",
        "AddGaussianSNR",
        "Gain",
    ]
    assert described["transforms"][1]["p"] == AugmentConfig().pitch_prob
    without_reverb = Augmenter(AugmentConfig(enabled=True, reverb=False), RATE).describe()
    assert "SyntheticReverb" not in [t["name"] for t in without_reverb["transforms"]]
    assert without_reverb != described


def test_config_is_validated_and_accepts_yaml_lists() -> None:
    config = config_from_dict({"enabled": True, "speed": [0.95, 1.05]})
    assert config.speed == (0.95, 1.05)
    with pytest.raises(ValueError, match="noise_snr_db"):
        AugmentConfig(noise_snr_db=(40, 10))
    with pytest.raises(ValueError, match="pitch_prob"):
        AugmentConfig(pitch_prob=1.5)
    with pytest.raises(ValueError, match="pitch_semitones"):
        AugmentConfig(pitch_semitones=(-30, 2))
    with pytest.raises(ValueError, match="unknown augment setting"):
        config_from_dict({"enabeld": True})


def test_synthetic_reverb_keeps_length_and_level_and_smears_time() -> None:
    impulse = synthetic_impulse_response(0.5, RATE, seed=0)
    assert impulse.shape == (8000,) and impulse[0] == 1.0
    tenth = len(impulse) // 10
    assert np.sum(impulse[-tenth:] ** 2) < 1e-3 * np.sum(impulse[1 : tenth + 1] ** 2)
    clicks = np.zeros(RATE, dtype=np.float32)
    clicks[::4000] = 1.0
    random.seed(0)
    out = SyntheticReverb(min_rt60_s=0.4, max_rt60_s=0.4, p=1.0)(clicks, RATE)
    assert out.shape == clicks.shape
    assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(clicks**2)), rel=1e-3)
    assert np.count_nonzero(np.abs(out) > 1e-3) > 100 * np.count_nonzero(clicks)
