"""Layer maps: uniform default, explicit lists, DistilHuBERT's prediction heads, errors."""

from __future__ import annotations

import math

import pytest

from colld.objectives.layer_map import pair_name, resolve_layer_map, uniform_layer_map


def test_uniform_layer_map_known_values() -> None:
    assert uniform_layer_map(4, 6) == [2, 3, 5, 6]  # METHOD.md's example
    assert uniform_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert uniform_layer_map(2, 12) == [6, 12]
    assert uniform_layer_map(3, 24) == [8, 16, 24]
    assert uniform_layer_map(8, 4) == [1, 1, 2, 2, 3, 3, 4, 4]  # deeper student: repeats


def test_uniform_layer_map_matches_ceil_formula_on_a_grid() -> None:
    for num_student in range(1, 30):
        for num_teacher in range(1, 30):
            layers = uniform_layer_map(num_student, num_teacher)
            expected = [math.ceil(i * num_teacher / num_student) for i in range(1, num_student + 1)]
            assert layers == expected
            assert layers[-1] == num_teacher
            assert all(1 <= j <= num_teacher for j in layers)
            assert layers == sorted(layers)


def test_resolve_layer_to_layer_default_and_explicit() -> None:
    assert resolve_layer_map(None, 4, 6, "layer-to-layer") == [(1, 2), (2, 3), (3, 5), (4, 6)]
    assert resolve_layer_map([1, 1, 6, 6], 4, 6, "layer-to-layer") == [
        (1, 1),
        (2, 1),
        (3, 6),
        (4, 6),
    ]
    assert pair_name((3, 5)) == "s3->t5"


def test_resolve_layer_to_layer_errors_name_entry_and_depths() -> None:
    with pytest.raises(ValueError, match=r"3 entries.*4 entries.*student has 4.*teacher has 6"):
        resolve_layer_map([1, 2, 3], 4, 6, "layer-to-layer")
    with pytest.raises(ValueError, match=r"layer_map\[2\] = 7 .*1\.\.6.*student has 4"):
        resolve_layer_map([1, 2, 7, 6], 4, 6, "layer-to-layer")
    with pytest.raises(ValueError, match=r"layer_map\[0\] = 0 .*front end"):
        resolve_layer_map([0, 2, 3, 6], 4, 6, "layer-to-layer")
    with pytest.raises(ValueError, match=r"layer_map\[1\] = '2' is not an integer"):
        resolve_layer_map([1, "2", 3, 6], 4, 6, "layer-to-layer")  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"unknown layer-map mode 'l2l'.*layer-to-layer"):
        resolve_layer_map(None, 4, 6, "l2l")


def test_prediction_heads_default_spread_ends_at_last_teacher_layer() -> None:
    assert resolve_layer_map(None, 2, 12, "prediction-heads") == [(2, 4), (2, 8), (2, 12)]
    assert resolve_layer_map(None, 2, 6, "prediction-heads") == [(2, 2), (2, 4), (2, 6)]
    assert resolve_layer_map(None, 3, 2, "prediction-heads") == [(3, 1), (3, 2)]
    assert resolve_layer_map(None, 1, 1, "prediction-heads") == [(1, 1)]


def test_prediction_heads_explicit_and_errors() -> None:
    assert resolve_layer_map([3, 6], 2, 6, "prediction-heads") == [(2, 3), (2, 6)]
    with pytest.raises(ValueError, match=r"teacher layer\(s\) \[6\] more than once"):
        resolve_layer_map([6, 3, 6], 2, 6, "prediction-heads")
    with pytest.raises(ValueError, match="empty"):
        resolve_layer_map([], 2, 6, "prediction-heads")
    with pytest.raises(ValueError, match=r"layer_map\[0\] = 9 .*1\.\.6"):
        resolve_layer_map([9], 2, 6, "prediction-heads")
