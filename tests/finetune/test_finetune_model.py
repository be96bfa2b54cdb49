"""The CTC model, its loss and the labels: a toy overfit, greedy decoding, OOV counting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from colld.data.batch import Batch, pad_features
from colld.data.manifest import Utterance
from colld.encoders import wrap_encoder
from colld.eval.tasks import BLANK, UNK
from colld.finetune.labels import (
    build_vocabulary,
    ctc_frames_needed,
    label_split,
    load_vocabulary,
    task_for_units,
    vocabulary_json,
)
from colld.finetune.model import CTCModel, ctc_batch_loss, ctc_loss, greedy_decode
from colld.testing import harmonic_tone, tiny_model


def _features(family: str, seconds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tones as the family's input. Shape: (B, F, 80) log-mel for Whisper, (B, S) waveforms."""
    rng = np.random.default_rng(0)
    clips = [torch.from_numpy(harmonic_tone(s, rng)) for s in seconds]
    if family == "whisper":
        from transformers import WhisperFeatureExtractor

        from colld.audio import FrontEnd

        frontend = FrontEnd(WhisperFeatureExtractor(feature_size=80))
        return pad_features([frontend(c.numpy()) for c in clips], 80)
    return pad_features(clips)


@pytest.mark.parametrize("family", ["whisper", "wav2vec2"])
def test_ctc_loss_goes_down_on_a_toy_overfit(family: str) -> None:
    torch.manual_seed(0)
    extra = {} if family == "whisper" else {"layerdrop": 0.0}  # the adapter refuses LayerDrop
    encoder = wrap_encoder(tiny_model(family, num_layers=2, hidden=32, heads=2, ffn=64, **extra))
    model = CTCModel(encoder, vocab_size=6, final_dropout=0.0).train()
    features, lengths = _features(family, [0.5, 0.4])
    batch = Batch(["a", "b"], features, lengths, torch.tensor([0.5, 0.4]))
    targets = {"a": [2, 3, 4, 2], "b": [5, 3, 3]}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out, _ = ctc_batch_loss(model, batch, targets)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        losses.append(float(out.total.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_greedy_decode_collapses_repeats_and_drops_blanks_within_lengths() -> None:
    ids = torch.tensor([[0, 2, 2, 0, 2, 3, 3, 1], [4, 4, 0, 0, 0, 0, 5, 5]])
    logits = torch.nn.functional.one_hot(ids, 6).float()  # (B, T, V)
    assert greedy_decode(logits, torch.tensor([8, 3])) == [[2, 2, 3, 1], [4]]


def test_ctc_loss_is_zero_for_an_impossible_alignment_not_inf() -> None:
    logits = torch.randn(1, 2, 5)
    assert float(ctc_loss(logits, torch.tensor([2]), [[1, 2, 3]])) == 0.0
    assert ctc_frames_needed([1, 1, 2]) == 4 and ctc_frames_needed([1, 2, 3]) == 3


def _utt(uid: str, text: str | None, duration: float = 1.0, language: str = "en") -> Utterance:
    return Utterance(id=uid, path=f"{uid}.wav", duration=duration, text=text, language=language)


def test_out_of_vocabulary_symbols_are_counted_mapped_to_unk_and_kept_in_references(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = task_for_units("chars")
    vocabulary = build_vocabulary([["a", "b"], ["b", " ", "a"]])
    assert vocabulary.tokens == [BLANK, UNK, " ", "a", "b"]
    rows = [_utt("u0", "Ab, z!"), _utt("u1", "béé"), _utt("u2", "ba"), _utt("u3", None)]
    caplog.set_level(logging.WARNING)
    split = label_split("test.jsonl", rows, task, vocabulary, max_duration=20.0)
    assert dict(split.oov) == {"z": 1, "é": 2}
    assert split.oov_ids == ["u0", "u1"]
    assert split.unlabelled == ["u3"]
    assert split.targets["u1"] == [4, 1, 1]  # b, <unk>, <unk>
    assert split.references["u1"] == ["b", "é", "é"]  # scored as errors
    assert split.targets["u0"] == [3, 4, 2, 1]  # punctuation is dropped (not heard)
    summary = split.summary()
    assert summary["oov_symbols"] == {"é": 2, "z": 1}
    assert summary["oov_utterances"] == {"count": 2, "ids": ["u0", "u1"]}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "test.jsonl: 3 out-of-vocabulary symbols in 2 utterances" in messages
    assert "u0, u1" in messages and "'é' x2" in messages
    assert "1 rows left out (no 'text' label): u3" in messages


def test_rows_too_long_or_too_short_for_their_label_are_left_out() -> None:
    task = task_for_units("phonemes")
    rows = [
        Utterance(id="long", path="x", duration=30.0, phonemes="a b"),
        Utterance(id="short", path="y", duration=0.05, phonemes="a b a b a"),
        Utterance(id="ok", path="z", duration=1.0, phonemes="a b"),
    ]
    vocabulary = build_vocabulary([["a", "b"]])
    split = label_split(
        "train", rows, task, vocabulary, max_duration=20.0, frame_rate=50.0
    )  # "short": 2 frames for 5 phonemes
    assert [u.id for u in split.utterances] == ["ok"]
    assert split.too_long == ["long"] and split.too_short == ["short"]


def test_vocabulary_file_round_trip_and_errors_name_the_file(tmp_path: Path) -> None:
    vocabulary = build_vocabulary([list("ab a")])
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocabulary_json(vocabulary, "chars")))
    assert json.loads(path.read_text())["|"] == 2  # the space as the HF word delimiter
    assert load_vocabulary(path, "chars").tokens == vocabulary.tokens
    path.write_text(json.dumps({"a": 0, "<unk>": 1}))
    with pytest.raises(ValueError, match=r"vocab.json: expected id 0 = '<blank>'"):
        load_vocabulary(path, "chars")
    path.write_text(json.dumps({"<blank>": 0, "<unk>": 2}))
    with pytest.raises(ValueError, match="ids must be 0..1 without gaps"):
        load_vocabulary(path, "chars")
    with pytest.raises(ValueError, match="units must be one of"):
        task_for_units("words")


def test_cer_aggregates_alphabetic_languages_and_the_table_says_how_many() -> None:
    from colld.finetune.recipe import score_split, score_table

    task = task_for_units("chars")
    rows = [_utt("en0", "ab", language="en"), _utt("zh0", "中文", language="zh")]
    vocabulary = build_vocabulary([["a", "b"], ["中", "文"]])
    split = label_split("probe-test", rows, task, vocabulary, max_duration=20.0)
    a, b, zhong = (vocabulary.tokens.index(t) for t in ("a", "b", "中"))
    scored = score_split(task, vocabulary, split, {"en0": [a, b], "zh0": [zhong]})
    assert scored["value"] == 0.0  # English only: Han is not alphabetic
    assert scored["per_language"]["zh"] == {"value": 0.5, "utterances": 1}
    assert (scored["utterances"], scored["aggregate_utterances"]) == (2, 1)
    report = {"metric": "cer", "test": scored, "test_split": "probe-test",
              "aggregate": "alphabetic languages", "selected_step": 4, "steps": 6}  # fmt: skip
    table = score_table(report)
    assert "aggregate         1   0.000" in table and "zh                1   0.500" in table
