"""One distillation step as pure functions: teacher targets, student loss, health signals.

The frozen teacher runs outside the trained module (no gradients, never wrapped for DDP);
``Distiller`` holds everything that trains (student + heads + normalisers) so that one
DDP/Accelerate wrapper covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from colld.data.batch import Batch
from colld.encoders.base import SpeechEncoder
from colld.objectives.objective import DistillObjective, LossOutput


class Distiller(nn.Module):
    """Student + objective. forward() returns the loss for one batch."""

    def __init__(self, student: SpeechEncoder, objective: DistillObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(
        self,
        features: Tensor,
        feature_lengths: Tensor,
        teacher_states: dict[int, Tensor],
        mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> LossOutput:
        """features: (B, F, C) or (B, S); teacher_states: layer -> (B, T, D_t); mask: (B, T)."""
        out = self.student(
            features, feature_lengths, layers=self.objective.student_layers, mask=mask
        )
        return self.objective(out.hidden_states, teacher_states, out.lengths, mask, generator)


@dataclass
class TeacherTargets:
    states: dict[int, Tensor]  # teacher layer -> (B, T, D_t)
    lengths: Tensor  # (B,)


@torch.no_grad()
def teacher_targets(
    teacher: SpeechEncoder, batch: Batch, objective: DistillObjective
) -> TeacherTargets:
    """Run the frozen teacher on the unmasked batch, only as deep as the deepest target."""
    use_ffn = objective.config.target == "ffn"
    out = teacher(
        batch.features,
        batch.feature_lengths,
        layers=objective.teacher_layers,
        return_ffn=use_ffn,
    )
    states = out.ffn_outputs if use_ffn else out.hidden_states
    return TeacherTargets(
        states={j: states[j] for j in objective.teacher_layers}, lengths=out.lengths
    )


def cached_targets(
    teacher: SpeechEncoder, batch: Batch, objective: DistillObjective
) -> TeacherTargets:
    """The batch's cached targets in fp32, checked against the frames the encoders produce.

    Raises ValueError when a segment's cached frame count differs from what the teacher (and
    so the same-family student) makes of its features: the cache belongs to other audio or
    another front end.
    """
    expected = teacher.output_lengths(batch.feature_lengths).to(batch.target_lengths.device)
    if not torch.equal(expected, batch.target_lengths):
        bad = [
            f"{uid}: cached {int(c)} vs {int(e)}"
            for uid, c, e in zip(batch.ids, batch.target_lengths, expected, strict=True)
            if int(c) != int(e)
        ]
        raise ValueError(
            "cached teacher targets do not match the encoder frames of their features ("
            + "; ".join(bad[:5])
            + "); rebuild the teacher-target cache"
        )
    missing = [j for j in objective.teacher_layers if j not in batch.targets]
    if missing:
        raise KeyError(f"the cached targets lack teacher layer(s) {missing}")
    states = {j: batch.targets[j].float() for j in objective.teacher_layers}
    return TeacherTargets(states=states, lengths=batch.target_lengths)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for masks and distractors derived from (seed, step, rank): a resumed run
    draws exactly what the uninterrupted run drew, with no generator state to save."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return g


def distill_loss(
    distiller: nn.Module,
    teacher: SpeechEncoder,
    objective: DistillObjective,
    batch: Batch,
    generator: torch.Generator,
) -> LossOutput:
    """Teacher targets, the student's mask, and the loss of one batch.

    ``distiller`` may be the DDP-wrapped module; ``objective`` is the unwrapped one's objective.
    A batch with cached targets (``Batch.targets``, from a teacher-target cache) uses them
    instead of running the teacher.
    """
    if batch.targets is None:
        targets = teacher_targets(teacher, batch, objective)
    else:
        targets = cached_targets(teacher, batch, objective)
    lengths = targets.lengths
    num_frames = next(iter(targets.states.values())).shape[1]
    mask = objective.make_mask(lengths, num_frames, generator)
    return distiller(batch.features, batch.feature_lengths, targets.states, mask, generator)
