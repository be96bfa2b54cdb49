"""A collated batch and the one home for padding (light: torch and numpy only).

Shape legend: B batch, S samples, F front-end frames, C feature channels, T encoder frames,
D_t teacher width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


@dataclass
class Batch:
    """One collated batch, shared by teacher and student.

    ids: utterance ids in batch order (skipped ones excluded).
    features: front-end output, zero-padded. Shape: (B, F, C) spectral, (B, S) waveform.
    feature_lengths: valid frames (samples) per row. Shape: (B,), int64.
    durations: seconds of audio per row after cropping / augmentation. Shape: (B,), float32.
    skipped: ids dropped from this batch (unreadable, missing, empty, NaN, too short).
    skip_reasons: id -> reason code (``AudioError.reason``: missing, empty, unsupported,
        unreadable, truncated, non_finite, too_short) for counting.
    epoch, batch_index: where the batch sits in the sampler's order; pass them to
        ``DurationBucketSampler.note_consumed`` after the step so a resume continues here.
    targets: teacher layer -> cached teacher targets, zero-padded, float16, or None when the
        teacher runs online. Shape: (B, T, D_t).
    target_lengths: valid target frames per row (None without ``targets``). Shape: (B,), int64.
    """

    ids: list[str]
    features: Tensor
    feature_lengths: Tensor
    durations: Tensor
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    batch_index: int = 0
    targets: dict[int, Tensor] | None = None
    target_lengths: Tensor | None = None

    @property
    def size(self) -> int:
        """B, the number of usable clips (0 when everything in the request failed)."""
        return len(self.ids)

    @property
    def seconds(self) -> float:
        """Seconds of audio in the batch (for throughput)."""
        return float(self.durations.sum())

    def padding_mask(self) -> Tensor:
        """True on valid frames (samples). Shape: (B, F) or (B, S)."""
        num_frames = self.features.shape[1]
        positions = torch.arange(num_frames, device=self.feature_lengths.device)
        return positions[None, :] < self.feature_lengths[:, None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on ``device``."""
        return Batch(
            ids=self.ids,
            features=self.features.to(device, non_blocking=non_blocking),
            feature_lengths=self.feature_lengths.to(device, non_blocking=non_blocking),
            durations=self.durations.to(device, non_blocking=non_blocking),
            skipped=self.skipped,
            skip_reasons=self.skip_reasons,
            epoch=self.epoch,
            batch_index=self.batch_index,
            targets=None
            if self.targets is None
            else {j: t.to(device, non_blocking=non_blocking) for j, t in self.targets.items()},
            target_lengths=None
            if self.target_lengths is None
            else self.target_lengths.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy (the DataLoader calls this when ``pin_memory=True``)."""
        self.features = self.features.pin_memory()
        self.feature_lengths = self.feature_lengths.pin_memory()
        self.durations = self.durations.pin_memory()
        if self.targets is not None:
            self.targets = {j: t.pin_memory() for j, t in self.targets.items()}
            self.target_lengths = self.target_lengths.pin_memory()
        return self


def pad_features(
    features: Sequence[Tensor], feature_dim: int | None = None
) -> tuple[Tensor, Tensor]:
    """Zero-pad per-clip features along time into one tensor (the one home for padding).

    features: B tensors, each Shape: (F_i, C) or (S_i,).
    feature_dim: C for an empty list of spectral features (None = waveforms).
    Returns (padded, lengths). Shape: (B, max F_i, C) or (B, max S_i); lengths (B,) int64.
    """
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.int64)
    if not features:
        empty_shape = (0, 0) if feature_dim is None else (0, 0, feature_dim)
        return torch.zeros(empty_shape, dtype=torch.float32), lengths
    return pad_sequence(list(features), batch_first=True, padding_value=0.0), lengths


def pad_targets(
    targets: Sequence[dict[int, np.ndarray]], layers: Sequence[int]
) -> tuple[dict[int, Tensor], Tensor]:
    """Zero-pad per-clip cached targets along time, per layer.

    targets: B dicts, layer -> array Shape: (T_i, D_t) (float16 from the cache).
    Returns (layer -> Shape: (B, max T_i, D_t) in the arrays' dtype, lengths (B,) int64).
    """
    lengths = torch.tensor(
        [row[layers[0]].shape[0] for row in targets] if layers else [], dtype=torch.int64
    )
    padded = {}
    for layer in layers:
        if not targets:
            padded[layer] = torch.zeros((0, 0, 0), dtype=torch.float16)
            continue
        padded[layer] = pad_sequence(
            [torch.from_numpy(row[layer]) for row in targets], batch_first=True, padding_value=0.0
        )
    return padded, lengths


def collate_waveforms(waveforms: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Zero-pad mono clips. Shape: B arrays (S_i,) -> (B, max S_i) float32, lengths (B,)."""
    return pad_features([torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waveforms])
