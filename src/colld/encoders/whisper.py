"""Whisper encoder adapter: any clip length up to 30 s, key-padding masks, early stop.

Hugging Face's ``WhisperEncoder.forward`` refuses anything but 3000 mel frames (30 s), so
every short clip would be padded to 30 s (up to 10x the compute). This adapter runs the
module's own parts (conv1, conv2, the first T rows of the position table, the layers, the
final layer norm) on the clip's real length, with a key-padding mask for batches of clips of
different lengths. On exactly 3000 frames it reproduces ``WhisperEncoder`` hidden states
(tests/encoders/test_whisper.py).

Unpadded is not the same as 30 s-padded: Whisper was trained on 30 s windows, and in the
padded run the valid frames also attend to the padding. Measured on the embedded Whisper base
(6 espeak-ng clips of 2.0-6.6 s, en/de/es, default voice; valid frames only), mean cosine
between the unpadded and the 30 s-padded hidden states, per state 0..6:
1.000, 0.996, 0.988, 0.978, 0.958, 0.943, 0.913 (last state, after the final layer norm;
per clip 0.86-0.95, the 6.6 s clip highest; single frames go as low as -0.37). State 0
differs only on the last frame, where conv2 sees padding features instead of zeros.
colld distils and probes on the unpadded states (teacher and student see the same
computation; padding would cost up to 10x compute). Whisper's decoder, however, expects
30 s-padded encoder states: fed unpadded ones it can loop (seen here on German).

Shape legend: see ``colld.encoders.base``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor, nn
from transformers import WhisperFeatureExtractor
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.encoders.base import EncoderOutput, SpeechEncoder, check_layers

logger = logging.getLogger(__name__)


@cache
def _feature_extractor_constants() -> tuple[int, int, int]:
    """(sampling_rate, hop_length, chunk_length) of Hugging Face's Whisper front end."""
    extractor = WhisperFeatureExtractor()
    return extractor.sampling_rate, extractor.hop_length, extractor.chunk_length


def _conv_output_length(lengths: Tensor, conv: nn.Conv1d) -> Tensor:
    """Frames out of a 1-D convolution for ``lengths`` frames in (PyTorch's formula)."""
    (kernel,), (stride,), (padding,), (dilation,) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    return (lengths + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class WhisperSpeechEncoder(SpeechEncoder):
    """``SpeechEncoder`` over a Hugging Face ``WhisperEncoder`` (teacher or student).

    The learned mask embedding ``mask_embedding`` (Shape: (D,)) is initialised like
    Hugging Face wav2vec 2.0's ``masked_spec_embed``: ``uniform_()`` on [0, 1). It replaces
    masked frames after the convolutions and before the sinusoidal positions are added, so a
    masked frame keeps its position.
    """

    family = "whisper"

    def __init__(self, model: WhisperEncoder) -> None:
        super().__init__()
        if not isinstance(model, WhisperEncoder):
            raise TypeError(
                f"WhisperSpeechEncoder wraps a transformers WhisperEncoder, got "
                f"{type(model).__name__}; for a WhisperModel or WhisperForConditionalGeneration "
                f"pass model.get_encoder()"
            )
        self.model = model
        self.mask_embedding = nn.Parameter(
            torch.empty(model.config.d_model, dtype=model.conv1.weight.dtype).uniform_()
        )

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def hidden_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def num_mel_bins(self) -> int:
        return int(self.model.conv1.in_channels)

    @property
    def max_positions(self) -> int:
        return int(self.model.embed_positions.weight.shape[0])

    @property
    def frame_rate(self) -> float:
        """Encoder frames per second: sampling rate / hop / total conv stride (50.0 for Whisper)."""
        sampling_rate, hop_length, _ = _feature_extractor_constants()
        stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]
        return sampling_rate / (hop_length * stride)

    def output_lengths(self, feature_lengths: Tensor) -> Tensor:
        """Encoder frames for ``feature_lengths`` mel frames: (F - 1) // 2 + 1 for Whisper.

        Shape: (B,) -> (B,), int64.
        """
        lengths = _conv_output_length(feature_lengths.long(), self.model.conv1)
        return _conv_output_length(lengths, self.model.conv2)

    def mask_parameters(self) -> list[nn.Parameter]:
        return [self.mask_embedding]

    def forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        layers: Sequence[int] | None = None,
        mask: Tensor | None = None,
        return_ffn: bool = False,
    ) -> EncoderOutput:
        """Run the encoder on unpadded (any length up to 30 s) log-mel features.

        features: log-mel, time-major. Shape: (B, F, C), C = num_mel_bins. Frames beyond
            ``feature_lengths`` are ignored (zeroed here, as a lone clip's conv padding).
        feature_lengths: valid mel frames per clip. Shape: (B,).
        layers, mask, return_ffn: see ``SpeechEncoder.forward``; mask Shape: (B, T), bool.
        Returns hidden states Shape: (B, T, D) with T = output_lengths(F).
        """
        requested = check_layers(layers, self.num_layers)
        if not requested:
            raise ValueError("layers is empty: request at least one hidden state (0..L)")
        feature_lengths = self._check_inputs(features, feature_lengths)
        num_frames = int(self.output_lengths(torch.tensor([features.shape[1]]))[0])
        self._check_length(num_frames)
        lengths = self.output_lengths(feature_lengths)
        valid = torch.arange(num_frames, device=features.device)[None, :] < lengths[:, None]

        hidden = self._front_end(features, feature_lengths)  # (B, T, D)
        if mask is not None:
            hidden = self._apply_mask(hidden, mask)
        hidden = hidden + self.model.embed_positions.weight[:num_frames]
        hidden = nn.functional.dropout(hidden, p=self.model.dropout, training=self.model.training)

        hidden_states: dict[int, Tensor] = {0: hidden} if 0 in requested else {}
        ffn_layers = [j for j in requested if j >= 1] if return_ffn else []
        ffn_outputs: dict[int, Tensor] = {}
        attention_mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=valid
        )
        with self._ffn_hooks(ffn_layers, ffn_outputs):
            for index in range(max(requested)):
                layer_number = index + 1
                if self._drop_layer():
                    if layer_number in ffn_layers:  # a dropped layer adds nothing
                        ffn_outputs[layer_number] = torch.zeros_like(hidden)
                else:
                    hidden = self.model.layers[index](hidden, attention_mask)
                if layer_number == self.num_layers:
                    hidden = self.model.layer_norm(hidden)
                if layer_number in requested:
                    hidden_states[layer_number] = hidden
        return EncoderOutput(
            hidden_states=hidden_states,
            lengths=lengths,
            frame_rate=self.frame_rate,
            ffn_outputs={j: ffn_outputs[j] for j in ffn_layers},
        )

    def _check_inputs(self, features: Tensor, feature_lengths: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[2] != self.num_mel_bins:
            raise ValueError(
                f"Whisper features should be time-major log-mel of Shape (B, F, "
                f"{self.num_mel_bins}), found {tuple(features.shape)}"
            )
        if feature_lengths.shape != (features.shape[0],):
            raise ValueError(
                f"feature_lengths should have Shape ({features.shape[0]},), "
                f"found {tuple(feature_lengths.shape)}"
            )
        feature_lengths = feature_lengths.to(device=features.device, dtype=torch.long)
        if feature_lengths.numel() and (
            int(feature_lengths.min()) < 1 or int(feature_lengths.max()) > features.shape[1]
        ):
            raise ValueError(
                f"feature_lengths should lie in 1..{features.shape[1]} (the padded F), "
                f"found {feature_lengths.tolist()}"
            )
        return feature_lengths

    def _check_length(self, num_frames: int) -> None:
        if num_frames > self.max_positions:
            _, _, chunk_length = _feature_extractor_constants()
            raise ValueError(
                f"clip too long for Whisper: T={num_frames} encoder frames "
                f"({num_frames / self.frame_rate:.2f} s) but the position table holds "
                f"{self.max_positions} (the {chunk_length} s limit); split the audio into "
                f"segments of at most {self.max_positions / self.frame_rate:g} s"
            )

    def _front_end(self, features: Tensor, feature_lengths: Tensor) -> Tensor:
        """conv1 -> gelu -> conv2 -> gelu with padded frames zeroed before each conv.

        Zeroing conv1's output beyond the clip makes conv2 see the zeros a lone clip gets
        from its conv padding, so valid frames do not depend on the batch's padding.
        Shape: (B, F, C) -> (B, T, D).
        """
        num_feature_frames = features.shape[1]
        valid = (
            torch.arange(num_feature_frames, device=features.device)[None, :]
            < feature_lengths[:, None]
        )  # (B, F)
        x = features.to(self.model.conv1.weight.dtype).masked_fill(~valid[:, :, None], 0.0)
        x = nn.functional.gelu(self.model.conv1(x.transpose(1, 2)))  # (B, D, F)
        x = x.masked_fill(~valid[:, None, :], 0.0)
        x = nn.functional.gelu(self.model.conv2(x))  # (B, D, T)
        return x.transpose(1, 2)  # (B, T, D)

    def _apply_mask(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Replace masked frames by ``mask_embedding``. Shape: (B, T, D), mask (B, T)."""
        if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"mask should be bool of Shape {tuple(hidden.shape[:2])} (B, T), found "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        embedding = self.mask_embedding.to(hidden.dtype)
        return torch.where(mask[:, :, None], embedding, hidden)

    def _drop_layer(self) -> bool:
        """LayerDrop as in ``WhisperEncoder.forward`` (training only, config.encoder_layerdrop)."""
        if not self.model.training or self.model.layerdrop <= 0.0:
            return False
        return bool(torch.rand([]) < self.model.layerdrop)

    @contextmanager
    def _ffn_hooks(self, layer_numbers: list[int], store: dict[int, Tensor]) -> Iterator[None]:
        """Record fc2's output (the feed-forward branch before the residual add) per layer.

        Dropout after fc2 (training) is not included: the hook sees fc2's plain output.
        """
        handles = []

        def make_hook(layer_number: int):
            def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
                store[layer_number] = output

            return hook

        try:
            for j in layer_numbers:
                fc2 = self.model.layers[j - 1].fc2
                handles.append(fc2.register_forward_hook(make_hook(j)))
            yield
        finally:
            for handle in handles:
                handle.remove()
