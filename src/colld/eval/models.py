"""What ``colld evaluate`` accepts as a model: a teacher spec, a student directory, fbank, or
an ONNX export (``colld export --onnx``: a .onnx file, or its folder when it holds one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from colld.students.export import DISTILL_HEADS_FILE, PROVENANCE_FILE, load_student
from colld.teachers import LoadedModel, load_teacher

if TYPE_CHECKING:
    from colld.deploy.onnx import LoadedOnnx

FBANK = "fbank"
"""The baseline: the front-end features themselves (80-bin Whisper log-mel, one "layer")."""
ONNX_SUFFIX = ".onnx"
_TORCH_MODEL_FILES = ("config.json", "model.bin")


def is_student_dir(spec: str) -> bool:
    """A directory written by ``export_student`` (colld.json or distillation heads beside it)."""
    path = Path(spec)
    return path.is_dir() and (
        (path / PROVENANCE_FILE).is_file() or (path / DISTILL_HEADS_FILE).is_file()
    )


def onnx_file(spec: str) -> Path | None:
    """The ONNX file ``spec`` names, or None when it names none.

    ``spec`` names one when it ends in .onnx (the file need not exist: loading it then says so)
    or is a folder without a torch model (no colld.json, config.json or model.bin) that holds
    .onnx files; a folder with several is refused (ValueError listing them).
    """
    path = Path(spec)
    if path.suffix == ONNX_SUFFIX:
        return path
    if not path.is_dir() or is_student_dir(spec):
        return None
    if any((path / name).is_file() for name in _TORCH_MODEL_FILES):
        return None
    found = sorted(path.glob(f"*{ONNX_SUFFIX}"))
    if len(found) > 1:
        raise ValueError(
            f"folder '{spec}' holds {len(found)} ONNX files ({', '.join(f.name for f in found)}); "
            f"name one, e.g. {found[0]}"
        )
    return found[0] if found else None


def load_model_spec(spec: str) -> LoadedModel | None:
    """Load what ``spec`` names as a PyTorch model, frozen and in eval mode; None for the
    ``fbank`` baseline.

    Order: "fbank", an exported student directory, then a teacher spec (embedded name,
    CTranslate2 dir, HF dir, hub id). A path that exists but holds no model is refused with a
    message that says what was expected; so is an ONNX export (``load_eval_model`` takes it).
    """
    if spec == FBANK:
        return None
    if is_student_dir(spec):
        return load_student(spec)
    if onnx_file(spec) is not None:
        raise ValueError(
            f"model '{spec}' is an ONNX export; this needs a PyTorch model (an exported student "
            "directory or a teacher spec). `colld evaluate` accepts ONNX exports"
        )
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"model '{spec}' is a file; expected 'fbank', an exported student directory, "
            "a teacher name (whisper-base, whisper-tiny.en), a CTranslate2 or HF model "
            "directory, or an ONNX export (.onnx)"
        )
    if path.is_dir() and not any((path / name).is_file() for name in _TORCH_MODEL_FILES):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(
            f"model directory '{spec}' holds no model (no config.json, model.bin or .onnx; "
            f"found {found}); expected an exported student, a CTranslate2, HF or ONNX export "
            "directory"
        )
    return load_teacher(spec)


def load_eval_model(spec: str) -> LoadedModel | LoadedOnnx | None:
    """What ``colld evaluate`` runs: ``load_model_spec``, or for an ONNX export (``onnx_file``)
    the onnxruntime runner with its front end, on as many intra-op threads as torch uses."""
    path = onnx_file(spec)
    if path is None:
        return load_model_spec(spec)
    from colld.deploy.onnx import load_onnx_model  # needs the deploy extra

    return load_onnx_model(path, source=spec, threads=torch.get_num_threads())


def file_slug(label: str) -> str:
    """A file-name-safe version of a model label (result files, feature caches, plots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "model"


def describe(spec: str) -> str:
    """A short label for tables: "fbank", the teacher spec, "student:<run dir name>", or
    "onnx:<file> (<folder>)" (the file first: model.onnx and model.int8.onnx keep distinct
    result files when ``file_slug`` cuts a long folder name)."""
    if is_student_dir(spec):
        return f"student:{Path(spec).resolve().parent.name}"
    path = onnx_file(spec)
    if path is not None:
        return f"onnx:{path.name} ({path.resolve().parent.name})"
    return spec
