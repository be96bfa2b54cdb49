"""The one contract every speech encoder in colld meets (teacher, student, baseline).

Shape legend used across colld:
    B batch, S samples (waveform), F feature frames (front-end input), C feature channels,
    T encoder frames, D width (D_t teacher, D_s student), L layers, K distractors.

Layer numbering: hidden state 0 is the front end's output as it enters the first transformer
layer (positions added); hidden state j (1..L) is the output of layer j. The last state (j = L)
is the model's ``last_hidden_state``, i.e. after the encoder's final layer norm where the
family has one (Whisper, pre-LN wav2vec 2.0 variants), as in Hugging Face's convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderOutput:
    """What an encoder returns.

    hidden_states: requested layer index -> Tensor, Shape: (B, T, D). Padded frames hold
        arbitrary values; use ``lengths``.
    ffn_outputs: requested layer index -> the layer's feed-forward output before the residual
        add, Shape: (B, T, D); empty unless asked for.
    lengths: valid frames per utterance, Shape: (B,), int64.
    frame_rate: frames per second of audio.
    """

    hidden_states: dict[int, Tensor]
    lengths: Tensor
    frame_rate: float
    ffn_outputs: dict[int, Tensor]

    def padding_mask(self) -> Tensor:
        """True on valid frames. Shape: (B, T)."""
        any_state = next(iter(self.hidden_states.values()))
        num_frames = any_state.shape[1]
        return torch.arange(num_frames, device=self.lengths.device)[None, :] < self.lengths[:, None]


class SpeechEncoder(nn.Module):
    """A speech encoder of one family, wrapping a Hugging Face module (``self.model``).

    Subclasses implement ``forward`` and ``output_lengths``; both teacher and student of a run
    are instances of the same subclass (same family), so they share one front end.
    """

    family: str  # "whisper", "wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-bert"
    model: nn.Module

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def hidden_dim(self) -> int:
        raise NotImplementedError

    @property
    def frame_rate(self) -> float:
        raise NotImplementedError

    def output_lengths(self, feature_lengths: Tensor) -> Tensor:
        """Encoder frames produced from ``feature_lengths`` front-end frames (or samples)."""
        raise NotImplementedError

    def forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        layers: Sequence[int] | None = None,
        mask: Tensor | None = None,
        return_ffn: bool = False,
    ) -> EncoderOutput:
        """Run the encoder.

        features: front-end output. Shape: (B, F, C) for spectral front ends (Whisper log-mel
            is given as (B, F, C) too, i.e. time-major), (B, S) for waveform families.
        feature_lengths: valid front-end frames (or samples). Shape: (B,).
        layers: hidden states to return (0..L); None = all. The encoder runs only as deep as
            the deepest requested layer.
        mask: frames to replace by the learned mask embedding after the front end and before
            positions are added. Shape: (B, T), bool. None = no masking.
        return_ffn: also return each requested layer's feed-forward output (layers >= 1).
        """
        raise NotImplementedError

    def mask_parameters(self) -> list[nn.Parameter]:
        """Parameters of the learned mask embedding (trained with the student)."""
        raise NotImplementedError


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Resolve and validate requested layer indices; errors name the bad value."""
    if layers is None:
        return list(range(num_layers + 1))
    resolved = sorted(set(int(i) for i in layers))
    for i in resolved:
        if not 0 <= i <= num_layers:
            raise ValueError(
                f"requested hidden state {i} but the encoder has layers 0..{num_layers} "
                f"(0 = front end, {num_layers} = last layer)"
            )
    return resolved
