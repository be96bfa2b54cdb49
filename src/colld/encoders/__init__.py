"""Encoder adapters: one per family, all behind ``SpeechEncoder`` (see ``base.py``)."""

from __future__ import annotations

from torch import nn

from colld.encoders.base import EncoderOutput, SpeechEncoder, check_layers

# HF ``config.model_type`` of the encoder module -> family name used across colld.
FAMILIES = {
    "whisper": "whisper",
    "wav2vec2": "wav2vec2",
    "hubert": "hubert",
    "wavlm": "wavlm",
    "data2vec-audio": "data2vec-audio",
    "wav2vec2-bert": "wav2vec2-bert",
}


def wrap_encoder(model: nn.Module) -> SpeechEncoder:
    """Wrap a Hugging Face encoder module (``WhisperEncoder``, ``Wav2Vec2Model``, ...)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported encoder model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    if model_type == "whisper":
        from colld.encoders.whisper import WhisperSpeechEncoder

        return WhisperSpeechEncoder(model)
    from colld.encoders.hf import HFSpeechEncoder

    return HFSpeechEncoder(model)


__all__ = ["EncoderOutput", "SpeechEncoder", "check_layers", "wrap_encoder", "FAMILIES"]
