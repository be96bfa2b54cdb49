"""The distillation objective: config, heads + target normalisation + per-pair losses.

One ``DistillObjective`` serves CoLLD and every baseline of METHOD.md (DistilHuBERT, FitHuBERT-
style L2L, masked L2L regression, unmasked contrastive L2L); they differ only in the config.

Shape legend: B batch, T frames, D_s student width, D_t teacher width, K distractors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from colld.encoders.base import EncoderOutput, SpeechEncoder
from colld.objectives.heads import HEAD_INITS, PredictionHeads
from colld.objectives.layer_map import (
    LAYER_MAP_MODES,
    SOURCE_MAP,
    pair_name,
    resolve_layer_map,
)
from colld.objectives.losses import PairLoss, contrastive_losses, l1cos_loss, mse_loss
from colld.objectives.masking import span_mask, valid_frames
from colld.objectives.normalize import TARGET_NORMS, TargetNormalizer, masked_moments

logger = logging.getLogger(__name__)

LOSSES = ("contrastive", "l1cos", "mse")
TARGETS = ("hidden", "ffn")
LOSS_FRAMES = ("masked", "unmasked", "all")
HEAD_INIT_CHOICES = ("auto", *HEAD_INITS)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"objective.{name} = {value!r} is unknown; expected one of {list(allowed)}"
        )


def _check_number(name: str, value: object, kind: type) -> None:
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if isinstance(value, bool) or not ok:
        raise ValueError(f"objective.{name} = {value!r} must be a {kind.__name__}")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """What the student is trained to match, and how (METHOD.md, "The objective")."""

    loss: str = "contrastive"
    """Per-pair loss: "contrastive" (CoLLD's InfoNCE), "l1cos" (DistilHuBERT), "mse"."""

    mode: str = "layer-to-layer"
    """"layer-to-layer": student layer i predicts teacher layer m(i); "prediction-heads"
    (DistilHuBERT): the last student layer predicts several teacher layers, one head each."""

    layer_map: list[int] | str | None = None
    """Teacher layers (1..L_T). layer-to-layer: one per student layer (None = uniform
    ceil(i * L_T / L_S)); prediction-heads: the targets (None = min(3, L_T) spread, ending at L_T).
    "source" (layer-to-layer, student.init teacher or prune): each student layer predicts the
    teacher layer it was copied from (for a depth-pruned student, the kept layers; for
    init=teacher the same as the uniform map). The run records the list it resolved to."""

    target: str = "hidden"
    """"hidden": the teacher layer's hidden state; "ffn": its feed-forward output before the
    residual add (data2vec-style; the trainer must ask the teacher for ``return_ffn``)."""

    target_norm: str = "layer_norm"
    """Target normalisation: "none" | "layer_norm" (per frame) | "instance" (per utterance over
    time) | "standardize" (running per-dim statistics). Provisional default; to be settled by
    experiment (Whisper base layers 4-5 carry a ~50x outlier dimension)."""

    tau: float = 0.1
    """Contrastive temperature (> 0)."""

    num_negatives: int = 100
    """K, distractors per frame for the contrastive loss (>= 1), from the same utterance."""

    batch_negatives: bool = False
    """Contrastive only: also contrast each frame with the same frame index of every other
    utterance in the batch. The paper's distractors all come from the same utterance; with
    Whisper's absolute sinusoidal positions that task can be solved by position alone (measured
    in docs/results/demo.md), and these extra distractors share the positive's position."""

    loss_frames: str = "all"
    """Frames the loss counts: "masked", "unmasked" or "all" valid frames. With masking off
    (``mask`` False, or no mask passed) nothing is masked, so "masked" and "unmasked" both mean
    all valid frames. Default "all" (ours; METHOD.md's default is "masked"): from the default
    pruned student, masked input with the loss on every frame scored 696 +- 43 against 464 +- 5
    with the loss on masked frames only (docs/results/masking.md, 2 seeds, 80 updates)."""

    mask: bool = True
    """Mask time spans of the student's input (learned mask embedding)."""

    mask_prob: float = 0.65
    """HF/fairseq ``mask_time_prob``: about mask_prob * T / mask_span spans (~48% coverage)."""

    mask_span: int = 10
    """Frames per masked span (>= 1)."""

    mask_min_spans: int = 2
    """At least this many spans per utterance, as far as its length allows (>= 0)."""

    pair_weights: list[float] | None = None
    """Weight of each pair in the total (pair order of the resolved layer map; >= 0, not all
    0); None = plain mean over pairs."""

    l1cos_lambda: float = 1.0
    """lambda in DistilHuBERT's L1 - lambda * log sigmoid(cos) (>= 0)."""

    head_hidden_dim: int | None = None
    """None = each head is one Linear(D_s, D_t); an int = Linear -> GELU -> Linear with this
    hidden width (DistilHuBERT's prediction heads)."""

    head_init: str = "auto"
    """"random": nn.Linear's own init. "select": each head starts as W = [I; 0], b = 0, putting
    the student's D_s dimensions on the teacher's first D_s (the transpose of
    ``student.init=teacher``'s weight selection, so a teacher-initialised student is already
    aligned with its targets at step 0; a pruned student's dims land on the teacher channels it
    kept). Needs one Linear per head (no head_hidden_dim).
    "auto" (default): "select" for a teacher- or prune-initialised student with single-Linear
    heads,
    else "random" (``resolve_head_init``; the run's recorded config holds the resolved value)."""

    def validate(self, num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
        """Check every field against the allowed values and the model depths.

        Returns the resolved (student_layer, teacher_layer) pairs. Raises ValueError naming the
        field, the value and what was expected.
        """
        self.validate_static()
        try:
            pairs = resolve_layer_map(
                self.layer_map, num_student_layers, num_teacher_layers, self.mode
            )
        except ValueError as error:
            raise ValueError(f"objective.layer_map: {error}") from error
        if self.pair_weights is not None and len(self.pair_weights) != len(pairs):
            raise ValueError(
                f"objective.pair_weights has {len(self.pair_weights)} entries but the layer "
                f"map has {len(pairs)} pairs ({[pair_name(p) for p in pairs]})"
            )
        return pairs

    def validate_static(self) -> None:
        """The checks that need no model (run once when the config is loaded)."""
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("mode", self.mode, LAYER_MAP_MODES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("target_norm", self.target_norm, TARGET_NORMS)
        _check_choice("loss_frames", self.loss_frames, LOSS_FRAMES)
        for name in ("tau", "mask_prob", "l1cos_lambda"):
            _check_number(name, getattr(self, name), float)
        for name in ("num_negatives", "mask_span", "mask_min_spans"):
            _check_number(name, getattr(self, name), int)
        if not isinstance(self.mask, bool):
            raise ValueError(f"objective.mask = {self.mask!r} must be a bool (true/false)")
        if isinstance(self.layer_map, str):
            if self.layer_map != SOURCE_MAP:
                raise ValueError(
                    f"objective.layer_map = {self.layer_map!r}: expected a list of teacher "
                    f"layers, null (uniform) or {SOURCE_MAP!r}"
                )
            if self.mode != "layer-to-layer":
                raise ValueError(
                    f"objective.layer_map = {SOURCE_MAP!r} needs objective.mode = "
                    f"'layer-to-layer' (one student layer per copied teacher layer), found "
                    f"{self.mode!r}"
                )
        if self.tau <= 0:
            raise ValueError(f"objective.tau = {self.tau} must be > 0")
        if self.num_negatives < 1:
            raise ValueError(f"objective.num_negatives = {self.num_negatives} must be >= 1")
        if self.batch_negatives and self.loss != "contrastive":
            raise ValueError(
                f"objective.batch_negatives applies to the contrastive loss only, "
                f"but objective.loss = {self.loss!r}"
            )
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"objective.mask_prob = {self.mask_prob} must lie in [0, 1]")
        if self.mask_span < 1:
            raise ValueError(f"objective.mask_span = {self.mask_span} must be >= 1 frame")
        if self.mask_min_spans < 0:
            raise ValueError(f"objective.mask_min_spans = {self.mask_min_spans} must be >= 0")
        if self.l1cos_lambda < 0:
            raise ValueError(f"objective.l1cos_lambda = {self.l1cos_lambda} must be >= 0")
        if self.head_init not in HEAD_INIT_CHOICES:
            raise ValueError(
                f"objective.head_init = {self.head_init!r}; expected one of {HEAD_INIT_CHOICES}"
            )
        if self.head_init == "select" and self.head_hidden_dim is not None:
            raise ValueError(
                "objective.head_init = 'select' needs single-Linear heads; found "
                f"head_hidden_dim = {self.head_hidden_dim} (set it to null or head_init=random)"
            )
        if self.head_hidden_dim is not None:
            _check_number("head_hidden_dim", self.head_hidden_dim, int)
            if self.head_hidden_dim < 1:
                raise ValueError(f"objective.head_hidden_dim = {self.head_hidden_dim} must be >= 1")
        if self.pair_weights is not None:
            for position, weight in enumerate(self.pair_weights):
                _check_number(f"pair_weights[{position}]", weight, float)
                if weight < 0:
                    raise ValueError(f"objective.pair_weights[{position}] = {weight} must be >= 0")
            if sum(self.pair_weights) <= 0:
                raise ValueError(f"objective.pair_weights = {self.pair_weights} are all 0")


def resolve_head_init(config: ObjectiveConfig, student_init: str) -> ObjectiveConfig:
    """``head_init="auto"`` made concrete: "select" where the student starts as a selection of
    the teacher's weights (``student_init`` "auto", "teacher" or "prune") and the heads are single
    Linears, so
    student and heads start aligned with the targets; "random" otherwise. Measured: with
    teacher-initialised students, random heads made training worse than the untrained student
    (docs/results/demo.md, "Follow-up"). Other values are returned unchanged."""
    if config.head_init != "auto":
        return config
    # "auto" resolves to "prune" or "teacher" once the teacher is known: aligned either way.
    aligned = student_init in ("auto", "teacher", "prune") and config.head_hidden_dim is None
    return dataclasses.replace(config, head_init="select" if aligned else "random")


@dataclass
class LossOutput:
    """What one objective evaluation gives.

    total: differentiable scalar, the (weighted) mean over pairs of each pair's frame mean.
    parts: pair name ("s3->t5") -> that pair's loss (detached).
    accuracy: pair name -> contrastive accuracy (detached; empty for other losses).
    cosine: pair name -> mean cos(projected student, target) over the counted frames (detached).
    student_std: "s{i}" -> std over time of student layer i's raw output on valid frames,
        averaged over dims and utterances (detached; tends to 0 on collapse).
    """

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    accuracy: dict[str, Tensor] = field(default_factory=dict)
    cosine: dict[str, Tensor] = field(default_factory=dict)
    student_std: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def time_std(states: Tensor, valid: Tensor) -> Tensor:
    """Std over valid time per utterance and dim, averaged over dims and utterances (those with
    >= 2 valid frames; NaN if none). Shape: (B, T, D), (B, T) -> scalar."""
    _, var, count = masked_moments(states.detach().float(), valid, dims=(1,))  # (B, 1, D)
    per_utterance = var.sqrt().mean(dim=(1, 2))  # (B,)
    usable = count.view(-1) >= 2
    # A masked mean rather than boolean indexing, which would make a GPU wait for the host.
    return (per_utterance * usable).sum() / usable.sum()


class DistillObjective(nn.Module):
    """Heads, target normalisers and the per-pair loss of one distillation run.

    Owns the training-only parameters (heads) and statistics (target normaliser buffers); put it
    in the optimiser and the checkpoint next to the student, never in the exported model.
    """

    def __init__(
        self,
        config: ObjectiveConfig,
        student_dim: int,
        teacher_dim: int,
        num_student_layers: int,
        num_teacher_layers: int,
        head_channels: Sequence[int] | None = None,
    ) -> None:
        """head_channels: the teacher dims the student's dims start aligned with, for
        ``head_init="select"`` (a pruned student's ``PrunePlan.residual``; None = the first
        D_s)."""
        super().__init__()
        self.config = config
        self.pairs = config.validate(num_student_layers, num_teacher_layers)
        # An unresolved "auto" (a config built in code, not by load_config) knows nothing of
        # the student's init: the heads get nn.Linear's own.
        head_init = "random" if config.head_init == "auto" else config.head_init
        self.heads = PredictionHeads(
            self.pairs,
            student_dim,
            teacher_dim,
            config.head_hidden_dim,
            init=head_init,
            channels=head_channels,
        )
        self.normalizer = TargetNormalizer(config.target_norm, self.teacher_layers, teacher_dim)
        weights = config.pair_weights or [1.0] * len(self.pairs)
        self.register_buffer("pair_weights", torch.tensor(weights), persistent=False)
        logger.info(
            "objective: %s loss, %s, pairs %s, target %s/%s, mask %s",
            config.loss,
            config.mode,
            self.pair_names,
            config.target,
            config.target_norm,
            config.mask,
        )

    @classmethod
    def for_encoders(
        cls,
        config: ObjectiveConfig,
        student: SpeechEncoder,
        teacher: SpeechEncoder,
        head_channels: Sequence[int] | None = None,
    ) -> DistillObjective:
        """The objective between ``student`` and ``teacher`` (widths and depths read off them)."""
        return cls(
            config,
            student_dim=student.hidden_dim,
            teacher_dim=teacher.hidden_dim,
            num_student_layers=student.num_layers,
            num_teacher_layers=teacher.num_layers,
            head_channels=head_channels,
        )

    @property
    def pair_names(self) -> list[str]:
        return [pair_name(pair) for pair in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        """Teacher layers to request (sorted, unique)."""
        return sorted({j for _, j in self.pairs})

    @property
    def student_layers(self) -> list[int]:
        """Student layers the objective reads (sorted, unique)."""
        return sorted({i for i, _ in self.pairs})

    def make_mask(
        self, lengths: Tensor, num_frames: int, generator: torch.Generator | None
    ) -> Tensor | None:
        """The student's input mask for a batch, or None when masking is off.

        Shape: (B,) -> (B, T) bool. ``generator`` must live on ``lengths.device``.
        """
        if not self.config.mask:
            return None
        return span_mask(
            lengths,
            num_frames,
            mask_prob=self.config.mask_prob,
            span=self.config.mask_span,
            min_spans=self.config.mask_min_spans,
            generator=generator,
        )

    def teacher_targets(self, output: EncoderOutput) -> dict[int, Tensor]:
        """Pick the configured targets (hidden states or FFN outputs) from a teacher's output."""
        source = output.ffn_outputs if self.config.target == "ffn" else output.hidden_states
        missing = [j for j in self.teacher_layers if j not in source]
        if missing:
            kind = (
                "ffn_outputs (run the teacher with return_ffn=True)"
                if self.config.target == "ffn"
                else "hidden_states"
            )
            raise KeyError(
                f"teacher output lacks {kind} for layer(s) {missing}; has {sorted(source)}"
            )
        return {j: source[j] for j in self.teacher_layers}

    def select_frames(self, valid: Tensor, mask: Tensor | None) -> Tensor:
        """Frames the loss counts (config.loss_frames), always within ``valid``. Shape: (B, T)."""
        if mask is None or self.config.loss_frames == "all":
            return valid
        if mask.shape != valid.shape:
            raise ValueError(f"mask must be (B, T) = {tuple(valid.shape)}, got {tuple(mask.shape)}")
        if self.config.loss_frames == "masked":
            return valid & mask
        return valid & ~mask

    def _pair_losses(
        self,
        predictions: list[Tensor],
        targets: list[Tensor],
        select: Tensor,
        lengths: Tensor,
        generator: torch.Generator | None,
    ) -> list[PairLoss]:
        if self.config.loss == "contrastive":  # one call: pairs stacked on accelerators
            return contrastive_losses(
                predictions,
                targets,
                select,
                lengths,
                tau=self.config.tau,
                num_negatives=self.config.num_negatives,
                generator=generator,
                batch_negatives=self.config.batch_negatives,
            )
        if self.config.loss == "l1cos":
            lam = self.config.l1cos_lambda
            return [
                l1cos_loss(z, y, select, lengths, lam=lam)
                for z, y in zip(predictions, targets, strict=True)
            ]
        return [mse_loss(z, y, select, lengths) for z, y in zip(predictions, targets, strict=True)]

    def forward(
        self,
        student_states: dict[int, Tensor],
        teacher_states: dict[int, Tensor],
        lengths: Tensor,
        mask: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Evaluate the objective on one batch.

        student_states: student layer -> hidden state (at least ``student_layers``).
            Shape: (B, T, D_s).
        teacher_states: teacher layer -> target before normalisation (at least
            ``teacher_layers``; see ``teacher_targets``). Shape: (B, T, D_t).
        lengths: valid frames per utterance (same for teacher and student). Shape: (B,).
        mask: the student's input mask from ``make_mask`` (None = unmasked). Shape: (B, T).
        generator: draws the contrastive distractors; on the tensors' device.
        """
        missing = [j for j in self.teacher_layers if j not in teacher_states]
        if missing:
            raise KeyError(
                f"teacher_states lacks layer(s) {missing}; got {sorted(teacher_states)}, "
                f"need {self.teacher_layers}"
            )
        num_frames = teacher_states[self.teacher_layers[0]].shape[1]
        for i in self.student_layers:
            if i in student_states and student_states[i].shape[:2] != (
                lengths.shape[0],
                num_frames,
            ):
                raise ValueError(
                    f"student layer {i} has (B, T) = {tuple(student_states[i].shape[:2])} but the "
                    f"teacher targets have {(lengths.shape[0], num_frames)}"
                )
        valid = valid_frames(lengths, num_frames)
        select = self.select_frames(valid, mask)
        targets = {j: self.normalizer(teacher_states[j], valid, j) for j in self.teacher_layers}
        predictions = self.heads(student_states)
        results = self._pair_losses(
            predictions, [targets[j] for _, j in self.pairs], select, lengths, generator
        )
        out = LossOutput(total=torch.zeros((), device=lengths.device))
        losses = []
        for name, result in zip(self.pair_names, results, strict=True):
            losses.append(result.loss)
            out.parts[name] = result.loss.detach()
            out.cosine[name] = result.cosine
            if result.accuracy is not None:
                out.accuracy[name] = result.accuracy
        weights = self.pair_weights.to(losses[0].device)
        out.total = (torch.stack(losses) * weights).sum() / weights.sum()
        for i in self.student_layers:
            out.student_std[f"s{i}"] = time_std(student_states[i], valid)
        return out
