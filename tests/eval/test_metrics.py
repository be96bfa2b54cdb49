"""Edit-distance error rates against hand-computed edits."""

from __future__ import annotations

import pytest

from colld.eval.metrics import (
    character_error_rate,
    edit_counts,
    error_rate,
    phoneme_error_rate,
)


def test_one_substitution() -> None:
    counts = edit_counts([["a", "b", "c"]], [["a", "x", "c"]])
    assert (counts.substitutions, counts.deletions, counts.insertions) == (1, 0, 0)
    assert counts.rate == pytest.approx(1 / 3)


def test_one_insertion() -> None:
    counts = edit_counts([["a", "b"]], [["a", "x", "b"]])
    assert (counts.substitutions, counts.deletions, counts.insertions) == (0, 0, 1)
    assert counts.rate == pytest.approx(1 / 2)


def test_one_deletion() -> None:
    counts = edit_counts([["a", "b", "c"]], [["a", "c"]])
    assert (counts.substitutions, counts.deletions, counts.insertions) == (0, 1, 0)
    assert counts.rate == pytest.approx(1 / 3)


def test_empty_hypothesis_deletes_every_token() -> None:
    counts = edit_counts([["t", "s", "a"]], [[]])
    assert counts.deletions == 3 and counts.edits == 3
    assert phoneme_error_rate([["t", "s", "a"]], [[]]) == 1.0


def test_multi_character_tokens_are_compared_whole() -> None:
    # "ts" vs "t s": one substitution plus one insertion, not a match
    assert phoneme_error_rate([["ts", "a"]], [["t", "s", "a"]]) == pytest.approx(2 / 2)
    assert phoneme_error_rate(["aʊ s".split()], ["aʊ s".split()]) == 0.0


def test_corpus_level_sums_edits_over_utterances() -> None:
    # utterance 1: 0 edits of 4 tokens; utterance 2: 2 edits of 1 token.
    # corpus level: 2 / 5 = 0.4 (a mean of per-utterance rates would give 1.0)
    refs = [["a", "b", "c", "d"], ["x"]]
    hyps = [["a", "b", "c", "d"], ["y", "z"]]
    assert error_rate(refs, hyps) == pytest.approx(0.4)


def test_insertions_can_exceed_one() -> None:
    assert error_rate([["a"]], [["b", "c", "d"]]) == pytest.approx(3.0)


def test_character_error_rate_counts_the_space() -> None:
    assert character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 6)
    assert character_error_rate(["ab c"], ["abc"]) == pytest.approx(1 / 4)
    assert character_error_rate(["ab", "c"], ["ab", ""]) == pytest.approx(1 / 3)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rate([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="no token"):
        error_rate([[]], [["a"]])
