"""Probe tasks: labels from manifest fields, vocabularies, skips and scores."""

from __future__ import annotations

import pytest

from colld.data.manifest import Utterance
from colld.eval.tasks import (
    BLANK,
    UNK,
    SplitLabels,
    char_tokens,
    get_task,
    is_alphabetic,
    prepare_task,
    score,
)


def _utt(n: int, language: str | None = "en", voice: str | None = "v1", text: str | None = "ab",
         phonemes: str | None = "a b") -> Utterance:  # fmt: skip
    return Utterance(id=f"u{n}", path=f"u{n}.wav", duration=1.0, language=language, voice=voice,
                     text=text, phonemes=phonemes)  # fmt: skip


def test_char_tokens_keep_letters_marks_and_one_space() -> None:
    assert char_tokens("Hello,  World!") == list("hello world")
    assert char_tokens("  Der Arzt sagt.  ") == list("der arzt sagt")
    # Bengali vowel signs and virama are combining marks: kept
    assert char_tokens("ডাক্তার") == ["ড", "া", "ক", "্", "ত", "া", "র"]
    # Persian zero-width non-joiner and Japanese full stop are not heard: dropped
    assert char_tokens("می\u200cخواهم") == list("میخواهم")
    assert char_tokens("いしゃ。") == list("いしゃ")
    assert char_tokens("?!") == []


def test_alphabetic_scripts() -> None:
    assert all(is_alphabetic(code) for code in ("en", "ru", "uk", "el", "hy", "vi"))
    assert not any(is_alphabetic(code) for code in ("ar", "fa", "bn", "zh", "ja", "xx", ""))


def test_lid_vocabulary_from_train_and_unseen_classes_left_out() -> None:
    train = [_utt(0, "en"), _utt(1, "de"), _utt(2, "en"), _utt(3, None)]
    dev = [_utt(4, "de"), _utt(5, "fr")]
    test = [_utt(6, "fr"), _utt(7, "en")]
    data = prepare_task(get_task("lid"), train, dev, test)
    assert not isinstance(data, str)
    assert data.vocabulary.tokens == ["de", "en"]
    assert data.train.indices == [0, 1, 2] and data.train.num_unlabelled == 1
    assert data.train.targets == [[1], [0], [1]]
    assert data.dev.indices == [0] and data.dev.num_unseen == 1
    assert data.test.indices == [1] and data.test.references == [["en"]]


def test_sequence_vocabulary_has_blank_unk_and_maps_unseen_tokens() -> None:
    train = [_utt(0, phonemes="a b"), _utt(1, phonemes="b ts")]
    dev = [_utt(2, phonemes="a")]
    test = [_utt(3, phonemes="ts ʃ a")]
    data = prepare_task(get_task("pr"), train, dev, test)
    assert not isinstance(data, str)
    assert data.vocabulary.tokens == [BLANK, UNK, "a", "b", "ts"]
    assert data.test.targets == [[4, 1, 2]]
    assert data.test.references == [["ts", "ʃ", "a"]]  # the reference keeps the real token


def test_tasks_without_labels_are_skipped_with_a_reason() -> None:
    rows = [_utt(0, phonemes=None), _utt(1, phonemes=None)]
    reason = prepare_task(get_task("pr"), rows, rows, rows)
    assert isinstance(reason, str) and "phonemes" in reason and "probe-train" in reason
    labelled = [_utt(0, voice="a"), _utt(1, voice="b")]
    reason = prepare_task(get_task("sid"), labelled, labelled, [_utt(2, voice=None)])
    assert isinstance(reason, str) and "probe-test" in reason
    one_class = [_utt(0, "en"), _utt(1, "en")]
    reason = prepare_task(get_task("lid"), one_class, one_class, one_class)
    assert isinstance(reason, str) and "two classes" in reason
    with pytest.raises(ValueError, match="unknown probe task 'asr'"):
        get_task("asr")


def test_char_score_aggregates_alphabetic_languages_only() -> None:
    split = SplitLabels(indices=[0, 1, 2], targets=[[], [], []],
                        references=[list("abcd"), list("医生"), list("ab")],
                        languages=["en", "zh", "ru"])  # fmt: skip
    hypotheses = [list("abcd"), list("好"), list("a")]
    result = score(get_task("char"), split, hypotheses)
    assert result.value == pytest.approx(1 / 6)  # en 0 of 4 + ru 1 of 2; zh left out
    assert result.per_language == pytest.approx({"en": 0.0, "ru": 0.5, "zh": 1.0})
    only_han = SplitLabels(indices=[0], targets=[[]], references=[list("医生")], languages=["zh"])
    assert score(get_task("char"), only_han, [list("医")]).value == pytest.approx(0.5)


def test_accuracy_overall_and_per_language() -> None:
    split = SplitLabels(
        indices=[0, 1, 2, 3],
        targets=[[0]] * 4,
        references=[["a"], ["b"], ["a"], ["b"]],
        languages=["en", "en", "de", "de"],
    )
    result = score(get_task("sid"), split, [["a"], ["a"], ["a"], ["a"]])
    assert result.value == pytest.approx(0.5)
    assert result.per_language == {"de": 0.5, "en": 0.5}
    pr = score(get_task("pr"), split, [["a"], ["b"], [], ["b", "c"]])
    assert pr.value == pytest.approx(2 / 4)
