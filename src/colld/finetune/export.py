"""Save a fine-tuned CTC model as a Hugging Face model directory, and load it back.

The directory (written to a temporary sibling and renamed into place: complete or absent):

    wav2vec 2.0 families (wav2vec2, hubert, wavlm, data2vec-audio, wav2vec2-bert):
        config.json, model.safetensors   the family's transformers ForCTC class
                                         (``Wav2Vec2ForCTC``, ``HubertForCTC``, ``WavLMForCTC``,
                                         ``Data2VecAudioForCTC``, ``Wav2Vec2BertForCTC``) with
                                         vocab_size = V, pad_token_id = 0 (the blank),
                                         ctc_loss_reduction "mean", ctc_zero_infinity true;
                                         its lm_head is the fine-tuned head.
    Whisper (transformers has no Whisper CTC class):
        config.json, model.safetensors   the fine-tuned ``WhisperEncoder`` alone (as students
                                         are exported: architectures ["WhisperEncoder"]).
        ctc_head.safetensors             the head: ``weight`` (V, D), ``bias`` (V,).
    every family:
        preprocessor_config.json         the feature extractor.
        vocab.json                       {token: id}; id 0 the blank ``<blank>``, id 1 ``<unk>``;
                                         for chars the space is written ``|``.
        tokenizer files                  chars only: a ``Wav2Vec2CTCTokenizer`` over vocab.json
                                         (pad = ``<blank>``, word delimiter ``|``) whose
                                         ``decode`` does greedy CTC's collapsing; phonemes (IPA
                                         tokens of several characters) have none.
        ctc.json                         units, tokens in id order, family, architecture, head
                                         input ("last hidden state"), and provenance.
        ctc_scores.json                  the test report, when the run had a test split.

Loading without colld (wav2vec 2.0 families)::

    from transformers import AutoFeatureExtractor, AutoModelForCTC
    model = AutoModelForCTC.from_pretrained(path)    # e.g. Wav2Vec2ForCTC

With colld (every family, Whisper included): ``load_ctc_model(path)``, then
``loaded.transcribe([waveform, ...])`` (16 kHz mono float arrays) or ``loaded.model`` for
logits. colld's Whisper adapter runs any length up to 30 s unpadded (``colld.encoders.whisper``).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoFeatureExtractor, AutoModelForCTC, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.audio import FrontEnd
from colld.data.batch import pad_features
from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.eval.tasks import Vocabulary
from colld.finetune.labels import WORD_DELIMITER, vocabulary_json
from colld.finetune.model import CTCModel, greedy_decode
from colld.fsutil import atomic_dir, write_json_atomic
from colld.students.build import EXPORT_OVERRIDES_ATTR

logger = logging.getLogger(__name__)

CTC_INFO_FILE = "ctc.json"
VOCAB_FILE = "vocab.json"
HEAD_FILE = "ctc_head.safetensors"
SCORES_FILE = "ctc_scores.json"
WHISPER_ARCHITECTURE = "WhisperEncoder"
FORMAT_VERSION = 1

# colld family -> the transformers ForCTC class name.
FOR_CTC_CLASSES = {
    "wav2vec2": "Wav2Vec2ForCTC",
    "hubert": "HubertForCTC",
    "wavlm": "WavLMForCTC",
    "data2vec-audio": "Data2VecAudioForCTC",
    "wav2vec2-bert": "Wav2Vec2BertForCTC",
}


def check_exportable(encoder: SpeechEncoder) -> None:
    """ValueError when the family's ForCTC class would not give the CTC model's logits: a model
    whose base model runs an adapter or intermediate FFN after the encoder (the head reads the
    encoder's last hidden state; HF's lm_head would read what the adapter makes of it)."""
    if encoder.family == "whisper":
        return
    model = encoder.model
    extra = [
        name for name in ("adapter", "intermediate_ffn") if getattr(model, name, None) is not None
    ]
    if extra:
        raise ValueError(
            f"{type(model).__name__} runs {' and '.join(extra)} after its encoder; colld's CTC "
            "head reads the encoder's last hidden state, which its ForCTC class would not do. "
            "Fine-tune a model without them (config add_adapter=false, "
            "use_intermediate_ffn_before_adapter=false)"
        )


def to_hf_for_ctc(model: CTCModel) -> PreTrainedModel:
    """The family's transformers ForCTC model holding ``model``'s encoder and head (eval mode).

    Raises ValueError for Whisper (no such class) and for models ``check_exportable`` refuses.
    """
    encoder = model.encoder
    if encoder.family not in FOR_CTC_CLASSES:
        raise ValueError(
            f"transformers has no CTC class for family {encoder.family!r}; expected one of "
            f"{sorted(FOR_CTC_CLASSES)}"
        )
    check_exportable(encoder)
    import transformers

    cls = getattr(transformers, FOR_CTC_CLASSES[encoder.family])
    config = copy.deepcopy(encoder.model.config)
    if hasattr(config, EXPORT_OVERRIDES_ATTR):
        delattr(config, EXPORT_OVERRIDES_ATTR)
    config.vocab_size = model.vocab_size
    config.pad_token_id = 0
    config.ctc_loss_reduction = "mean"
    config.ctc_zero_infinity = True
    config.final_dropout = float(model.dropout.p)
    config.architectures = [cls.__name__]
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten right away
        hf_model = cls(config)
    hf_model.base_model.load_state_dict(encoder.model.state_dict())
    hf_model.lm_head.load_state_dict(model.head.state_dict())
    return hf_model.eval()


def export_ctc_model(
    model: CTCModel,
    feature_extractor: Any,
    vocabulary: Vocabulary,
    units: str,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any],
    scores: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as described in the module docstring; an existing ``out_dir`` is
    replaced. ``metadata`` goes into ctc.json, ``scores`` into ctc_scores.json."""
    out_dir = Path(out_dir)
    model = copy.deepcopy(model).float().eval()
    family = model.encoder.family
    architecture = FOR_CTC_CLASSES.get(family, WHISPER_ARCHITECTURE)
    with atomic_dir(out_dir) as tmp:
        if family == "whisper":
            model.encoder.model.save_pretrained(tmp)
            head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
            save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        else:
            to_hf_for_ctc(model).save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)
        write_json_atomic(tmp / VOCAB_FILE, vocabulary_json(vocabulary, units))
        if units == "chars":
            _save_tokenizer(tmp)
        info = {
            "format": FORMAT_VERSION,
            "family": family,
            "architecture": architecture,
            "units": units,
            "tokens": list(vocabulary.tokens),
            "blank_id": 0,
            "unk_id": 1,
            "head_input": "last hidden state",
            "final_dropout": float(model.dropout.p),
            **metadata,
        }
        write_json_atomic(tmp / CTC_INFO_FILE, info)
        if scores is not None:
            write_json_atomic(tmp / SCORES_FILE, scores)
    logger.info("exported the %s CTC model (%s) to %s", family, architecture, out_dir)
    return out_dir


def _save_tokenizer(directory: Path) -> None:
    """A Wav2Vec2CTCTokenizer over ``directory/vocab.json`` (chars), saved beside it."""
    from transformers import Wav2Vec2CTCTokenizer

    tokenizer = Wav2Vec2CTCTokenizer(
        str(directory / VOCAB_FILE),
        bos_token=None,
        eos_token=None,
        unk_token="<unk>",
        pad_token="<blank>",
        word_delimiter_token=WORD_DELIMITER,
    )
    tokenizer.save_pretrained(directory)


@dataclass
class LoadedCTCModel:
    """A fine-tuned CTC model as ``load_ctc_model`` returns it (eval mode, float32)."""

    model: CTCModel
    feature_extractor: Any
    vocabulary: Vocabulary
    units: str
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        """Greedy CTC transcripts of 16 kHz mono clips: characters joined as they are,
        phonemes joined by spaces. Shape: each waveform (S,)."""
        frontend = FrontEnd(self.feature_extractor)
        features, lengths = pad_features(
            [frontend(np.asarray(w, dtype=np.float32)) for w in waveforms],
            frontend.feature_dim,
        )
        out = self.model(features, lengths)
        joiner = "" if self.units == "chars" else " "
        return [
            joiner.join(self.vocabulary.decode(ids))
            for ids in greedy_decode(out.logits, out.lengths)
        ]


def load_ctc_model(path: str | Path) -> LoadedCTCModel:
    """Load a directory written by ``export_ctc_model`` (``colld finetune``).

    wav2vec 2.0 families: ``AutoModelForCTC.from_pretrained``; its base model becomes the
    encoder and its lm_head the head. Whisper: ``WhisperEncoder.from_pretrained`` and
    ``ctc_head.safetensors``. Raises FileNotFoundError / ValueError naming the file at fault.
    """
    path = Path(path)
    info_file = path / CTC_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"{info_file} not found; expected a directory written by `colld finetune`"
        )
    info = json.loads(info_file.read_text(encoding="utf-8"))
    for key in ("architecture", "units", "tokens", "final_dropout"):
        if key not in info:
            raise ValueError(f"{info_file} lacks the key {key!r}")
    vocabulary = Vocabulary(list(info["tokens"]))
    with torch.random.fork_rng(devices=[]):  # wrapper / head inits are overwritten below
        if info["architecture"] == WHISPER_ARCHITECTURE:
            encoder = wrap_encoder(WhisperEncoder.from_pretrained(path, dtype=torch.float32))
            head_file = path / HEAD_FILE
            if not head_file.is_file():
                raise FileNotFoundError(f"{head_file} not found (the Whisper CTC head)")
            head = load_file(str(head_file))
        else:
            hf_model = AutoModelForCTC.from_pretrained(path, dtype=torch.float32)
            encoder = wrap_encoder(hf_model.base_model)
            head = {k: v.detach() for k, v in hf_model.lm_head.state_dict().items()}
        model = CTCModel(encoder, len(vocabulary), final_dropout=float(info["final_dropout"]))
    shapes = {k: tuple(v.shape) for k, v in head.items()}
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    if shapes != expected:
        raise ValueError(
            f"{path}: the CTC head has shapes {shapes}, expected {expected} for "
            f"{len(vocabulary)} tokens and width {encoder.hidden_dim}"
        )
    model.head.load_state_dict(head)
    model.eval()
    return LoadedCTCModel(
        model=model,
        feature_extractor=AutoFeatureExtractor.from_pretrained(path),
        vocabulary=vocabulary,
        units=info["units"],
        info=info,
    )
