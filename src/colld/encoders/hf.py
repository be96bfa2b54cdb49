"""Adapter for the Hugging Face wav2vec 2.0 family behind colld's ``SpeechEncoder`` contract.

Covers ``Wav2Vec2Model`` (incl. XLS-R / MMS, i.e. the stable-layer-norm variant),
``HubertModel``, ``WavLMModel``, ``Data2VecAudioModel`` and ``Wav2Vec2BertModel`` (w2v-BERT 2.0).

Hidden states (see ``colld.encoders.base``): state 0 is the input of the first transformer
layer (after the positional convolution, and for post-LN models after the encoder layer norm),
state j the output of layer j, state L the output of the encoder module (``model.encoder``),
i.e. after the final layer norm of the stable-layer-norm variants. Note that HF's own
``output_hidden_states`` (transformers 5.x, ``capture_outputs(tie_last_hidden_states=False)``)
records the raw output of the last layer as its last state, i.e. *before* that final layer norm;
colld uses ``last_hidden_state`` instead, as the contract says. Anything the model runs after the
encoder (w2v-BERT's ``intermediate_ffn`` and the length-reducing ``adapter`` of the
``add_adapter`` variants) is not part of any hidden state and is never run here.

The states are recorded with forward hooks on the encoder layers (not HF's
``output_hidden_states``), so that the encoder runs only as deep as the deepest requested
layer: the hook of that layer raises a private exception that ends the forward pass
(fairseq2's layer-hook early stop). When L is requested the model runs to the end of its
encoder.

Padding: a padded utterance gives the same valid frames as the utterance alone, in every family
whose feature encoder does not normalise over time (group-normed wav2vec 2.0 base does; run it
one clip at a time). For data2vec-audio that needs one fix: HF (like fairseq) zeroes the
padded frames only before the first of its stacked positional convolutions, so the later ones
read the previous layer's activations of the padding and the last frames of a shorter clip
change with the batch (by up to 2.0 on a tiny model). This adapter zeroes the padding before
every positional conv layer, which is what a clip alone sees (the convs' own zero padding).

Masking is fully under colld's control. The model replaces the frames given as
``mask_time_indices`` by its own ``masked_spec_embed`` after the feature projection and before
the positional convolution (relative positions for w2v-BERT). HF only creates that parameter
when ``config.mask_time_prob > 0`` (or ``mask_feature_prob > 0``), and in train mode it draws a
random mask by itself whenever ``mask_time_indices`` is None and ``mask_time_prob > 0``. So this
adapter ALWAYS passes a tensor (all False when ``mask`` is None) to a model that has
``masked_spec_embed``, and refuses to train a model whose config would make HF drop layers
(``layerdrop``) or zero feature channels (``mask_feature_prob``) on its own.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from colld.encoders.base import EncoderOutput, SpeechEncoder, check_layers

logger = logging.getLogger(__name__)

# Audio sampling rate every model of these families is trained at.
SAMPLE_RATE = 16_000
# w2v-BERT's front end (SeamlessM4TFeatureExtractor): 80-bin fbank every 160 samples (10 ms),
# 2 consecutive frames stacked into one 160-dim input frame.
FBANK_HOP_SAMPLES = 160
FBANK_STACK = 2

# HF model_type -> colld family name, and the feed-forward sub-module whose output (before the
# residual add) ``return_ffn`` gives: the plain FFN, or the Conformer's second (macaron) FFN.
HF_FAMILIES = {
    "wav2vec2": "wav2vec2",
    "hubert": "hubert",
    "wavlm": "wavlm",
    "data2vec-audio": "data2vec-audio",
    "wav2vec2-bert": "wav2vec2-bert",
}
_FFN_MODULE = {"wav2vec2-bert": "ffn2"}
_DEFAULT_FFN_MODULE = "feed_forward"


class _StopEncoder(Exception):
    """Raised by a hook once the deepest requested layer has run (early stop)."""


def _first_tensor(output: Any) -> Tensor:
    """A module's hidden-state output: the tensor itself, the first element of a tuple (WavLM's
    layers return ``(hidden, position_bias)``) or ``last_hidden_state`` of a model output."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


class HFSpeechEncoder(SpeechEncoder):
    """A wav2vec 2.0-family HF base model behind the ``SpeechEncoder`` contract.

    model: ``Wav2Vec2Model``, ``HubertModel``, ``WavLMModel``, ``Data2VecAudioModel`` or
        ``Wav2Vec2BertModel``; a model with a head (``Wav2Vec2ForCTC``, ...) is unwrapped to its
        base model. Inputs: waveforms (B, S) at 16 kHz, or for w2v-BERT stacked fbank frames
        (B, F, 160) from ``SeamlessM4TFeatureExtractor``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in HF_FAMILIES:
            raise ValueError(
                f"HFSpeechEncoder got model_type {model_type!r} ({type(model).__name__}); "
                f"supported: {sorted(HF_FAMILIES)}"
            )
        base = getattr(model, "base_model", model)
        if base is not model:
            logger.info("using the base model %s of %s", type(base).__name__, type(model).__name__)
        self.model = base
        self.family = HF_FAMILIES[model_type]
        encoder = getattr(base, "encoder", None)
        if encoder is None or not isinstance(getattr(encoder, "layers", None), nn.ModuleList):
            raise ValueError(
                f"{type(base).__name__} has no encoder.layers; expected a base model such as "
                "Wav2Vec2Model"
            )
        self._ffn_name = _FFN_MODULE.get(model_type, _DEFAULT_FFN_MODULE)
        self.train(base.training)  # the wrapper starts in the mode of the model it wraps

    # --- sizes -----------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def is_spectral(self) -> bool:
        """True for w2v-BERT (stacked fbank input), False for waveform families."""
        return self.family == "wav2vec2-bert"

    @property
    def frame_rate(self) -> float:
        if self.is_spectral:
            return SAMPLE_RATE / FBANK_HOP_SAMPLES / FBANK_STACK
        return SAMPLE_RATE / math.prod(self.config.conv_stride)

    def output_lengths(self, feature_lengths: Tensor) -> Tensor:
        """Encoder frames (before any adapter) from front-end samples / frames. Shape: (B,)."""
        compute = self.model._get_feat_extract_output_lengths
        if "add_adapter" in inspect.signature(compute).parameters:
            lengths = compute(feature_lengths, add_adapter=False)
        else:  # HuBERT has no adapter
            lengths = compute(feature_lengths)
        return torch.as_tensor(lengths).to(torch.long)

    def mask_parameters(self) -> list[nn.Parameter]:
        embed = getattr(self.model, "masked_spec_embed", None)
        return [] if embed is None else [embed]

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        layers: Sequence[int] | None = None,
        mask: Tensor | None = None,
        return_ffn: bool = False,
    ) -> EncoderOutput:
        """Run the encoder up to the deepest requested layer (see ``SpeechEncoder.forward``).

        features: Shape: (B, S) waveforms, or (B, F, 160) for w2v-BERT.
        feature_lengths: valid samples (frames for w2v-BERT). Shape: (B,).
        mask: Shape: (B, T), bool; True frames get ``masked_spec_embed``.

        ``return_ffn`` is recorded by hooks on the FFN modules; under gradient checkpointing
        those outputs carry no gradient (use it for frozen teachers).
        """
        wanted = check_layers(layers, self.num_layers)
        self._check_training_config()
        self._check_features(features, feature_lengths)
        feature_lengths = feature_lengths.to(device=features.device, dtype=torch.long)
        num_inputs = features.shape[1]
        lengths = self.output_lengths(feature_lengths)
        if int(lengths.min()) < 1:
            raise ValueError(
                f"feature_lengths {feature_lengths.tolist()} give encoder lengths "
                f"{lengths.tolist()}; every utterance needs at least one encoder frame"
            )
        if int(feature_lengths.max()) > num_inputs:
            raise ValueError(
                f"feature_lengths max {int(feature_lengths.max())} exceeds the padded input "
                f"length {num_inputs}"
            )
        num_frames = int(self.output_lengths(torch.tensor([num_inputs]))[0])
        attention_mask = (
            torch.arange(num_inputs, device=features.device)[None, :] < feature_lengths[:, None]
        ).long()
        mask_time_indices = self._mask_time_indices(mask, features.shape[0], num_frames, features)

        states: dict[int, Tensor] = {}
        ffn: dict[int, Tensor] = {}
        with self._recording(wanted, return_ffn, states, ffn), self._padding_zeroed(lengths):
            try:
                self.model(
                    features, attention_mask=attention_mask, mask_time_indices=mask_time_indices
                )
            except _StopEncoder:
                pass
        missing = [j for j in wanted if j not in states]
        if missing:  # only possible if a layer was skipped, which _check_training_config forbids
            raise RuntimeError(f"hidden states {missing} were not recorded")
        return EncoderOutput(
            hidden_states={j: states[j] for j in wanted},
            lengths=lengths,
            frame_rate=self.frame_rate,
            ffn_outputs={j: ffn[j] for j in wanted if j in ffn},
        )

    def _check_features(self, features: Tensor, feature_lengths: Tensor) -> None:
        if self.is_spectral:
            input_dim = int(self.config.feature_projection_input_dim)
            if features.dim() != 3 or features.shape[2] != input_dim:
                raise ValueError(
                    f"w2v-BERT features should be stacked fbank frames of Shape (B, F, "
                    f"{input_dim}) (SeamlessM4TFeatureExtractor), found {tuple(features.shape)}"
                )
        elif features.dim() != 2:
            raise ValueError(
                f"{self.family} features should be 16 kHz waveforms of Shape (B, S), found "
                f"{tuple(features.shape)}"
            )
        if tuple(feature_lengths.shape) != (features.shape[0],):
            raise ValueError(
                f"feature_lengths should have Shape ({features.shape[0]},), found "
                f"{tuple(feature_lengths.shape)}"
            )

    def _check_training_config(self) -> None:
        """In train mode HF would skip layers / zero channels at random; refuse that."""
        if not self.model.training:
            return
        config = self.config
        if float(getattr(config, "layerdrop", 0.0)) > 0.0:
            raise ValueError(
                f"{type(self.model).__name__} is in train mode with config.layerdrop="
                f"{config.layerdrop}; layer-to-layer distillation needs every layer: set it to 0 "
                "(colld.students.build_student does)"
            )
        if float(getattr(config, "mask_feature_prob", 0.0)) > 0.0:
            raise ValueError(
                f"{type(self.model).__name__} is in train mode with config.mask_feature_prob="
                f"{config.mask_feature_prob}; HF would zero random channels: set it to 0"
            )

    def _mask_time_indices(
        self, mask: Tensor | None, batch_size: int, num_frames: int, features: Tensor
    ) -> Tensor | None:
        """The ``mask_time_indices`` to pass: always a bool tensor when the model has a mask
        embedding (so HF never draws its own), None when it has none. Shape: (B, T)."""
        has_embed = getattr(self.model, "masked_spec_embed", None) is not None
        if mask is not None:
            if tuple(mask.shape) != (batch_size, num_frames):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}; expected (B, T) = "
                    f"({batch_size}, {num_frames}) encoder frames"
                )
            if bool(mask.any()):
                if not has_embed:
                    raise ValueError(
                        f"{type(self.model).__name__} has no masked_spec_embed (its config has "
                        "mask_time_prob = mask_feature_prob = 0); build students with "
                        "colld.students.build_student, which creates one"
                    )
                if not getattr(self.config, "apply_spec_augment", True):
                    raise ValueError(
                        "config.apply_spec_augment is False, so HF would ignore the mask; set it "
                        "to True"
                    )
            if has_embed:
                return mask.to(device=features.device, dtype=torch.bool)
        if not has_embed:
            return None  # mask_time_prob == 0: HF draws no mask of its own either
        return torch.zeros(batch_size, num_frames, dtype=torch.bool, device=features.device)

    @contextmanager
    def _padding_zeroed(self, lengths: Tensor) -> Iterator[None]:
        """Zero the padded frames before every stacked positional conv layer after the first
        (data2vec-audio; HF zeroes them before the first only). lengths: Shape: (B,)."""
        pos_conv = getattr(self.model.encoder, "pos_conv_embed", None)
        conv_layers = getattr(pos_conv, "layers", None)
        if not isinstance(conv_layers, nn.ModuleList) or len(conv_layers) < 2:
            yield
            return

        def zero_padding(_module: nn.Module, args: tuple) -> tuple:
            (states,) = args  # Shape: (B, D, T)
            valid = torch.arange(states.shape[-1], device=states.device) < lengths[:, None]
            return (states * valid[:, None, :].to(states.dtype),)

        handles = [layer.register_forward_pre_hook(zero_padding) for layer in conv_layers[1:]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _recording(
        self, wanted: list[int], return_ffn: bool, states: dict[int, Tensor], ffn: dict[int, Tensor]
    ) -> Iterator[None]:
        """Hooks that fill ``states`` / ``ffn`` and stop after the deepest requested layer."""
        deepest = max(wanted)
        num_layers = self.num_layers
        stop_after_encoder = (
            getattr(self.model, "adapter", None) is not None
            or getattr(self.model, "intermediate_ffn", None) is not None
        )
        handles: list[RemovableHandle] = []

        def on_first_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[0] = args[0] if args else kwargs["hidden_states"]
            if deepest == 0:
                raise _StopEncoder

        def on_layer(j: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                states[j] = _first_tensor(output)
                if j == deepest:
                    raise _StopEncoder

            return hook

        def on_encoder(_module: nn.Module, _args: tuple, output: Any) -> None:
            states[num_layers] = _first_tensor(output)
            if stop_after_encoder:
                raise _StopEncoder

        def on_ffn(j: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                ffn[j] = _first_tensor(output)

            return hook

        try:
            if 0 in wanted:
                handles.append(
                    self.layers[0].register_forward_pre_hook(on_first_input, with_kwargs=True)
                )
            for j in wanted:
                if 1 <= j < num_layers:
                    handles.append(self.layers[j - 1].register_forward_hook(on_layer(j)))
                if j >= 1 and return_ffn:
                    module = getattr(self.layers[j - 1], self._ffn_name)
                    handles.append(module.register_forward_hook(on_ffn(j)))
            if num_layers in wanted:
                handles.append(self.model.encoder.register_forward_hook(on_encoder))
            yield
        finally:
            for handle in handles:
                handle.remove()
