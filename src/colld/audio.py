"""Audio constants, loading and the per-family feature front ends.

Every constant below is derived from a few primitives (sample rate, window and hop in
milliseconds, Whisper's context length, the conv stacks of the encoder families) and checked
at import: if two of them disagree the module refuses to load (as openai/whisper's audio.py).

Shape legend (see ``colld.encoders.base``): S samples, F front-end frames, C feature channels.

Front ends wrap the Hugging Face feature extractor each family was trained with and return
the features of ONE clip, unpadded:

| family                                    | HF extractor                 | output        | F per second |
|-------------------------------------------|------------------------------|---------------|--------------|
| whisper                                   | WhisperFeatureExtractor      | (F, 80 / 128) | 100          |
| wav2vec2-bert (w2v-BERT 2.0)              | SeamlessM4TFeatureExtractor  | (F, 160)      | 50           |
| wav2vec2, hubert, wavlm, data2vec-audio   | Wav2Vec2FeatureExtractor     | (S,)          | 16000        |
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor
from transformers import (
    SeamlessM4TFeatureExtractor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- primitives
SAMPLE_RATE = 16000  # Hz; every family in colld was pre-trained at 16 kHz
WINDOW_MS = 25  # STFT / fbank analysis window
HOP_MS = 10  # STFT / fbank frame shift
CHUNK_LENGTH = 30  # seconds: Whisper's context (1500 encoder positions)
WHISPER_CONV_STRIDE = 2  # Whisper conv2 halves the mel frame rate
FBANK_STACK = 2  # w2v-BERT 2.0 stacks 2 fbank frames into one 160-dim frame
# wav2vec 2.0 / HuBERT / WavLM / data2vec-audio waveform conv stack (HF config defaults)
WAV2VEC2_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC2_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def conv_receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples seen by one output frame of a stack of 1-D convs without padding."""
    if len(kernels) != len(strides):
        raise ValueError(f"{len(kernels)} conv kernels but {len(strides)} strides")
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def _exact_div(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise RuntimeError(f"colld.audio constants disagree: {what} = {numerator}/{denominator}")
    return numerator // denominator


# ---------------------------------------------------------------- derived
N_FFT = _exact_div(SAMPLE_RATE * WINDOW_MS, 1000, "window samples")  # 400
HOP_LENGTH = _exact_div(SAMPLE_RATE * HOP_MS, 1000, "hop samples")  # 160
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a Whisper context
N_FRAMES = _exact_div(N_SAMPLES, HOP_LENGTH, "mel frames per context")  # 3000
FRAMES_PER_SECOND = _exact_div(SAMPLE_RATE, HOP_LENGTH, "mel frames per second")  # 100
WAV2VEC2_RECEPTIVE_FIELD = conv_receptive_field(WAV2VEC2_CONV_KERNEL, WAV2VEC2_CONV_STRIDE)  # 400
WAV2VEC2_HOP = math.prod(WAV2VEC2_CONV_STRIDE)  # 320 samples per encoder frame
# Encoder frames per second: the same 50 Hz for every family (checked below).
ENCODER_FRAMES_PER_SECOND = _exact_div(FRAMES_PER_SECOND, WHISPER_CONV_STRIDE, "Whisper frames/s")
_FAMILY_RATES = {
    "w2v-BERT": _exact_div(FRAMES_PER_SECOND, FBANK_STACK, "w2v-BERT frames/s"),
    "wav2vec2": _exact_div(SAMPLE_RATE, WAV2VEC2_HOP, "wav2vec2 frames/s"),
}
if any(rate != ENCODER_FRAMES_PER_SECOND for rate in _FAMILY_RATES.values()):
    raise RuntimeError(
        f"colld.audio constants disagree: Whisper gives {ENCODER_FRAMES_PER_SECOND} encoder "
        f"frames/s, the others {_FAMILY_RATES}"
    )
if WAV2VEC2_RECEPTIVE_FIELD != N_FFT:
    raise RuntimeError(
        f"colld.audio constants disagree: the wav2vec2 conv stack sees {WAV2VEC2_RECEPTIVE_FIELD} "
        f"samples, expected one {WINDOW_MS} ms window ({N_FFT})"
    )

FAMILIES = ("whisper", "wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert")
WAVEFORM_FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")

AudioErrorReason = Literal[
    "missing", "empty", "unsupported", "unreadable", "truncated", "non_finite", "too_short"
]


class AudioError(ValueError):
    """Audio that cannot be used. ``path`` names the file (None for an in-memory clip),
    ``reason`` is one of ``AudioErrorReason`` (for counting), ``cause`` says what was found."""

    def __init__(self, path: str | Path | None, cause: str, *, reason: AudioErrorReason):
        self.path = None if path is None else str(path)
        self.cause = cause
        self.reason = reason
        super().__init__(f"{self.path}: {cause}" if self.path is not None else cause)


# ---------------------------------------------------------------- loading
# libsndfile tolerates a WAV whose data chunk is cut short (it reads what is there) but notes
# it in its log as "data : <declared> (should be <actual>)". Streaming writers leave the size
# at 0 or 0xFFFFFFFF (unknown length): those are not truncations.
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)
# Formats whose frame count in the header is an estimate (MP3 without a Xing/Info header):
# a decoded length within this share of the declared one is accepted.
_LENGTH_SLACK = 0.01


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    *,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    channel: int | None = None,
) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate`` (any format libsndfile reads:
    wav, flac, ogg, mp3, ...). Channels are averaged unless ``channel`` picks one; the rate is
    converted with soxr (HQ).

    offset_s, duration_s: read only this part of the file (seconds at the file's own rate).
    channel: None = the mean of all channels; an int = that channel (0-based) alone.

    Shape: (S,).
    Raises AudioError (reason ``missing``, ``empty``, ``unsupported``, ``unreadable``,
    ``truncated``, ``non_finite``) naming the path and what was wrong.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found", reason="missing")
    if not path.is_file():
        raise AudioError(path, "not a regular file", reason="missing")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)", reason="empty")
    try:
        with sf.SoundFile(path) as f:
            native_rate = f.samplerate
            if channel is not None and not 0 <= channel < f.channels:
                raise AudioError(
                    path,
                    f"channel {channel} requested, the file has {f.channels} (0-based)",
                    reason="unsupported",
                )
            _check_wav_data_size(path, f.extra_info)
            start = round(offset_s * native_rate)
            wanted = f.frames - start if duration_s is None else round(duration_s * native_rate)
            wanted = max(0, min(wanted, f.frames - start))
            if start:
                f.seek(start)
            data = f.read(wanted, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        raise _libsndfile_error(path, err) from err
    if data.shape[0] < wanted * (1.0 - _LENGTH_SLACK):
        raise AudioError(
            path,
            f"truncated: the header declares {wanted} frames, only {data.shape[0]} could be decoded",
            reason="truncated",
        )
    if data.shape[0] == 0:
        raise AudioError(path, "zero-length audio (no samples)", reason="empty")
    finite = np.isfinite(data)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise AudioError(
            path,
            f"{len(bad)} NaN/Inf samples (first at frame {bad[0, 0]}, channel {bad[0, 1]})",
            reason="non_finite",
        )
    if channel is not None:
        waveform = data[:, channel]
    else:
        waveform = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if native_rate != sample_rate:
        waveform = soxr.resample(waveform, native_rate, sample_rate, quality="HQ")
        if waveform.shape[0] == 0:
            raise AudioError(
                path, f"{data.shape[0]} samples at {native_rate} Hz give none at {sample_rate} Hz",
                reason="empty",
            )  # fmt: skip
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _libsndfile_error(path: Path, err: Exception) -> AudioError:
    message = str(err)
    if "not recognised" in message:
        return AudioError(
            path, f"unsupported or unrecognised format ({message})", reason="unsupported"
        )
    return AudioError(path, f"corrupt, truncated or unreadable ({message})", reason="unreadable")


def _check_wav_data_size(path: Path, extra_info: str) -> None:
    match = _WAV_DATA_SIZE.search(extra_info)
    if match is None:
        return
    declared, actual = int(match.group(1)), int(match.group(2))
    if declared not in _UNKNOWN_WAV_SIZES and actual < declared:
        raise AudioError(
            path,
            f"truncated WAV: the data chunk declares {declared} bytes, the file holds {actual}",
            reason="truncated",
        )


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header, without decoding the samples.

    Catches what the header shows (missing, empty, unsupported, truncated WAV); a corrupt
    FLAC/MP3 body or NaN samples show only when decoding (``load_audio``). Raises AudioError.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found", reason="missing")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)", reason="empty")
    try:
        with sf.SoundFile(path) as f:
            _check_wav_data_size(path, f.extra_info)
            frames, rate = f.frames, f.samplerate
    except sf.SoundFileError as err:
        raise _libsndfile_error(path, err) from err
    if frames <= 0 or rate <= 0:
        raise AudioError(path, "zero-length audio (no samples)", reason="empty")
    return frames / rate


# ---------------------------------------------------------------- front ends
class FrontEnd:
    """The front end a family was trained with, for ONE clip at ``sample_rate``, unpadded.

    Wraps a Hugging Face feature extractor and calls it through its public ``__call__``:
    - ``WhisperFeatureExtractor``: log-mel, F = S // hop frames, no 30 s padding. The clip is
      padded with zeros by ``n_fft + hop`` samples only (the extractor's own
      ``padding="max_length"`` with ``max_length=S + n_fft + hop``, ``truncation=False``) and
      the first F frames are kept. Every frame that overlaps the clip then sees exactly the
      samples it sees in Whisper's 30 s zero-padded input (the STFT's reflect padding at the
      end reflects zeros), and the clamp to ``max - 8`` uses the same maximum, so the values
      equal the 30 s reference on those frames (measured 0.0 difference on espeak-ng speech;
      ``padding="longest"`` alone would reflect speech into the last frame: up to 0.26 off).
    - ``SeamlessM4TFeatureExtractor`` (w2v-BERT 2.0): 80-bin kaldi fbank normalised per bin
      over the clip, 2 frames stacked -> 160 dims, ``padding=False`` (an odd last fbank frame
      is dropped, as the extractor's attention mask does for a padded batch).
    - ``Wav2Vec2FeatureExtractor``: the waveform, zero mean unit variance per clip when the
      extractor's ``do_normalize`` is set.

    Attributes: ``sample_rate``, ``is_waveform``, ``feature_dim`` (C, None for waveforms),
    ``min_samples`` (shortest clip the family's encoder accepts), ``max_samples`` (longest, or
    None), ``frames_per_second`` (front-end frames, samples for waveforms), ``kind``.
    """

    def __init__(self, feature_extractor: Any, *, min_samples: int | None = None) -> None:
        extractor = getattr(feature_extractor, "feature_extractor", feature_extractor)  # processors
        self.feature_extractor = extractor
        self.max_samples: int | None = None
        if isinstance(extractor, WhisperFeatureExtractor):
            self.kind = "whisper-log-mel"
            self.is_waveform = False
            self.feature_dim: int | None = int(extractor.feature_size)
            self._hop = int(extractor.hop_length)
            # Whisper's conv stack (kernel 3, padding 1) accepts a single mel frame.
            default_min = self._hop
            self.max_samples = int(extractor.n_samples)
        elif isinstance(extractor, SeamlessM4TFeatureExtractor):
            self.kind = "kaldi-fbank-stacked"
            self.is_waveform = False
            self.feature_dim = int(extractor.num_mel_bins) * int(extractor.stride)
            self._hop = HOP_LENGTH  # the extractor hard-codes a 400-sample window, 160 hop
            # one stacked frame = `stride` fbank frames (also keeps the per-bin variance finite)
            default_min = N_FFT + (int(extractor.stride) - 1) * HOP_LENGTH
        elif isinstance(extractor, Wav2Vec2FeatureExtractor):
            self.kind = "waveform"
            self.is_waveform = True
            self.feature_dim = None
            self._hop = 1
            default_min = WAV2VEC2_RECEPTIVE_FIELD
        else:
            raise TypeError(
                f"FrontEnd supports WhisperFeatureExtractor, SeamlessM4TFeatureExtractor and "
                f"Wav2Vec2FeatureExtractor, found {type(extractor).__name__}"
            )
        self.sample_rate: int = int(extractor.sampling_rate)
        self.min_samples: int = default_min if min_samples is None else int(min_samples)
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, found {self.min_samples}")

    @classmethod
    def for_family(cls, family: str, *, min_samples: int | None = None, **kw: Any) -> FrontEnd:
        """The default front end of ``family`` (one of ``FAMILIES``); ``kw`` go to the HF
        extractor (e.g. ``feature_size=128`` for Whisper large-v3, ``do_normalize=False``).
        For a real checkpoint prefer ``FrontEnd(AutoFeatureExtractor.from_pretrained(dir))``."""
        kw.setdefault("sampling_rate", SAMPLE_RATE)
        if family == "whisper":
            extractor: Any = WhisperFeatureExtractor(**kw)
        elif family == "wav2vec2-bert":
            extractor = SeamlessM4TFeatureExtractor(**kw)
        elif family in WAVEFORM_FAMILIES:
            extractor = Wav2Vec2FeatureExtractor(**kw)
        else:
            raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
        return cls(extractor, min_samples=min_samples)

    @property
    def frames_per_second(self) -> float:
        """Front-end frames per second of audio (samples per second for waveforms)."""
        if self.kind == "kaldi-fbank-stacked":
            return self.sample_rate / self._hop / self.feature_extractor.stride
        return self.sample_rate / self._hop

    def frames(self, num_samples: int) -> int:
        """Front-end frames F (samples S for waveforms) produced from ``num_samples``."""
        if self.kind == "whisper-log-mel":
            return num_samples // self._hop
        if self.kind == "kaldi-fbank-stacked":
            num_fbank = 0 if num_samples < N_FFT else 1 + (num_samples - N_FFT) // self._hop
            return num_fbank // int(self.feature_extractor.stride)
        return num_samples

    def __call__(self, waveform: np.ndarray) -> Tensor:
        """Features of one clip at ``sample_rate``.

        Shape: (S,) float -> (F, C) float32 for spectral families, (S,) for waveform ones.
        Raises AudioError (reason ``too_short``/``non_finite``) for a clip the encoder cannot take.
        """
        waveform = self._check(waveform)
        fe = self.feature_extractor
        if self.kind == "whisper-log-mel":
            num_samples = waveform.shape[0]
            tail = int(fe.n_fft) + self._hop  # >= n_fft/2 + hop is needed; see the class doc
            mel = fe(
                waveform,
                sampling_rate=self.sample_rate,
                padding="max_length",
                max_length=num_samples + tail,
                truncation=False,
                return_tensors="np",
            )["input_features"][0]  # (C, F + tail // hop)
            features = mel[:, : self.frames(num_samples)].T  # (F, C)
        elif self.kind == "kaldi-fbank-stacked":
            features = fe(
                waveform,
                sampling_rate=self.sample_rate,
                padding=False,
                pad_to_multiple_of=None,
                return_tensors="np",
            )["input_features"][0]  # (F, C)
        else:
            features = fe(waveform, sampling_rate=self.sample_rate, return_tensors="np")[
                "input_values"
            ][0]  # (S,)
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

    def _check(self, waveform: np.ndarray) -> np.ndarray:
        if not isinstance(waveform, np.ndarray) or waveform.ndim != 1:
            raise ValueError(
                f"FrontEnd expects one mono clip as a 1-D numpy array, found "
                f"{type(waveform).__name__} of shape {getattr(waveform, 'shape', None)}"
            )
        if waveform.shape[0] < self.min_samples:
            raise AudioError(
                None,
                f"clip of {waveform.shape[0]} samples is shorter than the {self.min_samples} "
                f"samples the {self.kind} front end needs",
                reason="too_short",
            )
        if not np.isfinite(waveform).all():
            raise AudioError(None, "clip holds NaN/Inf samples", reason="non_finite")
        return waveform.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (
            f"FrontEnd(kind={self.kind!r}, sample_rate={self.sample_rate}, "
            f"feature_dim={self.feature_dim}, min_samples={self.min_samples})"
        )
