"""Feature extraction: padded batches equal single clips, fbank, skips and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from colld.audio import FrontEnd, load_audio
from colld.data.manifest import Utterance
from colld.eval.features import FBANK_FINGERPRINT, cache_key, extract_features
from colld.teachers.base import LoadedModel
from colld.teachers.hf import wrap_hf_teacher
from colld.testing import tiny_model

SAMPLE_RATE = 16000


def _write_clips(root: Path, durations: list[float], seed: int = 0) -> list[Utterance]:
    """Sine plus noise clips at 16 kHz, one per duration, with manifest rows (relative paths)."""
    rng = np.random.default_rng(seed)
    utterances = []
    for n, duration in enumerate(durations):
        t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
        wave = 0.3 * np.sin(2 * np.pi * (150 + 60 * n) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(root / f"clip{n}.wav", wave.astype(np.float32), SAMPLE_RATE)
        utterances.append(
            Utterance(id=f"clip{n}", path=f"clip{n}.wav", duration=duration, language="en")
        )
    return utterances


def _tiny(family: str, **overrides) -> LoadedModel:
    module = tiny_model(family, num_layers=2, hidden=32, heads=2, ffn=64, **overrides)
    return wrap_hf_teacher(module, source=f"tiny-{family}")


def _alone(model: LoadedModel, utt: Utterance, root: Path) -> torch.Tensor:
    """All hidden states of one clip run alone. Shape: (L + 1, T, D)."""
    front_end = FrontEnd(model.feature_extractor)
    features = front_end(load_audio(root / utt.path, front_end.sample_rate))
    with torch.inference_mode():
        out = model.encoder(features[None], torch.tensor([features.shape[0]]))
    return torch.stack([out.hidden_states[j][0] for j in sorted(out.hidden_states)])


@pytest.mark.parametrize("family", ["whisper", "wav2vec2", "wav2vec2-stable"])
def test_padded_batch_equals_each_clip_alone(tmp_path: Path, family: str) -> None:
    durations = [0.45, 0.3, 0.6] if family == "whisper" else [0.25, 0.15, 0.2]
    utterances = _write_clips(tmp_path, durations)
    model = _tiny(family)
    features = extract_features(model, utterances, tmp_path, show_progress=False)
    assert [u.id for u in features.utterances] == [u.id for u in utterances]  # input order
    assert features.num_layers == 3 and features.dim == 32 and not features.skipped
    assert features.frame_rate == model.encoder.frame_rate
    for utt, states in zip(utterances, features.states, strict=True):
        alone = _alone(model, utt, tmp_path)
        assert states.dtype == torch.float16 and states.shape == alone.shape
        torch.testing.assert_close(states.float(), alone, atol=2e-2, rtol=1e-2)
    # a batch really held several clips of different lengths (whisper: 25 frames vs 15 / 30)
    assert len({s.shape[1] for s in features.states}) == 3


def test_fbank_is_one_layer_of_80_bins_at_100_fps(tmp_path: Path) -> None:
    utterances = _write_clips(tmp_path, [1.0, 0.5])
    features = extract_features(None, utterances, tmp_path, show_progress=False)
    assert features.model == "fbank" and features.fingerprint == FBANK_FINGERPRINT
    assert features.frame_rate == 100.0
    assert [tuple(s.shape) for s in features.states] == [(1, 100, 80), (1, 50, 80)]


def test_a_region_row_is_featurised_from_its_region_only(tmp_path: Path) -> None:
    """A row that is a region of a longer file (a lhotse segment) gives the features of that
    region, including a region that starts at 0 s; its cache key differs from the whole file's."""
    (whole,) = _write_clips(tmp_path, [1.0])
    head = Utterance(id="head", path=whole.path, duration=0.5, offset=0.0)
    tail = Utterance(id="tail", path=whole.path, duration=0.25, offset=0.6)
    features = extract_features(None, [whole, head, tail], tmp_path, show_progress=False)
    assert [tuple(s.shape) for s in features.states] == [(1, 100, 80), (1, 50, 80), (1, 25, 80)]
    front_end = FrontEnd.for_family("whisper")  # the fbank baseline's front end
    audio = load_audio(tmp_path / whole.path, SAMPLE_RATE)
    for row, states in zip([head, tail], features.states[1:], strict=True):
        start = int(row.offset * SAMPLE_RATE)
        region = audio[start : start + int(row.duration * SAMPLE_RATE)]
        torch.testing.assert_close(states[0].float(), front_end(region), atol=2e-2, rtol=1e-2)
    as_whole = Utterance(id="head", path=whole.path, duration=0.5)
    assert cache_key("fp", front_end, [head]) != cache_key("fp", front_end, [as_whole])
    left = Utterance(id="head", path=whole.path, duration=0.5, offset=0.0, channel=0)
    assert cache_key("fp", front_end, [head]) != cache_key("fp", front_end, [left])


def test_bad_audio_is_skipped_and_recorded(tmp_path: Path) -> None:
    utterances = _write_clips(tmp_path, [0.3, 0.4])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(tmp_path / "blip.wav", np.zeros(50, dtype=np.float32), SAMPLE_RATE)
    bad = [
        Utterance(id="garbage", path="garbage.wav", duration=1.0),
        Utterance(id="missing", path="nowhere.wav", duration=1.0),
        Utterance(id="blip", path="blip.wav", duration=50 / SAMPLE_RATE),
    ]
    rows = [utterances[0], *bad, utterances[1]]
    features = extract_features(_tiny("whisper"), rows, tmp_path, show_progress=False)
    assert [u.id for u in features.utterances] == ["clip0", "clip1"]
    assert set(features.skipped) == {"garbage", "missing", "blip"}
    assert features.skipped["missing"].startswith("missing")
    assert features.skipped["blip"].startswith("too_short")
    with pytest.raises(ValueError, match="no usable utterance"):
        extract_features(None, bad, tmp_path, show_progress=False)


def test_clip_longer_than_the_encoder_accepts_is_skipped(tmp_path: Path) -> None:
    utterances = _write_clips(tmp_path, [0.5, 1.5])
    model = _tiny("whisper", max_source_positions=50)  # 50 positions = 1 s at 50 frames/s
    features = extract_features(model, utterances, tmp_path, show_progress=False)
    assert [u.id for u in features.utterances] == ["clip0"]
    assert features.skipped["clip1"].startswith("too_long")


def _refuse_to_run(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args, **_kwargs):
        raise AssertionError("the encoder ran although the cache should have been used")

    monkeypatch.setattr(model.encoder, "forward", fail)


def test_cache_is_reused_for_the_same_request_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    utterances = _write_clips(tmp_path, [0.3, 0.5, 0.4])
    cache = tmp_path / "cache"
    model = _tiny("whisper")
    first = extract_features(model, utterances, tmp_path, cache_dir=cache, show_progress=False)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    _refuse_to_run(model, monkeypatch)
    again = extract_features(model, utterances, tmp_path, cache_dir=cache, show_progress=False)
    assert [u.id for u in again.utterances] == [u.id for u in first.utterances]
    assert all(torch.equal(a, b) for a, b in zip(first.states, again.states, strict=True))
    assert again.frame_rate == first.frame_rate and again.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="cache should have been used"):
        extract_features(model, utterances[:2], tmp_path, cache_dir=cache, show_progress=False)
    changed = [utterances[0], utterances[1], Utterance(id="clip2", path="clip2.wav", duration=0.41)]
    with pytest.raises(AssertionError, match="cache should have been used"):
        extract_features(model, changed, tmp_path, cache_dir=cache, show_progress=False)


def test_cache_file_with_other_metadata_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    utterances = _write_clips(tmp_path, [0.3, 0.5])
    cache = tmp_path / "cache"
    model = _tiny("whisper")
    extract_features(model, utterances, tmp_path, cache_dir=cache, show_progress=False)
    (path,) = cache.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(f.metadata()["colld_features"])
    meta["fingerprint"] = "someone-else"
    save_file(tensors, str(path), metadata={"colld_features": json.dumps(meta)})
    _refuse_to_run(model, monkeypatch)
    with pytest.raises(AssertionError, match="cache should have been used"):
        extract_features(model, utterances, tmp_path, cache_dir=cache, show_progress=False)
