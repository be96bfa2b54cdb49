"""Which student layer is trained to match which teacher layer.

Layers are counted from 1 (hidden state 0 is the front end, see ``colld.encoders.base``).
A *pair* is ``(student_layer, teacher_layer)``; its display name is ``"s{i}->t{j}"``.

Modes:
    "layer-to-layer"   (CoLLD, FitHuBERT): student layer i predicts teacher layer m(i), one
                       teacher layer per student layer. Default m is uniform (below).
    "prediction-heads" (DistilHuBERT): the LAST student layer predicts every listed teacher
                       layer through its own head. Default: ``min(3, L_T)`` teacher layers spread
                       uniformly and ending at L_T (DistilHuBERT's 4/8/12 of 12; 2/4/6 of 6).
"""

from __future__ import annotations

from collections.abc import Sequence

LAYER_MAP_MODES = ("layer-to-layer", "prediction-heads")
DEFAULT_PREDICTION_TARGETS = 3
SOURCE_MAP = "source"
"""layer_map value: each student layer's target is the teacher layer its weights were copied
from (``colld.students.build.source_layers``); the recipe turns it into a list before the
objective is built, because it depends on the student's initialisation."""


def pair_name(pair: tuple[int, int]) -> str:
    """Display name of a (student_layer, teacher_layer) pair, e.g. ``"s3->t5"``."""
    return f"s{pair[0]}->t{pair[1]}"


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """m(i) = ceil(i * L_T / L_S) for i = 1..L_S; the last student layer maps to the last teacher layer.

    >>> uniform_layer_map(4, 6)
    [2, 3, 5, 6]
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(
            f"layer counts must be >= 1, got num_student={num_student}, num_teacher={num_teacher}"
        )
    # Integer ceil division: exact, no float rounding.
    return [(i * num_teacher + num_student - 1) // num_student for i in range(1, num_student + 1)]


def _check_teacher_layers(
    spec: Sequence[int], num_student: int, num_teacher: int, mode: str
) -> list[int]:
    layers: list[int] = []
    for position, value in enumerate(spec):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"layer_map[{position}] = {value!r} is not an integer teacher layer "
                f"(mode {mode!r}, student has {num_student} layers, teacher has {num_teacher})"
            )
        if not 1 <= value <= num_teacher:
            raise ValueError(
                f"layer_map[{position}] = {value} is outside the teacher's layers 1..{num_teacher} "
                f"(mode {mode!r}, student has {num_student} layers, teacher has {num_teacher}; "
                "layer 0 is the front end and cannot be a target)"
            )
        layers.append(value)
    return layers


def resolve_layer_map(
    spec: Sequence[int] | str | None, num_student: int, num_teacher: int, mode: str
) -> list[tuple[int, int]]:
    """Resolve a layer-map spec into (student_layer, teacher_layer) pairs.

    spec: "layer-to-layer": one teacher layer per student layer (length L_S; entry i-1 is
        m(i)); None = ``uniform_layer_map``. "prediction-heads": the teacher layers the last
        student layer predicts (any length >= 1, no repeats); None = ``min(3, L_T)`` layers spread
        uniformly, ending at L_T.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(
            f"layer counts must be >= 1, got num_student={num_student}, num_teacher={num_teacher}"
        )
    if isinstance(spec, str):
        raise ValueError(
            f"layer_map = {spec!r} is not a list of teacher layers; {SOURCE_MAP!r} is resolved "
            "from the student's initialisation (colld.students.build.source_layers) before the "
            "objective is built"
        )
    if mode == "layer-to-layer":
        if spec is None:
            targets = uniform_layer_map(num_student, num_teacher)
        else:
            if len(spec) != num_student:
                raise ValueError(
                    f"layer_map has {len(spec)} entries but mode 'layer-to-layer' needs one "
                    f"teacher layer per student layer: {num_student} entries "
                    f"(student has {num_student} layers, teacher has {num_teacher})"
                )
            targets = _check_teacher_layers(spec, num_student, num_teacher, mode)
        return [(i, j) for i, j in zip(range(1, num_student + 1), targets, strict=True)]
    if mode == "prediction-heads":
        if spec is None:
            num_targets = min(DEFAULT_PREDICTION_TARGETS, num_teacher)
            targets = uniform_layer_map(num_targets, num_teacher)
        else:
            if len(spec) == 0:
                raise ValueError(
                    "layer_map is empty; mode 'prediction-heads' needs at least one teacher "
                    f"layer in 1..{num_teacher} (student has {num_student} layers)"
                )
            targets = _check_teacher_layers(spec, num_student, num_teacher, mode)
            repeated = sorted({j for j in targets if targets.count(j) > 1})
            if repeated:
                raise ValueError(
                    f"layer_map lists teacher layer(s) {repeated} more than once; in mode "
                    "'prediction-heads' each teacher layer gets one head on the last student "
                    f"layer (student has {num_student} layers, teacher has {num_teacher})"
                )
        return [(num_student, j) for j in targets]
    raise ValueError(f"unknown layer-map mode {mode!r}; expected one of {list(LAYER_MAP_MODES)}")
