"""Frozen teachers from Hugging Face models: a local directory, a hub id, or a model in memory.

Supported ``config.model_type`` values: those of ``colld.encoders.FAMILIES`` (whisper,
wav2vec2 incl. XLS-R/MMS, hubert, wavlm, data2vec-audio, wav2vec2-bert). A checkpoint with a
head (``Wav2Vec2ForCTC``, ``WhisperForConditionalGeneration``, ...) is accepted: only its base
encoder is kept (``get_encoder()`` for Whisper, the base model for the others).

Feature extractor: the directory's own (``preprocessor_config.json``) when it has one, else the
family default: ``WhisperFeatureExtractor(feature_size=num_mel_bins)``,
``SeamlessM4TFeatureExtractor()`` for w2v-BERT, ``Wav2Vec2FeatureExtractor(do_normalize=True,
return_attention_mask=True)`` for waveform families.

Fingerprint: sha256 over the weight files (name and sha256 of each, sorted by name) for
checkpoints on disk (a local directory or the hub's local snapshot); for models only in memory,
sha256 over the state dict (name, dtype, shape and bytes of each tensor, sorted by name).

Safety: a checkpoint whose config.json or preprocessor_config.json names custom code
(``auto_map``) is refused unless ``trust_remote_code`` (``teacher.trust_remote_code=true``).
Weights are read by transformers: safetensors when present, else ``pytorch_model.bin`` with
``torch.load(weights_only=True)``, which refuses pickled code (``TeacherLoadError``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import cached_file

from colld.encoders import FAMILIES, wrap_encoder
from colld.teachers.base import LoadedModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Weight files of a transformers checkpoint (single file or shards plus their index); other
# safetensors files (colld's distill_heads.safetensors, MMS language adapters) are not hashed.
_WEIGHT_GLOBS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


class TeacherLoadError(ValueError):
    """A teacher spec that cannot be loaded; the message names the spec and what was expected."""


def load_hf_teacher(
    spec: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> LoadedModel:
    """Load a frozen teacher from a local HF model directory or a hub id.

    spec: a directory holding ``config.json`` and weights, or a hub id (``facebook/w2v-bert-2.0``).
    trust_remote_code: allow a checkpoint whose config names custom code (``auto_map``).
    revision: hub branch, tag or commit (ignored for local directories).
    """
    path = Path(spec)
    if path.is_dir():
        config_dict = _read_local_config(path, spec)
        _check_config(config_dict, spec, trust_remote_code)
    elif path.exists():
        raise TeacherLoadError(f"teacher '{spec}' is a file; expected a model directory or hub id")
    else:
        config_dict = _read_hub_config(spec, revision, trust_remote_code)
    model = _load_encoder_module(spec, config_dict, trust_remote_code, revision)
    snapshot = path if path.is_dir() else Path(_hub_file(spec, CONFIG_FILE, revision)).parent
    fingerprint = weight_files_fingerprint(snapshot)
    feature_extractor = _load_feature_extractor(spec, snapshot, model, trust_remote_code, revision)
    return wrap_hf_teacher(
        model, feature_extractor=feature_extractor, source=spec, fingerprint=fingerprint
    )


def wrap_hf_teacher(
    model: nn.Module,
    *,
    feature_extractor: Any | None = None,
    source: str = "in-memory",
    fingerprint: str | None = None,
) -> LoadedModel:
    """A frozen teacher from a model in memory (full model or base encoder).

    feature_extractor: None gives the family default (see the module docstring).
    fingerprint: None hashes the encoder's state dict.
    """
    encoder_module = encoder_module_of(model)
    encoder = wrap_encoder(encoder_module)
    encoder.eval()
    encoder.requires_grad_(False)
    if feature_extractor is None:
        feature_extractor = default_feature_extractor(encoder_module)
    return LoadedModel(
        encoder=encoder,
        feature_extractor=feature_extractor,
        source=source,
        fingerprint=fingerprint
        if fingerprint is not None
        else state_dict_fingerprint(encoder_module),
    )


def encoder_module_of(model: nn.Module) -> nn.Module:
    """The base encoder of a (possibly headed) HF speech model, ready for ``wrap_encoder``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise TeacherLoadError(
            f"{type(model).__name__} has model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    if model_type == "whisper":
        return model if isinstance(model, WhisperEncoder) else model.get_encoder()
    return getattr(model, "base_model", model)


def default_feature_extractor(encoder_module: nn.Module) -> Any:
    """The family's standard front end for a model without ``preprocessor_config.json``."""
    config = encoder_module.config
    if config.model_type == "whisper":
        return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    if config.model_type == "wav2vec2-bert":
        return SeamlessM4TFeatureExtractor()
    return Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)


def weight_files_fingerprint(directory: Path) -> str:
    """sha256 over the weight files of a checkpoint directory (names and contents)."""
    files = sorted({f for pattern in _WEIGHT_GLOBS for f in directory.glob(pattern) if f.is_file()})
    if not files:
        raise TeacherLoadError(
            f"no weight files ({', '.join(_WEIGHT_GLOBS)}) in {directory}; expected a "
            "transformers checkpoint"
        )
    return files_fingerprint(files)


def files_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the names and contents of ``files``, in the order given."""
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{file.name}\0{file_digest}\n".encode())
    return digest.hexdigest()


def state_dict_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state dict: name, dtype, shape and bytes of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_local_config(path: Path, spec: str) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise TeacherLoadError(
            f"teacher '{spec}' is a directory without {CONFIG_FILE}; expected a Hugging Face "
            "model directory (config.json and weights), a CTranslate2 directory (model.bin) or "
            "an embedded teacher name"
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise TeacherLoadError(f"{config_path} is not valid JSON: {err}") from err


def _read_hub_config(spec: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    config_file = _hub_file(spec, CONFIG_FILE, revision)
    config_dict = json.loads(Path(config_file).read_text())
    _check_config(config_dict, spec, trust_remote_code)
    return config_dict


def _hub_file(spec: str, filename: str, revision: str | None) -> str:
    """The local path of ``filename`` of hub repo ``spec`` (downloaded if needed)."""
    try:
        return cached_file(spec, filename, revision=revision)
    except (OSError, ValueError) as err:
        raise TeacherLoadError(
            f"teacher '{spec}' is neither a local directory nor reachable on the Hugging Face "
            f"hub (could not get {filename}: {err})"
        ) from err


def _check_config(config_dict: dict[str, Any], spec: str, trust_remote_code: bool) -> None:
    model_type = config_dict.get("model_type")
    if model_type is None:
        raise TeacherLoadError(
            f"{CONFIG_FILE} of teacher '{spec}' has no model_type; expected a transformers "
            "model config"
        )
    if "auto_map" in config_dict and not trust_remote_code:
        raise TeacherLoadError(
            f"teacher '{spec}' needs custom code from its repository (config.json has auto_map "
            f"{sorted(config_dict['auto_map'])}); pass trust_remote_code=True "
            "(teacher.trust_remote_code=true) only if you trust its source"
        )
    if model_type not in FAMILIES:
        raise TeacherLoadError(
            f"teacher '{spec}' has model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )


def _load_encoder_module(
    spec: str, config_dict: dict[str, Any], trust_remote_code: bool, revision: str | None
) -> nn.Module:
    """The base encoder in float32, without heads (and without the Whisper decoder where the
    checkpoint is an encoder only, as colld's exported students are)."""
    hub = dict(trust_remote_code=trust_remote_code, revision=revision)
    try:
        if "WhisperEncoder" in (config_dict.get("architectures") or []):
            return WhisperEncoder.from_pretrained(spec, dtype=torch.float32, **hub)
        config = AutoConfig.from_pretrained(spec, **hub)
        model = AutoModel.from_pretrained(spec, config=config, dtype=torch.float32, **hub)
    except (pickle.UnpicklingError, OSError, RuntimeError) as err:
        if "weights_only" not in str(err) and not isinstance(err, pickle.UnpicklingError):
            raise
        raise TeacherLoadError(
            f"teacher '{spec}': its weights hold more than tensors, so they were not loaded "
            "(colld reads safetensors, or pytorch_model.bin with torch.load(weights_only=True), "
            "which refuses pickled code). Use a checkpoint with model.safetensors from a source "
            f"you trust ({type(err).__name__}: {str(err).strip().splitlines()[0]})"
        ) from err
    return encoder_module_of(model)


def _load_feature_extractor(
    spec: str, snapshot: Path, model: nn.Module, trust_remote_code: bool, revision: str | None
) -> Any:
    if (snapshot / PREPROCESSOR_FILE).is_file():
        preprocessor = json.loads((snapshot / PREPROCESSOR_FILE).read_text())
        if "auto_map" in preprocessor and not trust_remote_code:
            raise TeacherLoadError(
                f"teacher '{spec}' needs custom code for its feature extractor "
                f"({PREPROCESSOR_FILE} has auto_map {sorted(preprocessor['auto_map'])}); set "
                "teacher.trust_remote_code=true only if you trust its source"
            )
        return AutoFeatureExtractor.from_pretrained(
            spec, trust_remote_code=trust_remote_code, revision=revision
        )
    if not Path(spec).is_dir():  # a hub repo: its preprocessor config may not be cached yet
        try:
            return AutoFeatureExtractor.from_pretrained(
                spec, trust_remote_code=trust_remote_code, revision=revision
            )
        except OSError:
            pass
    logger.info("teacher '%s' has no %s; using the family default", spec, PREPROCESSOR_FILE)
    return default_feature_extractor(model)
