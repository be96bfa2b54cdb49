"""data.train_hours: a fixed, nested prefix of the training data."""

from __future__ import annotations

import pytest

from colld.data.manifest import Utterance
from colld.train.data_setup import take_hours


def _utts(n: int, seconds: float = 360.0) -> list[Utterance]:
    return [Utterance(id=f"u{i:03d}", path=f"u{i:03d}.wav", duration=seconds) for i in range(n)]


def test_take_hours_is_a_nested_prefix_in_manifest_order() -> None:
    utts = _utts(40)  # 40 x 6 min = 4 h
    small, large = take_hours(utts, 0.5, "m"), take_hours(utts, 2.0, "m")
    assert len(small) == 5 and len(large) == 20  # 5 x 6 min reaches 0.5 h
    assert {u.id for u in small} < {u.id for u in large}  # nested
    assert [u.id for u in large] == sorted(u.id for u in large)  # manifest order kept
    assert [u.id for u in large] != [u.id for u in utts[:20]]  # not just the first rows
    assert take_hours(utts, 0.5, "m") == small  # the same every call
    assert take_hours(utts, 4.0, "m") == utts


def test_take_hours_refuses_more_than_there_is() -> None:
    with pytest.raises(
        ValueError, match=r"train_hours = 5 but the training data \(m.jsonl\) holds only 4.000 h"
    ):
        take_hours(_utts(40), 5.0, "m.jsonl")
