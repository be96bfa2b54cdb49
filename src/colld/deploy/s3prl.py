"""colld encoders as s3prl upstreams, for the SUPERB / ML-SUPERB downstream tasks.

``UpstreamExpert(ckpt)`` wraps whatever ``colld.eval.models.load_model_spec`` loads (an
exported student directory, ``whisper-base``, a CTranslate2 / HF directory, a hub id such as
``facebook/w2v-bert-2.0``) in s3prl's upstream contract, without importing s3prl (checked
against s3prl's ``upstream/interfaces.py`` ``Featurizer``, ``upstream/hf_wav2vec2`` and
``upstream/example``):

- ``UpstreamExpert(ckpt, model_config=None, **kwargs)``: s3prl's runner passes
  ``ckpt`` (``-k``), ``model_config`` (``-g``, ignored: the model directory holds its config),
  ``refresh`` and the downstream config's ``upstream_expert`` keys (all ignored).
- ``forward(wavs)``: a list of B unpadded 16 kHz mono waveforms, each Shape: (S_b,), any
  device -> ``{"hidden_states": (h0, ..., hL), "last_hidden_state": hL}``, each Shape:
  (B, T, D) float on the model's device. h0 is the input of the first layer, hL the output
  of the last (after the final layer norm where the family has one): ``colld.encoders.base``.
- ``get_downsample_rates(key)``: samples per frame, 16000 / frame rate (320 for every
  family colld supports), the same for every key.

Time axis: T is the encoder's frame count for the longest waveform, and an utterance's frames
beyond its own count are 0. That count differs from round(S / 320) by at most 1 for Whisper
(ceil(floor(S / 160) / 2)) and the wav2vec 2.0 family (floor((S - 400) / 320) + 1 with the
standard conv stack) and at most 2 for w2v-BERT 2.0 (floor((floor((S - 400) / 160) + 1) / 2));
s3prl accepts a difference below 5 (``upstream/interfaces.py`` ``Featurizer``, used by
``run_downstream.py``) or below 3 (``s3prl.nn.S3PRLUpstream``, used by ESPnet's s3prl frontend)
and takes round(S_b / 320) frames for utterance b, so up to 2 of them may be zero padding.

Batching: waveforms go through the model's own front end one by one (``colld.audio.FrontEnd``)
and are padded with ``colld.data.batch.pad_features``, as in ``colld evaluate``; each
utterance's frames then equal the utterance run alone. Models where padding changes valid
frames (group-norm wav2vec2-base) run one waveform at a time
(``colld.eval.features.batch_invariant``).

Gradients: all parameters require grad (the loader freezes teachers; this undoes it), except
Whisper's fixed sinusoidal position table, as in s3prl's own upstreams: s3prl freezes an
upstream by calling it under ``torch.no_grad`` (the default) and fine-tunes it with ``-f``.
Fine-tuning a wav2vec 2.0-family model whose config has ``layerdrop`` or ``mask_feature_prob``
above 0 is refused by its encoder (``colld.encoders.hf``).

Input: resampling to 16 kHz is the caller's job (a bare waveform does not say its rate).
Whisper models take at most 30 s per waveform. Errors name the waveform's index.

``colld export MODEL --s3prl DIR`` (``write_s3prl_upstream``) writes ``expert.py`` and
``hubconf.py`` into ``DIR`` = ``<s3prl checkout>/s3prl/upstream/<entry>``; the entry function is
named after the folder. See docs/evaluation.md, "SUPERB with s3prl".

Shape legend: see ``colld.encoders.base``.
"""

from __future__ import annotations

import keyword
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from colld.audio import SAMPLE_RATE, AudioError, FrontEnd
from colld.data.batch import pad_features
from colld.encoders.base import SpeechEncoder
from colld.eval.features import batch_invariant
from colld.eval.models import load_model_spec

logger = logging.getLogger(__name__)

EXPERT_FILE = "expert.py"
HUBCONF_FILE = "hubconf.py"
WRITTEN_BY = "written by `colld export --s3prl`"


class UpstreamExpert(nn.Module):
    """A colld model spec as an s3prl upstream (see the module docstring for the contract).

    ckpt: an exported student directory or a teacher spec (what ``colld evaluate`` takes,
        except ``fbank``: s3prl has its own fbank upstream).
    model_config, kwargs: what s3prl's runner passes besides ``ckpt``; ignored.
    Raises the loader's error for a spec that is not a model.
    """

    def __init__(self, ckpt: str | None = None, model_config: str | None = None, **kwargs: Any):
        super().__init__()
        if not ckpt:
            raise ValueError(
                "UpstreamExpert needs ckpt: an exported student directory or a teacher spec "
                "(s3prl: -k SPEC, or the default written into hubconf.py)"
            )
        if model_config:
            logger.warning(
                "ignoring model_config=%r: %s carries its own config", model_config, ckpt
            )
        if kwargs:
            logger.debug("ignoring upstream arguments %s", sorted(kwargs))
        loaded = load_model_spec(str(ckpt))
        if loaded is None:
            raise ValueError(
                f"ckpt {ckpt!r} is the fbank baseline, which has no encoder; use s3prl's own "
                "fbank upstream, or give an exported student directory or a teacher spec"
            )
        self.source = loaded.source
        self.encoder: SpeechEncoder = loaded.encoder
        self.front_end = FrontEnd(loaded.feature_extractor)
        self.downsample_rate = downsample_rate(self.front_end, self.encoder)
        self._batched = batch_invariant(self.encoder)
        _make_trainable(self.encoder)

    @property
    def num_layers(self) -> int:
        """L: ``forward`` returns L + 1 hidden states."""
        return self.encoder.num_layers

    @property
    def hidden_dim(self) -> int:
        return self.encoder.hidden_dim

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Input samples per output frame, for every key of ``forward``'s dict (320 for all
        families colld supports)."""
        return self.downsample_rate

    def forward(self, wavs: Sequence[Tensor | np.ndarray]) -> dict[str, Any]:
        """Every hidden state of B waveforms.

        wavs: B unpadded 16 kHz mono waveforms, each Shape: (S_b,), on any device.
        Returns ``hidden_states`` (a tuple of L + 1 tensors) and ``last_hidden_state`` (its last
        one), each Shape: (B, T, D) on the model's device; frames beyond an utterance's own
        count are 0.
        """
        features = [self._features(i, wav) for i, wav in enumerate(check_waveforms(wavs))]
        if self._batched:
            states = self._encode(features)
        else:  # padding would change the valid frames
            alone = [self._encode([clip]) for clip in features]
            states = [
                pad_sequence([clip_states[j][0] for clip_states in alone], batch_first=True)
                for j in range(self.num_layers + 1)
            ]
        hidden_states = tuple(states)
        return {"hidden_states": hidden_states, "last_hidden_state": hidden_states[-1]}

    def _features(self, index: int, wav: np.ndarray) -> Tensor:
        """The front end's output for ``wavs[index]``. Shape: (S,) -> (F, C) or (S,)."""
        limit = self.front_end.max_samples
        if limit is not None and wav.shape[0] > limit:
            raise ValueError(
                f"wavs[{index}] holds {wav.shape[0]} samples ({wav.shape[0] / SAMPLE_RATE:.2f} s "
                f"at 16 kHz); {self.source} takes at most {limit} ({limit / SAMPLE_RATE:g} s): "
                "split it"
            )
        try:
            return self.front_end(wav)
        except AudioError as err:
            raise ValueError(f"wavs[{index}] of shape {wav.shape}: {err}") from err

    def _encode(self, features: list[Tensor]) -> list[Tensor]:
        """Hidden states 0..L of a padded batch, zero beyond each clip's frames.

        features: B clips, each Shape: (F_b, C) or (S_b,). Returns L + 1 tensors (B, T, D).
        """
        padded, lengths = pad_features(features, self.front_end.feature_dim)  # (B, F[, C])
        reference = next(self.encoder.parameters())
        out = self.encoder(
            padded.to(reference.device, reference.dtype), lengths.to(reference.device)
        )
        invalid = ~out.padding_mask()[:, :, None]  # (B, T, 1)
        return [out.hidden_states[j].masked_fill(invalid, 0.0) for j in sorted(out.hidden_states)]


def downsample_rate(front_end: FrontEnd, encoder: SpeechEncoder) -> int:
    """Input samples per encoder frame: sample rate / frame rate, a whole number (320)."""
    if front_end.sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"the model's feature extractor expects {front_end.sample_rate} Hz audio; s3prl "
            f"feeds {SAMPLE_RATE} Hz"
        )
    rate = SAMPLE_RATE / encoder.frame_rate
    if abs(rate - round(rate)) > 1e-6:
        raise ValueError(
            f"{encoder.family} encoder runs at {encoder.frame_rate} frames/s, i.e. {rate} samples "
            "per frame; s3prl needs a whole number"
        )
    return int(round(rate))


def check_waveforms(wavs: Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
    """The waveforms as float32 numpy arrays on the CPU (the front ends are numpy code).

    Raises ValueError for an empty list or a waveform that is not 1-D, naming its index.
    """
    if isinstance(wavs, (Tensor, np.ndarray)) or len(wavs) == 0:
        found = f"Shape {tuple(wavs.shape)}" if isinstance(wavs, (Tensor, np.ndarray)) else "[]"
        raise ValueError(
            f"wavs should be a non-empty list of 1-D 16 kHz waveforms (S,), found {found}"
        )
    arrays = []
    for i, wav in enumerate(wavs):
        if not isinstance(wav, (Tensor, np.ndarray)) or wav.ndim != 1:
            shape = tuple(wav.shape) if hasattr(wav, "shape") else type(wav).__name__
            raise ValueError(f"wavs[{i}] has shape {shape}; expected one 1-D waveform (S,)")
        tensor = wav.detach() if isinstance(wav, Tensor) else torch.from_numpy(np.asarray(wav))
        arrays.append(tensor.to("cpu", torch.float32).numpy())
    return arrays


def _make_trainable(encoder: SpeechEncoder) -> None:
    """Every parameter trainable except Whisper's fixed sinusoid (HF freezes it too)."""
    encoder.requires_grad_(True)
    positions = getattr(encoder.model, "embed_positions", None)
    if isinstance(positions, nn.Module):
        positions.requires_grad_(False)


# ---------------------------------------------------------------- files for an s3prl checkout
@dataclass
class S3prlUpstream:
    """What ``write_s3prl_upstream`` wrote and checked."""

    directory: Path
    entry: str
    ckpt: str
    num_layers: int
    hidden_dim: int
    downsample_rate: int

    def summary(self) -> str:
        return (
            f"{self.directory / EXPERT_FILE} and {HUBCONF_FILE} written: s3prl upstream "
            f"'{self.entry}' = {self.ckpt} ({self.num_layers + 1} hidden states of "
            f"{self.hidden_dim} dims, {self.downsample_rate} samples per frame).\n"
            f"In s3prl/hub.py add: from s3prl.upstream.{self.entry}.hubconf import *\n"
            f"Then, in s3prl/: python3 run_downstream.py -m train -n NAME -u {self.entry} "
            "-d DOWNSTREAM"
        )


def s3prl_upstream_files(ckpt: str, entry: str) -> dict[str, str]:
    """The text of ``expert.py`` and ``hubconf.py`` for an s3prl upstream folder.

    ckpt: the default model spec of the entry function (s3prl's ``-k`` overrides it).
    entry: the entry function's name (the folder's name); a public Python identifier.
    """
    check_entry_name(entry)
    expert = (
        f'"""s3prl upstream expert for colld encoders ({WRITTEN_BY}).\n\n'
        'colld must be importable in the environment that runs s3prl."""\n\n'
        "from colld.deploy.s3prl import UpstreamExpert  # noqa: F401\n"
    )
    hubconf = (
        f'"""s3prl entry `{entry}` ({WRITTEN_BY})."""\n\n'
        "from .expert import UpstreamExpert as _UpstreamExpert\n\n"
        f"_DEFAULT_CKPT = {ckpt!r}\n\n\n"
        f"def {entry}(ckpt=None, *args, **kwargs):\n"
        '    """A colld encoder as an s3prl upstream; ckpt (-k): a student directory or a\n'
        '    teacher spec, default _DEFAULT_CKPT."""\n'
        "    return _UpstreamExpert(ckpt or _DEFAULT_CKPT, *args, **kwargs)\n"
    )
    return {EXPERT_FILE: expert, HUBCONF_FILE: hubconf}


def check_entry_name(entry: str) -> None:
    """s3prl registers public callables of hubconf.py by name, and imports the folder as a
    Python package: the name must be an identifier that does not start with '_'."""
    if not entry.isidentifier() or keyword.iskeyword(entry) or entry.startswith("_"):
        raise ValueError(
            f"s3prl upstream folder name {entry!r} is also the entry name (-u) and a package "
            "name: use a Python identifier not starting with '_', e.g. colld_student"
        )


def write_s3prl_upstream(model: str, out_dir: str | Path) -> S3prlUpstream:
    """Build the upstream for ``model`` once (on 1 s of noise, as s3prl's Featurizer does)
    and write ``expert.py`` and ``hubconf.py`` into ``out_dir`` (created; our own earlier files
    are replaced, anyone else's refused with FileExistsError). An existing path in ``model``
    is stored absolute, since s3prl runs from its own folder."""
    out_dir = Path(out_dir)
    check_entry_name(out_dir.name)
    for name in (EXPERT_FILE, HUBCONF_FILE):
        existing = out_dir / name
        if existing.exists() and WRITTEN_BY not in existing.read_text(errors="replace"):
            raise FileExistsError(
                f"{existing} exists and was not written by colld; choose an empty folder"
            )
    ckpt = str(Path(model).resolve()) if Path(model).exists() else model
    upstream = UpstreamExpert(ckpt)
    with torch.no_grad():
        states = upstream([torch.randn(SAMPLE_RATE)])["hidden_states"]
    if len(states) != upstream.num_layers + 1:
        raise RuntimeError(f"{ckpt} gave {len(states)} hidden states, expected L + 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in s3prl_upstream_files(ckpt, out_dir.name).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return S3prlUpstream(
        directory=out_dir,
        entry=out_dir.name,
        ckpt=ckpt,
        num_layers=upstream.num_layers,
        hidden_dim=upstream.hidden_dim,
        downsample_rate=upstream.get_downsample_rates("hidden_states"),
    )
