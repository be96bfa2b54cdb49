"""Exported CTC models reload with transformers' ForCTC classes (wav2vec 2.0 families) or
``load_ctc_model`` (every family, Whisper included) and give the logits they gave before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCTC,
    AutoTokenizer,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)

from colld.audio import FrontEnd
from colld.data.batch import pad_features
from colld.encoders import wrap_encoder
from colld.finetune.export import (
    CTC_INFO_FILE,
    HEAD_FILE,
    SCORES_FILE,
    VOCAB_FILE,
    export_ctc_model,
    load_ctc_model,
)
from colld.finetune.labels import build_vocabulary
from colld.finetune.model import CTCModel
from colld.testing import harmonic_tone, tiny_model

TOKENS = [list("ab ba"), list("cab")]


def _feature_extractor(family: str):
    if family == "whisper":
        return WhisperFeatureExtractor(feature_size=80)
    if family == "wav2vec2-bert":
        return SeamlessM4TFeatureExtractor()
    return Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


def _trained_like_model(family: str) -> CTCModel:
    """A tiny CTC model with non-trivial head weights (as if trained)."""
    extra = {"feature_projection_input_dim": 160, "add_adapter": False}
    if family == "wavlm":
        extra = {"num_buckets": 16, "max_bucket_distance": 64}
    elif family != "wav2vec2-bert":
        extra = {}
    encoder = wrap_encoder(
        tiny_model(family, num_layers=2, hidden=32, heads=2, ffn=64, seed=1, **extra)
    )
    torch.manual_seed(2)
    model = CTCModel(encoder, len(build_vocabulary(TOKENS)), final_dropout=0.1)
    return model.eval()


def _inputs(family: str) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    clips = [harmonic_tone(s, rng) for s in (0.5, 0.3)]
    frontend = FrontEnd(_feature_extractor(family))
    features, lengths = pad_features([frontend(c) for c in clips], frontend.feature_dim)
    return features, lengths, clips


@pytest.mark.parametrize(
    "family", ["wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert"]
)
def test_for_ctc_export_reloads_with_auto_model_for_ctc_and_equal_logits(
    tmp_path: Path, family: str
) -> None:
    model = _trained_like_model(family)
    features, lengths, _ = _inputs(family)
    with torch.no_grad():
        before = model(features, lengths)
    vocabulary = build_vocabulary(TOKENS)
    out = export_ctc_model(
        model, _feature_extractor(family), vocabulary, "chars", tmp_path / "model",
        metadata={"steps": 3}, scores={"test": None},
    )  # fmt: skip
    hf = AutoModelForCTC.from_pretrained(out).eval()
    assert type(hf).__name__.endswith("ForCTC")
    assert hf.config.vocab_size == len(vocabulary) and hf.config.pad_token_id == 0
    # One clip at a time: on a padded batch colld's data2vec-audio adapter zeroes the padding
    # between its stacked positional convs, which HF does not (colld.encoders.hf).
    key = "input_features" if family == "wav2vec2-bert" else "input_values"
    for row, num_inputs in enumerate(lengths.tolist()):
        clip = features[row : row + 1, :num_inputs]
        with torch.no_grad():
            want = model(clip, lengths[row : row + 1]).logits
            got = hf(**{key: clip}).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    loaded = load_ctc_model(out)
    with torch.no_grad():
        again = loaded.model(features, lengths)
    torch.testing.assert_close(again.logits, before.logits, atol=1e-6, rtol=1e-6)
    assert loaded.vocabulary.tokens == vocabulary.tokens
    assert json.loads((out / SCORES_FILE).read_text()) == {"test": None}
    assert json.loads((out / CTC_INFO_FILE).read_text())["steps"] == 3


def test_chars_tokenizer_loads_offline_and_decodes_like_greedy_ctc(tmp_path: Path) -> None:
    model = _trained_like_model("wav2vec2")
    vocabulary = build_vocabulary(TOKENS)
    out = export_ctc_model(
        model, _feature_extractor("wav2vec2"), vocabulary, "chars", tmp_path / "m", metadata={}
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = [vocabulary.tokens.index(t) for t in ["a", "a", "<blank>", "a", " ", "b"]]
    assert tokenizer.decode(ids) == "aa b"
    assert json.loads((out / VOCAB_FILE).read_text())["|"] == vocabulary.tokens.index(" ")


def test_whisper_export_reloads_through_load_ctc_model_with_equal_logits(tmp_path: Path) -> None:
    model = _trained_like_model("whisper")
    features, lengths, clips = _inputs("whisper")
    with torch.no_grad():
        before = model(features, lengths)
    vocabulary = build_vocabulary(TOKENS)
    out = export_ctc_model(
        model, _feature_extractor("whisper"), vocabulary, "phonemes", tmp_path / "model",
        metadata={},
    )  # fmt: skip
    assert (out / HEAD_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["WhisperEncoder"]
    assert not (out / "tokenizer_config.json").exists()  # phonemes: vocab.json only
    loaded = load_ctc_model(out)
    with torch.no_grad():
        again = loaded.model(features, lengths)
    torch.testing.assert_close(again.logits, before.logits, atol=1e-6, rtol=1e-6)
    texts = loaded.transcribe(clips)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_load_ctc_model_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ctc.json not found.*colld finetune"):
        load_ctc_model(tmp_path)
    out = export_ctc_model(
        _trained_like_model("whisper"), _feature_extractor("whisper"), build_vocabulary(TOKENS),
        "chars", tmp_path / "model", metadata={},
    )  # fmt: skip
    (out / HEAD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="ctc_head.safetensors not found"):
        load_ctc_model(out)


def test_models_with_an_adapter_are_refused_before_training() -> None:
    from colld.finetune.export import check_exportable

    encoder = wrap_encoder(
        tiny_model("wav2vec2", num_layers=2, hidden=32, heads=2, ffn=64, add_adapter=True)
    )
    with pytest.raises(ValueError, match="runs adapter after its encoder"):
        check_exportable(encoder)
