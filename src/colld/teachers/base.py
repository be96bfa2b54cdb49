"""What loading a model spec gives: an encoder, its matching front end, and provenance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from colld.encoders.base import SpeechEncoder


@dataclass
class LoadedModel:
    """A loaded encoder (teacher or student) with what is needed to feed it.

    encoder: the wrapped encoder (see ``colld.encoders.base``).
    feature_extractor: the Hugging Face feature extractor the model was trained with
        (``WhisperFeatureExtractor``, ``SeamlessM4TFeatureExtractor``, ``Wav2Vec2FeatureExtractor``).
    source: the spec the user gave (``whisper-base``, a directory, a hub id).
    fingerprint: a stable hash of the weights (used by checkpoints and the target cache).
    """

    encoder: SpeechEncoder
    feature_extractor: Any
    source: str
    fingerprint: str
