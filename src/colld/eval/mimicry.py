"""How closely a student mimics its teacher: linear CKA between layers, per-pair head cosines.

Two measures on frozen-encoder features (``FeatureSet``) of the same utterances:
    ``cka_matrix``   linear CKA (Kornblith et al. 2019) between every student and every teacher
                     hidden state, frames pooled over utterances; needs no training artefact,
                     so it also compares any two models (teacher vs. fbank, two students).
    ``pair_cosines`` for each distilled (student, teacher) pair, the mean cosine between the
                     student layer through its trained head and the teacher's normalised target,
                     as the training objective sees it (``load_objective`` rebuilds the heads
                     and the target normaliser from an exported student).

Both feature sets must come from unmasked forward passes over the same utterance list.

Shape legend: see ``colld.encoders.base`` (N pooled frames, L layers, T frames, D width).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from colld.config import from_dict
from colld.eval.features import FeatureSet
from colld.objectives.losses import COS_EPS
from colld.objectives.objective import DistillObjective, ObjectiveConfig
from colld.students.export import DISTILL_HEADS_FILE, PROVENANCE_FILE, read_provenance

logger = logging.getLogger(__name__)

MAX_FRAME_SLACK = 2
"""Frames two models may disagree by at the end of one utterance (conv rounding); the longer
one is truncated. A larger difference is an error."""

OBJECTIVE_PREFIX = "objective."
"""Key prefix of the objective's state_dict inside ``distill_heads.safetensors``."""

CKA_CACHE_BYTES = 1 << 30
"""``cka_matrix`` keeps every state of its second set centred in float64 when that takes at most
this many bytes (whisper-base at 20000 frames: 7 x 20000 x 512 x 8 B = 573 MB); above it each
state is centred again for every pair (slower, O(N D) memory)."""

_PROVENANCE_KEYS = (
    "objective",
    "student_dim",
    "teacher_dim",
    "num_student_layers",
    "num_teacher_layers",
)


# ---------------------------------------------------------------- linear CKA
def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same N examples, in float64.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with columns centred; computed through
    N x N Gram matrices instead when that is cheaper (N small against D1, D2). 1 for identical
    inputs; invariant to orthogonal transforms and isotropic scaling of either input. NaN when
    one input is constant over the examples (CKA is undefined there).

    Shape: x (N, D1), y (N, D2) -> scalar.
    """
    _check_pair(x, y)
    xc, yc = _centre(x), _centre(y)
    gram = _use_gram(x.shape[0], x.shape[1], y.shape[1])
    return _cka_from_hsic(_hsic(xc, yc, gram), _hsic(xc, xc, gram), _hsic(yc, yc, gram))


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"linear_cka expects two (N, D) matrices, found {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs the same examples in both inputs: x has N={x.shape[0]}, "
            f"y has N={y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs N >= 2 examples to centre, found N={x.shape[0]}")


def _centre(x: Tensor) -> Tensor:
    """Columns minus their mean, float64. Shape: (N, D) -> (N, D)."""
    x = x.to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def _use_gram(num_examples: int, dim_x: int, dim_y: int) -> bool:
    """True when the Gram form (cost ~N^2 (D1 + D2)) is cheaper than the feature form
    (cost ~N (D1 D2 + D1^2 + D2^2))."""
    return num_examples * (dim_x + dim_y) < dim_x * dim_y + dim_x**2 + dim_y**2


def _hsic(xc: Tensor, yc: Tensor, gram: bool) -> float:
    """Unnormalised linear HSIC <X X^T, Y Y^T>_F = ||Y^T X||_F^2 of centred inputs.

    Shape: (N, D1), (N, D2) -> scalar.
    """
    if gram:
        return float(((xc @ xc.T) * (yc @ yc.T)).sum())
    return float(torch.linalg.matrix_norm(yc.T @ xc) ** 2)  # (D2, D1)


def _cka_from_hsic(cross: float, self_x: float, self_y: float) -> float:
    denominator = (self_x * self_y) ** 0.5
    return cross / denominator if denominator > 0 else float("nan")


def cka_matrix(a: FeatureSet, b: FeatureSet, *, max_frames: int = 20000, seed: int = 0) -> Tensor:
    """Linear CKA between every hidden state of ``a`` and every hidden state of ``b``.

    Frames are pooled over all utterances (each frame is one example). Both sets must hold the
    same utterance ids in the same order, at the same frame rate, with the same frame count per
    utterance; counts that differ by at most ``MAX_FRAME_SLACK`` frames (conv rounding at the
    end of a clip) are aligned by truncating the longer utterance to the shorter one. With more
    than ``max_frames`` pooled frames, a uniform random subset of frames (seeded; the same
    frames for every layer of both sets) is used. Each entry is computed in float64 (memory:
    see ``CKA_CACHE_BYTES``; time: (La + 1)(Lb + 1) products of N x Da x Db, about 15-50 s for
    Whisper base against itself at 20000 frames on 2 shared CPU cores).

    Shape: -> (La + 1, Lb + 1), float64; entry [i, j] = CKA(a's state i, b's state j).
    Raises ValueError naming the first utterance (or field) that does not match.
    """
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, found {max_frames}")
    lengths = aligned_lengths(a, b)
    keep = _frame_subset(sum(lengths), max_frames, seed)
    pooled_a = _pool_frames(a.states, lengths, keep)  # (La + 1, N, Da)
    pooled_b = pooled_a if a is b else _pool_frames(b.states, lengths, keep)  # (Lb + 1, N, Db)
    num_frames = pooled_a.shape[1]
    if num_frames < 2:
        raise ValueError(f"CKA needs at least 2 frames in total, found {num_frames}")
    gram = _use_gram(num_frames, pooled_a.shape[2], pooled_b.shape[2])
    cached_b = [_centre(y) for y in pooled_b] if pooled_b.numel() * 8 <= CKA_CACHE_BYTES else None

    def centred_b(j: int) -> Tensor:  # (N, Db) float64
        return cached_b[j] if cached_b is not None else _centre(pooled_b[j])

    self_b = []
    for j in range(len(pooled_b)):
        yc = centred_b(j)
        self_b.append(_hsic(yc, yc, gram))
    out = torch.empty(len(pooled_a), len(pooled_b), dtype=torch.float64)
    for i, x in enumerate(pooled_a):
        xc = _centre(x)
        self_x = _hsic(xc, xc, gram)
        for j in range(len(pooled_b)):
            if a is b and j < i:  # symmetric: already computed
                out[i, j] = out[j, i]
                continue
            out[i, j] = _cka_from_hsic(_hsic(xc, centred_b(j), gram), self_x, self_b[j])
    return out


def aligned_lengths(a: FeatureSet, b: FeatureSet) -> list[int]:
    """Frames per utterance that ``a`` and ``b`` share (the shorter count of each).

    Raises ValueError when the utterance lists, frame rates or (beyond ``MAX_FRAME_SLACK``)
    frame counts differ; the message names the first utterance at fault.
    """
    ids_a = [u.id for u in a.utterances]
    ids_b = [u.id for u in b.utterances]
    if ids_a != ids_b:
        raise ValueError(_id_mismatch(a, b, ids_a, ids_b))
    if len(a.states) != len(ids_a) or len(b.states) != len(ids_b):
        raise ValueError(
            f"a FeatureSet holds {len(a.states)} / {len(b.states)} state tensors for "
            f"{len(ids_a)} utterances ({a.model} / {b.model})"
        )
    if not ids_a:
        raise ValueError(f"no utterances to compare ({a.model} vs {b.model})")
    if a.frame_rate != b.frame_rate:
        raise ValueError(
            f"frame rates differ: {a.model} has {a.frame_rate} frames/s, {b.model} has "
            f"{b.frame_rate}; frames can only be paired at the same rate"
        )
    lengths = []
    for utt_id, state_a, state_b in zip(ids_a, a.states, b.states, strict=True):
        t_a, t_b = int(state_a.shape[1]), int(state_b.shape[1])
        if abs(t_a - t_b) > MAX_FRAME_SLACK:
            raise ValueError(
                f"utterance {utt_id!r}: {a.model} has {t_a} frames, {b.model} has {t_b} "
                f"(at most {MAX_FRAME_SLACK} apart expected)"
            )
        lengths.append(min(t_a, t_b))
    return lengths


def _id_mismatch(a: FeatureSet, b: FeatureSet, ids_a: list[str], ids_b: list[str]) -> str:
    for position, (id_a, id_b) in enumerate(zip(ids_a, ids_b, strict=False)):
        if id_a != id_b:
            return (
                f"utterance {position} is {id_a!r} in {a.model} but {id_b!r} in {b.model}; "
                "both feature sets must hold the same utterances in the same order"
            )
    longer, extra = (a, ids_a) if len(ids_a) > len(ids_b) else (b, ids_b)
    shorter = min(len(ids_a), len(ids_b))
    return (
        f"{a.model} holds {len(ids_a)} utterances, {b.model} {len(ids_b)}; utterance "
        f"{extra[shorter]!r} is only in {longer.model} (skipped: {longer.skipped or 'none'})"
    )


def _frame_subset(num_frames: int, max_frames: int, seed: int) -> Tensor | None:
    """Which pooled frames to keep (None = all). Shape: (N_total,) bool."""
    if num_frames <= max_frames:
        return None
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(num_frames, dtype=torch.bool)
    keep[torch.randperm(num_frames, generator=generator)[:max_frames]] = True
    return keep


def _pool_frames(states: list[Tensor], lengths: list[int], keep: Tensor | None) -> Tensor:
    """The first ``lengths[n]`` frames of every utterance, concatenated, then ``keep``.

    Shape: U x (L + 1, T_n, D) -> (L + 1, N, D), dtype kept.
    """
    parts, start = [], 0
    for state, length in zip(states, lengths, strict=True):
        frames = state[:, :length]  # (L + 1, T, D)
        if keep is not None:
            frames = frames[:, keep[start : start + length]]
        parts.append(frames)
        start += length
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- the trained objective
def objective_unavailable_reason(student_dir: str | Path) -> str | None:
    """Why ``load_objective`` cannot rebuild the objective of ``student_dir`` (None if it can).

    Absent artefacts only (no colld.json, no heads file, no objective tensors in it); a file
    that is present but wrong makes ``load_objective`` raise instead.
    """
    student_dir = Path(student_dir)
    if not (student_dir / PROVENANCE_FILE).is_file():
        return f"{student_dir} has no {PROVENANCE_FILE} (objective settings unknown)"
    heads_file = student_dir / DISTILL_HEADS_FILE
    if not heads_file.is_file():
        return f"{student_dir} has no {DISTILL_HEADS_FILE} (trained heads not exported)"
    with safe_open(str(heads_file), framework="pt") as f:
        if not any(key.startswith(OBJECTIVE_PREFIX) for key in f.keys()):
            return f"{heads_file} holds no '{OBJECTIVE_PREFIX}*' tensors (heads not exported)"
    return None


def load_objective(student_dir: str | Path) -> DistillObjective | None:
    """Rebuild the distillation objective (heads, target normaliser) of an exported student.

    Settings and sizes come from colld.json (``objective``, ``student_dim``, ``teacher_dim``,
    ``num_student_layers``, ``num_teacher_layers``; checked like a config file), the trained
    state from ``distill_heads.safetensors`` (keys ``objective.*``, loaded strictly). Returns
    the objective in eval mode without gradients, or None (reason logged, and given by
    ``objective_unavailable_reason``) when those artefacts are absent.
    Raises ValueError for a colld.json or heads file that does not fit.
    """
    student_dir = Path(student_dir)
    reason = objective_unavailable_reason(student_dir)
    if reason is not None:
        logger.info("no distillation objective: %s", reason)
        return None
    provenance = read_provenance(student_dir) or {}
    where = student_dir / PROVENANCE_FILE
    missing = [key for key in _PROVENANCE_KEYS if key not in provenance]
    if missing:
        raise ValueError(f"{where} lacks {missing}; expected {list(_PROVENANCE_KEYS)}")
    config = from_dict(ObjectiveConfig, provenance["objective"], "objective")
    objective = DistillObjective(
        config,
        student_dim=int(provenance["student_dim"]),
        teacher_dim=int(provenance["teacher_dim"]),
        num_student_layers=int(provenance["num_student_layers"]),
        num_teacher_layers=int(provenance["num_teacher_layers"]),
    )
    recorded = provenance.get("pairs")
    if recorded is not None and [tuple(p) for p in recorded] != objective.pairs:
        raise ValueError(
            f"{where}: recorded pairs {recorded} differ from the ones its objective settings "
            f"resolve to {[list(p) for p in objective.pairs]}"
        )
    _load_objective_state(objective, student_dir / DISTILL_HEADS_FILE)
    objective.eval().requires_grad_(False)
    return objective


def _load_objective_state(objective: DistillObjective, heads_file: Path) -> None:
    state = {
        key[len(OBJECTIVE_PREFIX) :]: tensor
        for key, tensor in load_file(str(heads_file)).items()
        if key.startswith(OBJECTIVE_PREFIX)
    }
    try:
        objective.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise ValueError(
            f"{heads_file} does not fit the objective of its colld.json: {err}"
        ) from err


# ---------------------------------------------------------------- per-pair cosines
class PairCosines(dict[str, float]):
    """Pair name ("s3->t5") -> mean cosine; empty with ``skipped_reason`` set when the pairs
    cannot be measured on the given features."""

    def __init__(
        self, values: Mapping[str, float] | None = None, *, skipped_reason: str | None = None
    ) -> None:
        super().__init__(values or {})
        self.skipped_reason = skipped_reason


def pair_cosines_skip_reason(objective: DistillObjective) -> str | None:
    """Why ``pair_cosines`` cannot measure ``objective`` on hidden-state features, or None."""
    if objective.config.target == "ffn":
        return (
            "the objective's targets are the teacher's FFN outputs (target 'ffn'); evaluation "
            "features hold hidden states only"
        )
    return None


def pair_cosines(
    objective: DistillObjective, student: FeatureSet, teacher: FeatureSet
) -> PairCosines:
    """Mean cosine per distilled pair between the student's projection and the teacher target.

    For each pair (i, j) of ``objective.pairs``: the student's hidden state i through its head,
    against the teacher's hidden state j after the objective's target normaliser (the same
    normalisation as in training, statistics frozen), cosine per frame, averaged over every
    valid frame of every utterance (each frame weighs the same, as the training metric).
    Both sets: unmasked forward passes over the same utterances (``aligned_lengths`` rules);
    ``teacher`` must come from the teacher the student was distilled from.
    Returns an empty ``PairCosines`` with ``skipped_reason`` for FFN targets.
    """
    reason = pair_cosines_skip_reason(objective)
    if reason is not None:
        return PairCosines(skipped_reason=reason)
    lengths = aligned_lengths(student, teacher)
    _check_sizes(objective, student, teacher)
    sums = torch.zeros(len(objective.pairs), dtype=torch.float64)
    was_training = objective.training
    objective.eval()
    try:
        with torch.no_grad():
            for s, t, length in zip(student.states, teacher.states, lengths, strict=True):
                sums += _utterance_cosine_sums(objective, s[:, :length], t[:, :length])
    finally:
        objective.train(was_training)
    means = (sums / sum(lengths)).tolist()
    return PairCosines(dict(zip(objective.pair_names, means, strict=True)))


def _utterance_cosine_sums(objective: DistillObjective, student: Tensor, teacher: Tensor) -> Tensor:
    """Sum over frames of cos(head(student_i), norm(teacher_j)) per pair.

    Shape: (Ls + 1, T, D_s), (Lt + 1, T, D_t) -> (P,), float64.
    """
    valid = torch.ones(1, teacher.shape[1], dtype=torch.bool)  # (1, T)
    targets = {
        j: objective.normalizer(teacher[j][None].float(), valid, j)  # (1, T, D_t)
        for j in objective.teacher_layers
    }
    predictions = objective.heads({i: student[i][None].float() for i in objective.student_layers})
    cosines = [
        F.cosine_similarity(z, targets[j], dim=-1, eps=COS_EPS).sum()
        for z, (_, j) in zip(predictions, objective.pairs, strict=True)
    ]
    return torch.stack(cosines).to(torch.float64)


def _check_sizes(objective: DistillObjective, student: FeatureSet, teacher: FeatureSet) -> None:
    linears = [m for m in objective.heads.heads[0].modules() if isinstance(m, nn.Linear)]
    student_dim, teacher_dim = linears[0].in_features, linears[-1].out_features
    deepest_student = max(objective.student_layers)
    deepest_teacher = max(objective.teacher_layers)
    for features, dim, deepest, role in (
        (student, student_dim, deepest_student, "student"),
        (teacher, teacher_dim, deepest_teacher, "teacher"),
    ):
        if features.dim != dim or features.num_layers <= deepest:
            raise ValueError(
                f"{role} features of {features.model} have {features.num_layers} states of width "
                f"{features.dim}; the objective needs states 0..{deepest} of width {dim}"
            )


# ---------------------------------------------------------------- position signal


def position_retrieval(
    features: FeatureSet, *, max_pairs: int = 100, min_frames: int = 20
) -> list[float]:
    """How much each hidden state is dominated by absolute position, one value per state.

    Utterances are paired in order ((0, 1), (2, 3), ...); for frame t of the first, the frame of
    the second with the highest cosine (states layer-normed per frame, as the probes see them)
    is looked up over the common length T, and the share of frames where that is frame t is
    reported. Two different utterances share nothing but positions, so a value near 1 means
    a state encodes where a frame is rather than what is said (chance is about 1 / T). A student
    distilled with same-utterance distractors from a teacher with absolute positions can learn
    exactly this shortcut (docs/results/demo.md). Pairs shorter than ``min_frames`` are skipped.

    Shape: states (L + 1, T_n, D) per utterance -> L + 1 floats.
    """
    hits = torch.zeros(features.num_layers, dtype=torch.float64)
    counted = 0
    for a in range(0, min(len(features.states) - 1, 2 * max_pairs), 2):
        first, second = features.states[a].float(), features.states[a + 1].float()
        frames = min(first.shape[1], second.shape[1])
        if frames < min_frames:
            continue
        x = F.normalize(F.layer_norm(first[:, :frames], (first.shape[-1],)), dim=-1)
        y = F.normalize(F.layer_norm(second[:, :frames], (second.shape[-1],)), dim=-1)
        best = torch.bmm(x, y.transpose(1, 2)).argmax(dim=-1)  # (L + 1, T)
        hits += (best == torch.arange(frames)).sum(dim=1).double()
        counted += frames
    if counted == 0:
        return [float("nan")] * features.num_layers
    return (hits / counted).tolist()
