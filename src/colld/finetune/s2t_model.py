"""Speech-to-text through a frozen Whisper decoder: the encoder + linear adapter model, the
decoder sequences of each utterance, the teacher-forced loss and the adapter's initialisation.

The adapter maps the encoder's last hidden state (width D_e) to the decoder's width D; it is
the only trained part unless ``s2t.train_encoder``. Initialisations (``s2t.adapter_init``):
``lstsq`` solves a ridge regression from the encoder's last states to the decoder's own
encoder's last states on training clips (so the decoder starts from inputs shaped like the
ones it was trained on; for the decoder's own encoder it is the identity), ``identity`` needs
D_e = D, ``random`` is ``nn.Linear``'s default.

Shape legend: B batch, F front-end frames, C channels, S samples, T encoder frames, D_e
encoder width, D decoder width, N sequences (an utterance has one per task), U tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colld.data.batch import Batch
from colld.data.manifest import Utterance
from colld.encoders.base import SpeechEncoder
from colld.finetune.decoder import IGNORE, DecoderSpecError, WhisperTextDecoder
from colld.objectives.objective import LossOutput

log = logging.getLogger(__name__)

WHISPER_WINDOW_FRAMES = 3000
"""Log-mel frames of Whisper's 30 s input window (``s2t.pad_to_window``)."""
FRAME_RATE_TOLERANCE = 0.02
"""Relative frame-rate difference tolerated between the encoder and the decoder's encoder."""


class IncompatibleAdapterError(ValueError):
    """An adapter asked to join an encoder and a decoder that do not fit (width or rate)."""


@dataclass(frozen=True)
class DecoderSequence:
    """One decoder sequence of an utterance: its task, the prompt + target token ids and
    the reference text the hypothesis is scored against."""

    task: str
    tokens: list[int]
    prompt_length: int
    reference: str


@dataclass
class S2TSplit:
    """The usable rows of one split and their decoder sequences (id -> one per task);
    ``skipped``: reason -> utterance ids (counted and logged)."""

    name: str
    utterances: list[Utterance]
    sequences: dict[str, list[DecoderSequence]]
    languages: dict[str, str]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def count(self, task: str) -> int:
        return sum(s.task == task for seqs in self.sequences.values() for s in seqs)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "utterances": len(self.utterances),
            "sequences": {t: self.count(t) for t in ("transcribe", "translate")},
            "skipped": {reason: len(ids) for reason, ids in self.skipped.items()},
        }


def label_s2t_split(
    name: str,
    utterances: Sequence[Utterance],
    decoder: WhisperTextDecoder,
    tasks: Sequence[str],
    *,
    max_duration: float,
) -> S2TSplit:
    """Decoder sequences of every usable row: ``transcribe`` (the ``text`` in its language)
    and, for rows of another language than English with an English reference (``text_en``),
    ``translate``. Rows without text or language, with a language the decoder has no token
    for, longer than ``max_duration`` or with a sequence longer than the decoder's positions
    are left out, counted per reason and logged."""
    split = S2TSplit(name=name, utterances=[], sequences={}, languages={})

    def skip(reason: str, uid: str) -> None:
        split.skipped.setdefault(reason, []).append(uid)

    for utt in utterances:
        if not utt.text or not utt.text.strip():
            skip("no text", utt.id)
            continue
        if not utt.language:
            skip("no language", utt.id)
            continue
        if utt.duration is not None and utt.duration > max_duration:
            skip(f"longer than {max_duration:g} s", utt.id)
            continue
        pairs = []
        if "transcribe" in tasks:
            pairs.append(("transcribe", utt.text))
        if "translate" in tasks and utt.text_en and utt.language != "en":
            pairs.append(("translate", utt.text_en))
        try:
            seqs = []
            for task, text in pairs:
                prompt = decoder.prompt(utt.language, task)
                seqs.append(
                    DecoderSequence(
                        task, prompt + decoder.encode_text(text), len(prompt), text.strip()
                    )
                )
        except DecoderSpecError:
            skip(f"language {utt.language!r} unknown to the decoder", utt.id)
            continue
        if any(len(s.tokens) > decoder.max_tokens for s in seqs):
            skip(f"more than {decoder.max_tokens} tokens", utt.id)
            continue
        if not seqs:
            skip("no task applies", utt.id)
            continue
        split.utterances.append(utt)
        split.sequences[utt.id] = seqs
        split.languages[utt.id] = utt.language
    for reason, ids in split.skipped.items():
        log.warning("%s: %d rows left out (%s), e.g. %s", name, len(ids), reason, ids[:3])
    log.info(
        "%s: %d rows, %d transcribe and %d translate sequences",
        name, len(split.utterances), split.count("transcribe"), split.count("translate"),
    )  # fmt: skip
    return split


@dataclass
class AdaptedStates:
    """Adapter output in the decoder's width and the valid frames. Shape: (B, T, D), (B,)."""

    states: Tensor
    lengths: Tensor


class S2TModel(nn.Module):
    """``encoder`` (frozen unless ``train_encoder``) + ``adapter`` (frozen unless
    ``train_adapter``) Linear(D_e, D) on its last
    hidden state. ``pad_to_window``: Whisper encoders see each clip padded to the 30 s window
    with silence, and every frame (padding included) is passed on, as Whisper itself decodes.

    Shape: features (B, F, C) or (B, S), feature_lengths (B,) -> AdaptedStates.
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        decoder_width: int,
        *,
        train_encoder: bool = False,
        train_adapter: bool = True,
        pad_to_window: bool = False,
    ) -> None:
        super().__init__()
        if pad_to_window and encoder.family != "whisper":
            raise IncompatibleAdapterError(
                f"s2t.pad_to_window needs a Whisper encoder, found a {encoder.family} encoder"
            )
        self.encoder = encoder
        self.adapter = nn.Linear(encoder.hidden_dim, decoder_width)
        self.train_encoder = train_encoder
        self.pad_to_window = pad_to_window
        encoder.requires_grad_(train_encoder)
        self.adapter.requires_grad_(train_adapter)
        if train_encoder:
            for param in encoder.mask_parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> S2TModel:
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()
        return self

    def forward(self, features: Tensor, feature_lengths: Tensor) -> AdaptedStates:
        if self.pad_to_window:
            features, feature_lengths = pad_log_mel_to_window(features, feature_lengths)
        last = self.encoder.num_layers
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            out = self.encoder(features, feature_lengths, layers=[last])
        return AdaptedStates(states=self.adapter(out.hidden_states[last]), lengths=out.lengths)


def pad_log_mel_to_window(features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Pad each clip's Whisper log-mel to the 30 s window with the value silence takes there.

    Whisper's log-mel clamps at (clip max - 8) before scaling (x + 4) / 4, so zero samples
    become (normalised max - 2); ``colld.audio.FrontEnd`` gives the 30 s reference's values on
    the clip's own frames. Shape: (B, F, C), (B,) -> (B, 3000, C), (B,) all 3000."""
    batch, frames, channels = features.shape
    if frames > WHISPER_WINDOW_FRAMES:
        raise ValueError(f"{frames} log-mel frames exceed Whisper's 30 s window")
    valid = torch.arange(frames, device=features.device)[None, :] < lengths[:, None]  # (B, F)
    peak = features.masked_fill(~valid[..., None], float("-inf")).amax(dim=(1, 2))  # (B,)
    out = (peak - 2.0)[:, None, None].expand(batch, WHISPER_WINDOW_FRAMES, channels).clone()
    out[:, :frames] = torch.where(valid[..., None], features, out[:, :frames])
    return out, torch.full_like(lengths, WHISPER_WINDOW_FRAMES)


def check_compatible(encoder: SpeechEncoder, reference: SpeechEncoder, what: str) -> None:
    """IncompatibleAdapterError when ``encoder``'s frame rate is not the decoder's encoder's
    (``reference``): its cross-attention was trained on states at that rate."""
    if abs(encoder.frame_rate - reference.frame_rate) > FRAME_RATE_TOLERANCE * reference.frame_rate:
        raise IncompatibleAdapterError(
            f"{what}: the encoder gives {encoder.frame_rate:g} frames/s but the decoder was "
            f"trained on {reference.frame_rate:g} frames/s encoder states; a linear adapter "
            "cannot change the frame rate (use an encoder of the decoder's rate)"
        )


def set_identity(adapter: nn.Linear) -> None:
    """Identity init; IncompatibleAdapterError when the widths differ."""
    if adapter.in_features != adapter.out_features:
        raise IncompatibleAdapterError(
            f"s2t.adapter_init=identity needs the encoder's width ({adapter.in_features}) to "
            f"equal the decoder's ({adapter.out_features}); use lstsq or random"
        )
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(adapter.in_features))
        adapter.bias.zero_()


def fit_adapter(adapter: nn.Linear, inputs: Tensor, targets: Tensor, *, ridge: float) -> float:
    """Set ``adapter`` to the ridge-regression map inputs -> targets (in float64); returns
    the fit's R^2. ``ridge`` is relative to the mean diagonal of the inputs' Gram matrix.
    Shape: inputs (N, D_e), targets (N, D)."""
    x = inputs.double()
    y = targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean())
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    residual = yc - xc @ weight
    r2 = 1.0 - float(residual.pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12))
    with torch.no_grad():
        adapter.weight.copy_(weight.T.to(adapter.weight.dtype))
        adapter.bias.copy_((y_mean - x_mean @ weight).to(adapter.bias.dtype))
    return r2


def batch_sequences(
    batch_ids: Sequence[str],
    sequences: dict[str, list[DecoderSequence]],
    tasks: Sequence[str] | None,
) -> tuple[list[int], list[DecoderSequence]]:
    """Rows of the batch each sequence belongs to, and the sequences (of ``tasks``; None =
    all). KeyError naming the ids without sequences."""
    missing = [uid for uid in batch_ids if uid not in sequences]
    if missing:
        raise KeyError(f"no decoder sequence for utterance(s) {missing[:5]}")
    rows, seqs = [], []
    for row, uid in enumerate(batch_ids):
        for seq in sequences[uid]:
            if tasks is None or seq.task in tasks:
                rows.append(row)
                seqs.append(seq)
    return rows, seqs


def teacher_forced_loss(
    decoder: WhisperTextDecoder,
    adapted: AdaptedStates,
    rows: list[int],
    seqs: list[DecoderSequence],
) -> Tensor:
    """Mean cross-entropy over the target tokens (text and ``<|endoftext|>``, not the
    prompt) of every sequence, each reading its row's adapted states."""
    width = max(len(s.tokens) for s in seqs) - 1
    inputs = torch.full((len(seqs), width), decoder.special.end, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, seq in enumerate(seqs):
        tokens = torch.tensor(seq.tokens)
        inputs[i, : len(tokens) - 1] = tokens[:-1]
        labels[i, seq.prompt_length - 1 : len(tokens) - 1] = tokens[seq.prompt_length :]
    index = torch.tensor(rows, device=adapted.states.device)
    logits = decoder(
        adapted.states[index], adapted.lengths[index], inputs.to(adapted.states.device)
    )  # (N, U, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=IGNORE
    )


def s2t_batch_loss(
    module: nn.Module,
    decoder: WhisperTextDecoder,
    batch: Batch,
    sequences: dict[str, list[DecoderSequence]],
) -> LossOutput:
    """The loss of ``batch``: every sequence of every utterance, the encoder run once."""
    rows, seqs = batch_sequences(batch.ids, sequences, None)
    adapted = module(batch.features, batch.feature_lengths)
    loss = teacher_forced_loss(decoder, adapted, rows, seqs)
    return LossOutput(total=loss, parts={"ce": loss.detach()})
