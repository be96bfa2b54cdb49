"""What ``colld evaluate`` accepts as a model: a teacher spec, a student directory, or fbank."""

from __future__ import annotations

import re
from pathlib import Path

from colld.students.export import DISTILL_HEADS_FILE, PROVENANCE_FILE, load_student
from colld.teachers import LoadedModel, load_teacher

FBANK = "fbank"
"""The baseline: the front-end features themselves (80-bin Whisper log-mel, one "layer")."""


def is_student_dir(spec: str) -> bool:
    """A directory written by ``export_student`` (colld.json or distillation heads beside it)."""
    path = Path(spec)
    return path.is_dir() and (
        (path / PROVENANCE_FILE).is_file() or (path / DISTILL_HEADS_FILE).is_file()
    )


def load_model_spec(spec: str) -> LoadedModel | None:
    """Load what ``spec`` names, frozen and in eval mode; None for the ``fbank`` baseline.

    Order: "fbank", an exported student directory, then a teacher spec (embedded name,
    CTranslate2 dir, HF dir, hub id). A path that exists but holds no model is refused with a
    message that says what was expected.
    """
    if spec == FBANK:
        return None
    if is_student_dir(spec):
        return load_student(spec)
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"model '{spec}' is a file; expected 'fbank', an exported student directory, "
            "a teacher name (whisper-base, whisper-tiny.en), a CTranslate2 or HF model directory"
        )
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "model.bin")):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(
            f"model directory '{spec}' holds no model (no config.json or model.bin; found "
            f"{found}); expected an exported student, a CTranslate2 or a HF model directory"
        )
    return load_teacher(spec)


def file_slug(label: str) -> str:
    """A file-name-safe version of a model label (result files, feature caches, plots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "model"


def describe(spec: str) -> str:
    """A short label for tables: "fbank", the teacher spec, or "student:<run dir name>"."""
    if is_student_dir(spec):
        return f"student:{Path(spec).resolve().parent.name}"
    return spec
