"""Normalisation of the teacher's targets (METHOD.md, step 1).

Kinds:
    "none"        targets as the teacher gives them (cast to float32).
    "layer_norm"  per frame over the D_t dims, no affine (data2vec's ``F.layer_norm``).
    "instance"    per utterance and dim over the utterance's valid frames (data2vec's instance
                  norm, but padding is excluded from the statistics).
    "standardize" per dim with running statistics kept per teacher layer in buffers: exact
                  cumulative mean/variance over every valid frame seen in training (the teacher
                  is frozen, so its target distribution does not drift and a cumulative estimate
                  converges to the data's statistics); frozen in eval mode; saved in state_dict.

Every output is float32 with padding frames set to 0; padding never enters a statistic.
Whisper base's layers 4 and 5 carry one dimension ~50x the typical magnitude (ASSETS.md):
any kind but "none" keeps it from dominating cosine and L1.

Shape legend: B batch, T frames, D_t teacher width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_NORMS = ("none", "layer_norm", "instance", "standardize")
NORM_EPS = 1e-5


def masked_moments(
    y: Tensor, valid: Tensor, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, population variance and count of ``y`` over ``dims`` restricted to valid frames.

    Shape: y (B, T, D), valid (B, T) -> mean and var reduced over ``dims`` (keepdim), count
    likewise (clamped to >= 1 so that an empty selection gives mean 0, var 0).
    """
    weight = valid.unsqueeze(-1).to(y.dtype)  # (B, T, 1)
    count = weight.sum(dim=dims, keepdim=True).clamp(min=1.0)
    mean = (y * weight).sum(dim=dims, keepdim=True) / count
    var = (((y - mean) * weight) ** 2).sum(dim=dims, keepdim=True) / count
    return mean, var, count


def layer_norm_targets(y: Tensor, valid: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Per-frame layer norm without affine parameters. Shape: (B, T, D), (B, T) -> (B, T, D)."""
    out = F.layer_norm(y.float(), y.shape[-1:], eps=eps)
    return out.masked_fill(~valid.unsqueeze(-1), 0.0)


def instance_norm_targets(y: Tensor, valid: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Per-utterance, per-dim normalisation over valid time. Shape: (B, T, D), (B, T) -> (B, T, D)."""
    y = y.float()
    mean, var, _ = masked_moments(y, valid, dims=(1,))  # (B, 1, D)
    out = (y - mean) * torch.rsqrt(var + eps)
    return out.masked_fill(~valid.unsqueeze(-1), 0.0)


class RunningStandardizer(nn.Module):
    """Per-dimension standardisation with cumulative statistics of one teacher layer.

    Buffers: ``count`` (int64 scalar: valid frames seen), ``mean`` and ``var`` (float32, (D,):
    population statistics). Before any update, mean 0 / var 1 make it the identity.
    In training mode ``forward`` first merges the batch's valid frames into the statistics
    (Chan et al.'s parallel update, exact for any batch split), then normalises; in eval mode the
    statistics are frozen. Under data parallelism each rank keeps its own statistics.
    """

    count: Tensor
    mean: Tensor
    var: Tensor

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))

    @torch.no_grad()
    def update(self, y: Tensor, valid: Tensor) -> None:
        """Merge the valid frames of a batch into the statistics. Shape: (B, T, D), (B, T)."""
        batch_count = int(valid.sum())
        if batch_count == 0:
            return
        frames = y.float()[valid]  # (N, D)
        batch_mean = frames.mean(dim=0)
        batch_var = frames.var(dim=0, unbiased=False)
        old_count = int(self.count)
        total = old_count + batch_count
        delta = batch_mean - self.mean
        new_mean = self.mean + delta * (batch_count / total)
        m2 = (
            self.var * old_count
            + batch_var * batch_count
            + delta**2 * (old_count * batch_count / total)
        )
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.fill_(total)

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Load precomputed statistics (e.g. from a pass of the teacher over the data). Shape: (D,), (D,)."""
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ValueError(
                f"statistics must have shape {tuple(self.mean.shape)}, got mean "
                f"{tuple(mean.shape)} and var {tuple(var.shape)}"
            )
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.fill_(int(count))

    def forward(self, y: Tensor, valid: Tensor) -> Tensor:
        """Standardise (updating the statistics first in training mode).

        Shape: (B, T, D), (B, T) -> (B, T, D) float32, padding frames 0.
        """
        if self.training:
            self.update(y, valid)
        out = (y.float() - self.mean) * torch.rsqrt(self.var + self.eps)
        return out.masked_fill(~valid.unsqueeze(-1), 0.0)


class TargetNormalizer(nn.Module):
    """Normalises the targets of each requested teacher layer with one ``kind`` (see module doc).

    teacher_layers: the layers whose targets will be normalised (one running-statistics module
        each for "standardize"; state_dict keys ``stats.<layer>.{count,mean,var}``).
    dim: D_t.
    """

    def __init__(self, kind: str, teacher_layers: Sequence[int], dim: int) -> None:
        super().__init__()
        if kind not in TARGET_NORMS:
            raise ValueError(f"unknown target_norm {kind!r}; expected one of {list(TARGET_NORMS)}")
        self.kind = kind
        self.teacher_layers = sorted(set(int(j) for j in teacher_layers))
        self.stats = nn.ModuleDict()
        if kind == "standardize":
            for layer in self.teacher_layers:
                self.stats[str(layer)] = RunningStandardizer(dim)

    def forward(self, y: Tensor, valid: Tensor, layer: int) -> Tensor:
        """Normalise the targets of teacher ``layer``.

        y: teacher states (any float dtype). Shape: (B, T, D_t).
        valid: True on valid frames. Shape: (B, T).
        Returns float32 targets, padding frames 0. Shape: (B, T, D_t).
        """
        with torch.autocast(device_type=y.device.type, enabled=False):
            if self.kind == "none":
                return y.float().masked_fill(~valid.unsqueeze(-1), 0.0)
            if self.kind == "layer_norm":
                return layer_norm_targets(y, valid)
            if self.kind == "instance":
                return instance_norm_targets(y, valid)
            key = str(int(layer))
            if key not in self.stats:
                raise KeyError(
                    f"no running statistics for teacher layer {layer}; this normaliser was built "
                    f"for layers {self.teacher_layers}"
                )
            return self.stats[key](y, valid)
