"""Export a trained student as a plain Hugging Face model directory, and load it back.

The directory (written to a temporary sibling and renamed into place, so it is either complete
or absent):
    config.json, model.safetensors   ``student.model.save_pretrained`` (transformers 5 always
                                     writes safetensors). For Whisper: the ``WhisperEncoder``
                                     alone (config model_type "whisper", architectures
                                     ["WhisperEncoder"], no decoder weights; the config's
                                     decoder_* fields are the teacher's and unused).
    preprocessor_config.json         the teacher's feature extractor.
    distill_heads.safetensors        training-only tensors, never inside the model weights: the
                                     caller's ``extra_files["distill_heads.safetensors"]``
                                     (distillation heads) plus the wrapper's own training-only
                                     parameters under "encoder." (Whisper's mask embedding).
    <name>.safetensors               any other ``extra_files`` entry.
    colld.json                       provenance (``metadata``): teacher spec and fingerprint,
                                     the objective's settings and layer pairs, the run config;
                                     read back by ``read_provenance``.
    README.md                        the model card (``colld.students.card``), from the
                                     provenance; ``colld evaluate`` fills in its efficiency and
                                     scores sections later.

For wav2vec 2.0-family students the exported config gets the teacher's SpecAugment values back
(``mask_time_prob``, ``mask_feature_prob``; see ``colld.students.build``); ``masked_spec_embed``
stays in the weights, and still loads when the teacher's ``mask_time_prob`` was 0 because
then the student's value is kept. LayerDrop stays 0 (the student was trained without it).

Loading with transformers alone (no colld)::

    from transformers import AutoFeatureExtractor, AutoModel
    model = AutoModel.from_pretrained(path)          # Wav2Vec2Model, HubertModel, WavLMModel,
                                                     # Data2VecAudioModel, Wav2Vec2BertModel
    extractor = AutoFeatureExtractor.from_pretrained(path)
    # Whisper students hold an encoder only ("architectures": ["WhisperEncoder"]):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    encoder = WhisperEncoder.from_pretrained(path)   # AutoModel would build a WhisperModel
    # HF's WhisperEncoder.forward wants 3000 mel frames (30 s); colld's WhisperSpeechEncoder
    # runs any length up to 30 s (see colld.encoders.whisper).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoFeatureExtractor, AutoModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.fsutil import atomic_dir
from colld.students.build import EXPORT_OVERRIDES_ATTR
from colld.students.card import CARD_FILE, render_card, student_facts
from colld.teachers.base import LoadedModel
from colld.teachers.hf import weight_files_fingerprint

logger = logging.getLogger(__name__)

DISTILL_HEADS_FILE = "distill_heads.safetensors"
PROVENANCE_FILE = "colld.json"
ENCODER_PREFIX = "encoder."
_RESERVED_FILES = {"model.safetensors", "config.json", "preprocessor_config.json"}


def export_student(
    student: SpeechEncoder,
    feature_extractor: Any,
    out_dir: str | Path,
    *,
    extra_files: dict[str, dict[str, Tensor]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``student`` as a Hugging Face model directory (see the module docstring).

    extra_files: file name (ending in .safetensors) -> tensors, written beside the model.
    metadata: JSON-ready provenance written as ``colld.json``.
    An existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    files = _training_only_files(student, extra_files or {})
    with atomic_dir(out_dir) as tmp:
        student.model.save_pretrained(tmp)
        _write_export_config(student, tmp)
        feature_extractor.save_pretrained(tmp)
        for name, tensors in files.items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / name),
                metadata={"format": "pt"},
            )
        if metadata is not None:
            text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False)
            (tmp / PROVENANCE_FILE).write_text(text + "\n", encoding="utf-8")
        card = render_card(student_facts(student), metadata, name=out_dir.name)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    logger.info("exported %s student to %s", student.family, out_dir)
    return out_dir


def load_student(path: str | Path) -> LoadedModel:
    """Load an exported student with transformers and wrap it (eval mode, float32).

    Dispatches on ``config.json``'s ``architectures``: ``WhisperEncoder`` ->
    ``WhisperEncoder.from_pretrained``, anything else -> ``AutoModel.from_pretrained``. The
    wrapper's training-only parameters (Whisper's mask embedding) are restored from
    ``distill_heads.safetensors`` when present.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found; expected a directory written by export_student"
        )
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if "WhisperEncoder" in architectures:
        model = WhisperEncoder.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    encoder = wrap_encoder(model)
    heads_file = path / DISTILL_HEADS_FILE
    if heads_file.is_file():
        own = {
            name[len(ENCODER_PREFIX) :]: tensor
            for name, tensor in load_file(str(heads_file)).items()
            if name.startswith(ENCODER_PREFIX)
        }
        if own:
            _load_wrapper_tensors(encoder, own, heads_file)
    encoder.eval()
    return LoadedModel(
        encoder=encoder,
        feature_extractor=AutoFeatureExtractor.from_pretrained(path),
        source=str(path),
        fingerprint=weight_files_fingerprint(path),
    )


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """``colld.json`` of an exported student (None when the directory has none)."""
    file = Path(path) / PROVENANCE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def wrapper_only_parameters(student: SpeechEncoder) -> dict[str, Tensor]:
    """Parameters of the wrapper outside ``student.model`` (e.g. Whisper's mask embedding)."""
    return {
        name: param for name, param in student.named_parameters() if not name.startswith("model.")
    }


def _training_only_files(
    student: SpeechEncoder, extra_files: dict[str, dict[str, Tensor]]
) -> dict[str, dict[str, Tensor]]:
    files = {name: dict(tensors) for name, tensors in extra_files.items()}
    for name in files:
        if "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise ValueError(f"extra_files name {name!r}: expected a plain '<name>.safetensors'")
        if name in _RESERVED_FILES or name.startswith("model-"):
            raise ValueError(f"extra_files name {name!r} would overwrite the model's own files")
    own = wrapper_only_parameters(student)
    if own:
        heads = files.setdefault(DISTILL_HEADS_FILE, {})
        clash = sorted(k for k in heads if k.startswith(ENCODER_PREFIX))
        if clash:
            raise ValueError(
                f"extra_files[{DISTILL_HEADS_FILE!r}] keys {clash} use the prefix "
                f"{ENCODER_PREFIX!r} reserved for the encoder's own training-only tensors"
            )
        heads.update({ENCODER_PREFIX + name: tensor for name, tensor in own.items()})
    return files


def _write_export_config(student: SpeechEncoder, directory: Path) -> None:
    """Restore the teacher's SpecAugment values in the saved config (HF families)."""
    config_class = type(student.model.config)
    config = config_class.from_pretrained(directory)
    overrides = getattr(config, EXPORT_OVERRIDES_ATTR, None)
    if overrides is None:
        return
    delattr(config, EXPORT_OVERRIDES_ATTR)
    has_embed = getattr(student.model, "masked_spec_embed", None) is not None
    for key, value in overrides.items():
        if key == "mask_time_prob" and has_embed and not value > 0:
            # With 0 HF would not create masked_spec_embed and drop the trained one on load.
            logger.info(
                "keeping mask_time_prob=%s so masked_spec_embed loads", config.mask_time_prob
            )
            continue
        setattr(config, key, value)
    config.save_pretrained(directory)


def _load_wrapper_tensors(encoder: SpeechEncoder, tensors: dict[str, Tensor], where: Path) -> None:
    params = dict(encoder.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            raise ValueError(
                f"{where}: {ENCODER_PREFIX}{name} {tuple(tensor.shape)} does not match a "
                f"parameter of {type(encoder).__name__}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
