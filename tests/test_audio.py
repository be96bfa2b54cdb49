"""colld.audio: constants, load_audio on good and bad files, and the per-family front ends
checked against the Hugging Face extractors called the standard way on real (espeak-ng) speech."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from colld import audio
from colld.audio import (
    SAMPLE_RATE,
    AudioError,
    FrontEnd,
    audio_duration,
    conv_receptive_field,
    load_audio,
)

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog while the band plays on.",
    "de": "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
}


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Real speech: espeak-ng (22050 Hz) read through load_audio, i.e. resampled to 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("espeak")
    clips = {}
    for language, text in SENTENCES.items():
        wav = folder / f"{language}.wav"
        subprocess.run(["espeak-ng", "-v", language, "-w", str(wav), text], check=True)
        assert sf.info(str(wav)).samplerate == 22050
        clips[language] = load_audio(wav)
    return clips


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------- constants
def test_constants_agree_with_hf_defaults() -> None:
    whisper = WhisperFeatureExtractor()
    assert (whisper.n_fft, whisper.hop_length) == (audio.N_FFT, audio.HOP_LENGTH) == (400, 160)
    assert (whisper.n_samples, whisper.nb_max_frames) == (audio.N_SAMPLES, audio.N_FRAMES)
    assert WhisperConfig().max_source_positions == audio.N_FRAMES // audio.WHISPER_CONV_STRIDE
    w2v = Wav2Vec2Config()
    assert tuple(w2v.conv_kernel) == audio.WAV2VEC2_CONV_KERNEL
    assert tuple(w2v.conv_stride) == audio.WAV2VEC2_CONV_STRIDE
    seamless = SeamlessM4TFeatureExtractor()
    assert seamless.stride == audio.FBANK_STACK
    assert Wav2Vec2BertConfig().feature_projection_input_dim == 80 * audio.FBANK_STACK
    assert audio.ENCODER_FRAMES_PER_SECOND == 50
    assert audio.WAV2VEC2_RECEPTIVE_FIELD == 400 and audio.WAV2VEC2_HOP == 320


def test_conv_receptive_field() -> None:
    assert conv_receptive_field([10], [5]) == 10
    assert conv_receptive_field([3, 3], [1, 1]) == 5
    assert conv_receptive_field([10, 3], [5, 2]) == 20
    with pytest.raises(ValueError, match="2 conv kernels but 1 strides"):
        conv_receptive_field([3, 3], [1])


# ---------------------------------------------------------------- load_audio
@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_load_audio_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tone{suffix}"
    sf.write(path, _sine(440, 1.0, SAMPLE_RATE), SAMPLE_RATE)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    if suffix == ".mp3":  # lossy codec: length from decoder padding may differ slightly
        assert abs(len(x) - SAMPLE_RATE) <= 0.01 * SAMPLE_RATE
    else:
        assert len(x) == SAMPLE_RATE
    assert abs(_peak_hz(x, SAMPLE_RATE) - 440) <= 2
    assert abs(audio_duration(path) - 1.0) < 0.01


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_load_audio_resamples(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, _sine(440, 1.5, rate), rate)
    x = load_audio(path)
    assert abs(len(x) - 1.5 * SAMPLE_RATE) <= 1
    assert abs(_peak_hz(x, SAMPLE_RATE) - 440) < 1.0  # resolution 0.67 Hz
    rms_mid = np.sqrt(np.mean(x[2000:-2000] ** 2))
    assert abs(rms_mid - 0.5 / np.sqrt(2)) < 0.01
    # and to another target rate
    assert abs(len(load_audio(path, sample_rate=8000)) - 1.5 * 8000) <= 1


def test_load_audio_downmixes_stereo(tmp_path: Path) -> None:
    left, right = _sine(440, 1.0, 44100, 0.6), _sine(1000, 1.0, 44100, 0.2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    x = load_audio(path)
    assert x.ndim == 1 and abs(len(x) - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(x)) / (len(x) / 2)
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    assert spectrum[np.argmin(abs(freqs - 440))] == pytest.approx(0.3, abs=0.01)  # 0.6 / 2
    assert spectrum[np.argmin(abs(freqs - 1000))] == pytest.approx(0.1, abs=0.01)  # 0.2 / 2


def test_load_audio_offset_and_duration(tmp_path: Path) -> None:
    ramp = np.linspace(-0.5, 0.5, SAMPLE_RATE, dtype=np.float32)
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, SAMPLE_RATE, subtype="FLOAT")
    part = load_audio(path, offset_s=0.25, duration_s=0.5)
    np.testing.assert_array_equal(part, ramp[4000:12000])
    np.testing.assert_array_equal(load_audio(path, offset_s=0.75), ramp[12000:])


def _write_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected AudioError.reason)."""
    tone = _sine(440, 1.0, SAMPLE_RATE)
    for suffix in (".wav", ".flac", ".ogg", ".mp3"):
        sf.write(folder / f"ok{suffix}", tone, SAMPLE_RATE)
    cases: dict[str, tuple[Path, str]] = {}

    def cut(name: str, source: str, keep: float, reason: str) -> None:
        data = (folder / source).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
        cases[name] = (folder / name, reason)

    cut("truncated.wav", "ok.wav", 0.5, "truncated")
    cut("truncated.flac", "ok.flac", 0.5, "unreadable")  # FLAC decoder loses sync
    cut("truncated.mp3", "ok.mp3", 0.4, "truncated")
    cut("truncated.ogg", "ok.ogg", 0.5, "unreadable")
    cut("header_only.wav", "ok.wav", 0.0007, "unreadable")  # 30 bytes: no data chunk
    (folder / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = (folder / "empty.wav", "empty")
    (folder / "text.wav").write_text("this is not audio\n" * 20)
    cases["text.wav"] = (folder / "text.wav", "unsupported")
    (folder / "movie.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(500))
    cases["movie.m4a"] = (folder / "movie.m4a", "unsupported")
    sf.write(folder / "zero.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    cases["zero.wav"] = (folder / "zero.wav", "empty")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        bad = tone.copy()
        bad[123] = value
        sf.write(folder / name, bad, SAMPLE_RATE, subtype="FLOAT")
        cases[name] = (folder / name, "non_finite")
    cases["missing.wav"] = (folder / "missing.wav", "missing")
    cases["a_folder.wav"] = (folder / "a_folder.wav", "missing")
    (folder / "a_folder.wav").mkdir()
    return cases


def test_load_audio_rejects_bad_files(tmp_path: Path) -> None:
    cases = _write_bad_files(tmp_path)
    for name, (path, reason) in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(path)
        assert info.value.reason == reason, (name, str(info.value))
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert isinstance(info.value, ValueError)
    for suffix in (".wav", ".flac", ".ogg", ".mp3"):  # the sources of the cut files are fine
        assert len(load_audio(tmp_path / f"ok{suffix}")) > 0


def test_audio_duration_sees_header_problems(tmp_path: Path) -> None:
    cases = _write_bad_files(tmp_path)
    header_visible = {"truncated.wav", "truncated.ogg", "header_only.wav", "empty.wav"}
    header_visible |= {"text.wav", "movie.m4a", "zero.wav", "missing.wav", "a_folder.wav"}
    for name in header_visible:
        with pytest.raises(AudioError):
            audio_duration(cases[name][0])
    # only a full decode shows these
    for name in ("nan.wav", "inf.wav", "truncated.flac"):
        assert audio_duration(cases[name][0]) == pytest.approx(1.0)


def test_streaming_wav_with_unknown_length_is_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "stream.wav"
    sf.write(path, _sine(440, 0.5, SAMPLE_RATE), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # data chunk size "unknown" (piped writer)
    path.write_bytes(bytes(data))
    assert len(load_audio(path)) == SAMPLE_RATE // 2


# ---------------------------------------------------------------- front ends
def _cuts(x: np.ndarray) -> list[np.ndarray]:
    """The whole clip and cuts that end in the middle of speech (any sample count)."""
    return [x] + [x[:n] for n in (16000, 17777, 24001, len(x) - 4567)]


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_whisper_front_end_matches_30s_padded_reference(
    speech: dict[str, np.ndarray], num_mel_bins: int
) -> None:
    front_end = FrontEnd.for_family("whisper", feature_size=num_mel_bins)
    reference_fe = WhisperFeatureExtractor(feature_size=num_mel_bins)
    worst = 0.0
    for clip in speech.values():
        for x in _cuts(clip):
            features = front_end(x)
            num_frames = len(x) // 160
            assert (
                features.shape
                == (num_frames, num_mel_bins)
                == (front_end.frames(len(x)), front_end.feature_dim)
            )
            assert features.dtype == torch.float32
            reference = reference_fe(x, sampling_rate=16000, return_tensors="np")["input_features"][
                0
            ]
            assert reference.shape == (num_mel_bins, 3000)
            worst = max(worst, float(np.abs(features.numpy() - reference[:, :num_frames].T).max()))
    assert worst <= 1e-5  # measured: 0.0 on these clips


def test_whisper_unpadded_without_tail_would_differ(speech: dict[str, np.ndarray]) -> None:
    """Why FrontEnd pads n_fft + hop zeros: with padding="longest" alone the STFT reflects
    speech into the last frame of a clip that ends mid-speech."""
    extractor = WhisperFeatureExtractor()
    x = speech["en"][:40000]
    reference = extractor(x, sampling_rate=16000, return_tensors="np")["input_features"][0]
    naive = extractor(
        x, sampling_rate=16000, padding="longest", truncation=False, return_tensors="np"
    )
    naive_last = naive["input_features"][0][:, 249]
    assert np.abs(naive_last - reference[:, 249]).max() > 0.05
    assert np.abs(FrontEnd(extractor)(x).numpy()[249] - reference[:, 249]).max() <= 1e-5


def test_w2v_bert_front_end_matches_reference(speech: dict[str, np.ndarray]) -> None:
    front_end = FrontEnd.for_family("wav2vec2-bert")
    reference_fe = SeamlessM4TFeatureExtractor()
    assert front_end.feature_dim == 160 and front_end.frames_per_second == 50
    worst = 0.0
    for clip in speech.values():
        for x in _cuts(clip):
            features = front_end(x)
            reference = reference_fe(x, sampling_rate=16000, return_tensors="np")
            num_valid = int(reference["attention_mask"][0].sum())
            assert features.shape == (num_valid, 160) == (front_end.frames(len(x)), 160)
            diff = np.abs(features.numpy() - reference["input_features"][0, :num_valid])
            worst = max(worst, float(diff.max()))
    assert worst <= 1e-5  # measured: 0.0


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm", "data2vec-audio"])
def test_waveform_front_end_matches_reference(speech: dict[str, np.ndarray], family: str) -> None:
    front_end = FrontEnd.for_family(family)
    assert front_end.is_waveform and front_end.feature_dim is None
    x = speech["de"]
    values = front_end(x)
    reference = Wav2Vec2FeatureExtractor()(x, sampling_rate=16000, return_tensors="np")[
        "input_values"
    ][0]
    assert values.shape == (len(x),) == (front_end.frames(len(x)),)
    assert np.abs(values.numpy() - reference).max() <= 1e-6
    assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-3
    raw = FrontEnd.for_family(family, do_normalize=False)(x)
    np.testing.assert_array_equal(raw.numpy(), x)


@pytest.mark.parametrize("family", ["whisper", "wav2vec2-bert", "wav2vec2"])
def test_frames_and_min_samples(family: str) -> None:
    front_end = FrontEnd.for_family(family)
    rng = np.random.default_rng(0)
    lengths = [
        front_end.min_samples,
        front_end.min_samples + 1,
        559,
        560,
        561,
        719,
        720,
        4000,
        4001,
    ]
    for n in lengths:
        if n < front_end.min_samples:
            continue
        features = front_end(rng.standard_normal(n).astype(np.float32) * 0.1)
        assert features.shape[0] == front_end.frames(n) >= 1, (family, n)
    with pytest.raises(AudioError, match="shorter than") as info:
        front_end(np.zeros(front_end.min_samples - 1, np.float32))
    assert info.value.reason == "too_short"
    assert front_end.min_samples == {"whisper": 160, "wav2vec2-bert": 560, "wav2vec2": 400}[family]


def test_min_samples_is_what_the_encoders_accept() -> None:
    """The shortest clip gives one encoder frame in real (tiny, random) HF models."""
    torch.manual_seed(0)
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    w2v = Wav2Vec2Model(Wav2Vec2Config(**tiny, conv_dim=(8,) * 7, num_conv_pos_embeddings=4)).eval()
    front_end = FrontEnd.for_family("wav2vec2")
    with torch.no_grad():
        x = torch.randn(front_end.min_samples).numpy()
        assert w2v(front_end(x)[None]).last_hidden_state.shape[1] == 1
        with pytest.raises(RuntimeError):  # one sample less is below the conv receptive field
            w2v(torch.randn(1, front_end.min_samples - 1))
    bert = Wav2Vec2BertModel(
        Wav2Vec2BertConfig(**tiny, output_hidden_size=16, conv_depthwise_kernel_size=3)
    ).eval()
    front_end = FrontEnd.for_family("wav2vec2-bert")
    with torch.no_grad():
        features = front_end(torch.randn(front_end.min_samples).numpy())
        assert bert(features[None]).last_hidden_state.shape[1] == 1


def test_front_end_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown family 'conformer'.*whisper"):
        FrontEnd.for_family("conformer")
    with pytest.raises(TypeError, match="found object"):
        FrontEnd(object())
    front_end = FrontEnd.for_family("whisper")
    with pytest.raises(ValueError, match="1-D numpy array"):
        front_end(np.zeros((2, 16000), np.float32))
    bad = np.zeros(16000, np.float32)
    bad[5] = np.nan
    with pytest.raises(AudioError) as info:
        front_end(bad)
    assert info.value.reason == "non_finite"
    assert front_end.max_samples == 30 * SAMPLE_RATE
    assert FrontEnd.for_family("wav2vec2", min_samples=800).min_samples == 800
