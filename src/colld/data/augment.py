"""Optional waveform augmentation for distillation (audiomentations), off by default.

The teacher and the student both consume the same augmented, featurised batch, so the
teacher labels the augmented audio and augmentation adds data for free (METHOD.md). It is
meant for the distillation data only; the evaluation part is never augmented.

Transforms, in order (each with its own probability, all inside one ``Compose`` whose ``p`` is
``AugmentConfig.prob``):

1. speed: ``SpeedPerturb`` below: resample to ``sample_rate / speed`` Hz and read the result
   at ``sample_rate`` (Kaldi/ESPnet-style speed perturbation: tempo and pitch change together,
   the length changes by ``1 / speed``). audiomentations' ``Resample`` does the same through
   ``librosa.resample``, whose first call costs ~3.5 s of lazy imports and JIT in every
   DataLoader worker; ``SpeedPerturb`` calls soxr (what librosa uses underneath) directly.
2. pitch: ``audiomentations.PitchShift`` (signalsmith-stretch, the fast method).
3. reverb: ``SyntheticReverb`` below. audiomentations' ``RoomSimulator`` needs
   pyroomacoustics, which is not a dependency of colld; ``ApplyImpulseResponse`` needs
   recorded impulse-response files, which we do not ship. So we convolve with a synthetic
   impulse response: Gaussian noise under an exponential decay reaching -60 dB at a random
   RT60, after a direct-path tap (the usual synthetic-RIR recipe), FFT convolution from scipy.
4. band limit: one of ``BandPassFilter`` (telephone-like band) or ``LowPassFilter``.
5. noise: ``AddGaussianSNR``.
6. gain: ``Gain``.

Reproducibility: audiomentations draws from the global ``random`` and ``numpy.random``
generators. ``Augmenter.__call__`` seeds both from (config seed, epoch, utterance id), applies
the chain, and restores both generators' previous states, so the result depends only on
that triple and callers' random streams are left untouched. Not thread-safe (global state):
use it from one thread per process, as DataLoader workers do.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import audiomentations
import numpy as np
import scipy.signal
import soxr
from audiomentations import (
    AddGaussianSNR,
    BandPassFilter,
    Compose,
    Gain,
    LowPassFilter,
    OneOf,
    PitchShift,
)
from audiomentations.core.transforms_interface import BaseWaveformTransform

logger = logging.getLogger(__name__)

_RANGE_FIELDS = ("noise_snr_db", "speed", "pitch_semitones", "gain_db", "reverb_rt60_s")
_PROB_FIELDS = (
    "prob",
    "noise_prob",
    "speed_prob",
    "pitch_prob",
    "band_limit_prob",
    "gain_prob",
    "reverb_prob",
)


@dataclass(kw_only=True)
class AugmentConfig:
    """Waveform augmentation settings. A transform with probability 0 is left out."""

    enabled: bool = False
    """Augment the distillation audio at all."""
    prob: float = 0.5
    """Probability that a clip goes through the chain (then each transform has its own)."""
    noise_snr_db: tuple[float, float] = (10.0, 40.0)
    """Gaussian noise at a signal-to-noise ratio drawn from this range (dB)."""
    noise_prob: float = 0.5
    """Probability of the noise transform (given the chain runs); likewise ``*_prob`` below."""
    speed: tuple[float, float] = (0.9, 1.1)
    """Speed factor range (resampling: tempo and pitch together; length / speed)."""
    speed_prob: float = 0.5
    """Probability of speed perturbation (the only transform that changes the length)."""
    pitch_semitones: tuple[float, float] = (-2.0, 2.0)
    """Pitch shift range in semitones (tempo kept)."""
    pitch_prob: float = 0.2
    """Kept rarer: PitchShift costs 4-10 ms per second of audio (espeak-ng speech, 2-core CPU,
    load-dependent), over twice the other five transforms together. Speed also moves pitch."""
    band_limit: bool = True
    """Band-limit the audio (a telephone-like band pass or a low pass at 3-7.5 kHz)."""
    band_limit_prob: float = 0.3
    """Probability of band limiting."""
    gain_db: tuple[float, float] = (-6.0, 6.0)
    """Gain range in dB."""
    gain_prob: float = 0.5
    """Probability of the gain change."""
    reverb: bool = True
    """Convolve with a synthetic exponentially decaying room impulse response."""
    reverb_prob: float = 0.3
    """Probability of reverberation."""
    reverb_rt60_s: tuple[float, float] = (0.15, 0.8)
    """Reverberation time (decay to -60 dB) range in seconds."""
    seed: int = 0
    """Seed of the per-clip generators (combined with the epoch and utterance id)."""

    def __post_init__(self) -> None:
        for name in _RANGE_FIELDS:
            value = tuple(float(v) for v in getattr(self, name))  # YAML gives lists
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(
                    f"augment.{name} must be a (low, high) pair with low <= high, "
                    f"found {getattr(self, name)!r}"
                )
            setattr(self, name, value)
        for name in _PROB_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], found {value!r}")
        if not 0.0 < self.speed[0]:
            raise ValueError(f"augment.speed must be > 0, found {self.speed!r}")
        if self.pitch_semitones[0] < -24.0 or self.pitch_semitones[1] > 24.0:
            raise ValueError(
                f"augment.pitch_semitones must lie in [-24, 24], found {self.pitch_semitones!r}"
            )
        if not self.reverb_rt60_s[0] > 0.0:
            raise ValueError(f"augment.reverb_rt60_s must be > 0, found {self.reverb_rt60_s!r}")


class SpeedPerturb(BaseWaveformTransform):
    """Speed perturbation by resampling with soxr (see module doc); changes the length."""

    supports_multichannel = False

    def __init__(self, min_speed: float = 0.9, max_speed: float = 1.1, p: float = 0.5) -> None:
        super().__init__(p)
        self.min_speed = min_speed
        self.max_speed = max_speed

    def randomize_parameters(self, samples: np.ndarray, sample_rate: int) -> None:
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            self.parameters["speed"] = random.uniform(self.min_speed, self.max_speed)

    def apply(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        # Read at ``sample_rate``, audio resampled to ``sample_rate / speed`` plays ``speed`` x faster.
        target_rate = sample_rate / self.parameters["speed"]
        return soxr.resample(samples, sample_rate, target_rate, quality="HQ").astype(np.float32)


class SyntheticReverb(BaseWaveformTransform):
    """Reverberation by convolution with a synthetic room impulse response (see module doc).

    The output keeps the input's length (the reverb tail is cut) and RMS level.
    """

    supports_multichannel = False

    def __init__(self, min_rt60_s: float = 0.15, max_rt60_s: float = 0.8, p: float = 0.5) -> None:
        super().__init__(p)
        self.min_rt60_s = min_rt60_s
        self.max_rt60_s = max_rt60_s

    def randomize_parameters(self, samples: np.ndarray, sample_rate: int) -> None:
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            self.parameters["rt60_s"] = random.uniform(self.min_rt60_s, self.max_rt60_s)
            self.parameters["ir_seed"] = random.getrandbits(32)

    def apply(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        impulse = synthetic_impulse_response(
            self.parameters["rt60_s"], sample_rate, seed=self.parameters["ir_seed"]
        )
        wet = scipy.signal.fftconvolve(samples, impulse)[: samples.shape[0]]
        rms_in = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
        rms_out = float(np.sqrt(np.mean(np.square(wet, dtype=np.float64))))
        if rms_out > 0.0:
            wet *= rms_in / rms_out
        return wet.astype(np.float32)


def synthetic_impulse_response(rt60_s: float, sample_rate: int, *, seed: int) -> np.ndarray:
    """Direct-path tap + exponentially decaying Gaussian noise (-60 dB at ``rt60_s``).

    Shape: (rt60_s * sample_rate,) float32.
    """
    rng = np.random.default_rng(seed)
    num_taps = max(2, int(rt60_s * sample_rate))
    time_s = np.arange(num_taps) / sample_rate
    decay = np.exp(-np.log(1000.0) * time_s / rt60_s)  # amplitude 1e-3 = -60 dB at rt60
    impulse = rng.standard_normal(num_taps) * decay
    impulse *= 0.5 / np.sqrt(np.sum(impulse**2))  # reverberant energy below the direct path
    impulse[0] = 1.0
    return impulse.astype(np.float32)


def clip_seed(seed: int, epoch: int, utterance_id: str, purpose: str) -> int:
    """A 63-bit seed from (seed, epoch, utterance id, purpose); stable across processes."""
    digest = hashlib.blake2b(
        f"{purpose}\x1f{seed}\x1f{epoch}\x1f{utterance_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1


class Augmenter:
    """Applies ``AugmentConfig``'s chain to one clip, reproducibly per (seed, epoch, id).

    sample_rate: the rate of the clips given (the chain is built for it).
    """

    def __init__(self, config: AugmentConfig, sample_rate: int) -> None:
        self.config = config
        self.sample_rate = int(sample_rate)
        self.compose = build_compose(config, self.sample_rate) if config.enabled else None

    @property
    def enabled(self) -> bool:
        return self.compose is not None

    def __call__(self, waveform: np.ndarray, *, utterance_id: str, epoch: int) -> np.ndarray:
        """Augmented copy of ``waveform`` (or the input itself when disabled).

        Shape: (S,) -> (S',): S' = S unless the speed transform ran (S' ~ S / speed).
        """
        if self.compose is None:
            return waveform
        seed = clip_seed(self.config.seed, epoch, utterance_id, "augment")
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            samples = np.ascontiguousarray(waveform, dtype=np.float32)
            out = self.compose(samples=samples, sample_rate=self.sample_rate)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return np.ascontiguousarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """How targets were augmented, for the teacher-target cache fingerprint.

        Disabled: ``{"enabled": False}`` (other settings do not matter then). Enabled: the
        library versions, the config, and each transform with its probability and ranges.
        Augmented audio changes with the epoch, so cached targets are valid for one
        (seed, epoch) only (``varies_with_epoch``).
        """
        if self.compose is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "library": f"audiomentations {audiomentations.__version__}",
            "sample_rate": self.sample_rate,
            "config": asdict(self.config),
            "chain_prob": self.compose.p,
            "transforms": [_describe_transform(t) for t in self.compose.transforms],
            "per_clip_seed": "blake2b('augment', seed, epoch, utterance id)",
            "varies_with_epoch": True,
        }


def build_compose(config: AugmentConfig, sample_rate: int) -> Compose:
    """The audiomentations chain for ``config`` at ``sample_rate`` (see module doc)."""
    transforms: list[Any] = []
    low_speed, high_speed = config.speed
    if config.speed_prob > 0 and (low_speed, high_speed) != (1.0, 1.0):
        transforms.append(
            SpeedPerturb(min_speed=low_speed, max_speed=high_speed, p=config.speed_prob)
        )
    if config.pitch_prob > 0:
        low, high = config.pitch_semitones
        transforms.append(
            PitchShift(min_semitones=low, max_semitones=high, method="signalsmith_stretch",
                       p=config.pitch_prob)
        )  # fmt: skip
    if config.reverb and config.reverb_prob > 0:
        low, high = config.reverb_rt60_s
        transforms.append(SyntheticReverb(min_rt60_s=low, max_rt60_s=high, p=config.reverb_prob))
    if config.band_limit and config.band_limit_prob > 0:
        nyquist = sample_rate / 2
        transforms.append(
            OneOf(
                [
                    # centre ~1-1.8 kHz, bandwidth 1.5-1.99 x centre: ~300-3400 Hz telephone-like
                    BandPassFilter(
                        min_center_freq=1000.0,
                        max_center_freq=1800.0,
                        min_bandwidth_fraction=1.5,
                        max_bandwidth_fraction=1.99,
                        p=1.0,
                    ),
                    LowPassFilter(
                        min_cutoff_freq=min(3000.0, 0.4 * nyquist),
                        max_cutoff_freq=min(7500.0, 0.95 * nyquist),
                        p=1.0,
                    ),
                ],  # fmt: skip
                p=config.band_limit_prob,
            )
        )
    if config.noise_prob > 0:
        low, high = config.noise_snr_db
        transforms.append(AddGaussianSNR(min_snr_db=low, max_snr_db=high, p=config.noise_prob))
    if config.gain_prob > 0:
        low, high = config.gain_db
        transforms.append(Gain(min_gain_db=low, max_gain_db=high, p=config.gain_prob))
    if not transforms:
        logger.warning("augmentation is enabled but every transform has probability 0")
    return Compose(transforms, p=config.prob)


def _describe_transform(transform: Any) -> dict[str, Any]:
    if isinstance(transform, OneOf):
        return {
            "name": "OneOf",
            "p": transform.p,
            "choices": [_describe_transform(t) for t in transform.transforms],
        }
    params = {
        key: value
        for key, value in vars(transform).items()
        if key not in ("parameters", "are_parameters_frozen", "p")
        and isinstance(value, int | float | str | bool)
    }
    return {"name": type(transform).__name__, "p": transform.p, "params": params}


def config_from_dict(values: dict[str, Any]) -> AugmentConfig:
    """``AugmentConfig`` from a plain mapping (YAML); unknown keys are an error naming them."""
    known = {f.name for f in fields(AugmentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown augment setting(s) {unknown}; expected some of {sorted(known)}")
    return AugmentConfig(**values)
