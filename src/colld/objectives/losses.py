"""Per-pair distillation losses: contrastive (CoLLD, METHOD.md step 4), L1-cosine, MSE.

Every loss takes
    z: the student's projected prediction (after its head). Shape: (B, T, D_t).
    y: the (normalised) teacher target. Shape: (B, T, D_t).
    select: which frames count (masked / unmasked / all, resolved by the caller); it is
        intersected with the valid frames here, so padding never counts. Shape: (B, T) bool.
    lengths: valid frames per utterance. Shape: (B,).
and returns a ``PairLoss``: the mean over the selected frames of the whole batch (every frame
weighs the same, whatever its utterance) and detached health metrics. All arithmetic is in
float32, also under autocast, except the contrastive loss' cosine matrix: its matmul (nearly all
of the loss' FLOPs) runs in autocast's dtype when autocast is on (``_autocast_matmul_dtype``),
its inputs unit vectors and its output cast back to float32 before the softmax. When no frame is
selected the loss is 0 (still attached to the graph, so a backward pass works) and the metrics
are NaN ("no data"), never a made-up number.

Shape legend: B batch, T frames, R selected rows per utterance (packed), D_t teacher width,
K distractors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from colld.objectives.masking import valid_frames

COS_EPS = 1e-8
_FINGERPRINT_HASHES = 2


@dataclass
class PairLoss:
    """The loss of one (student layer, teacher layer) pair.

    loss: differentiable scalar (mean over counted frames).
    accuracy: contrastive only (None otherwise): share of counted frames whose positive scores
        strictly higher than every kept distractor. Detached scalar.
    cosine: mean cos(z_t, y_t) over the selected frames. Detached scalar.
    """

    loss: Tensor
    accuracy: Tensor | None
    cosine: Tensor


def _check_inputs(z: Tensor, y: Tensor, select: Tensor, lengths: Tensor) -> None:
    if z.dim() != 3 or z.shape != y.shape:
        raise ValueError(
            f"prediction z and target y must both be (B, T, D_t); got {tuple(z.shape)} and "
            f"{tuple(y.shape)}"
        )
    if select.shape != z.shape[:2]:
        raise ValueError(f"select must be (B, T) = {tuple(z.shape[:2])}, got {tuple(select.shape)}")
    if lengths.shape != z.shape[:1]:
        raise ValueError(f"lengths must be (B,) = ({z.shape[0]},), got {tuple(lengths.shape)}")


def _mean_over(values: Tensor, weight: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``weight`` (over all, or along ``dim``); 0 (graph-attached) when
    nothing is selected."""
    dims = tuple(range(values.dim())) if dim is None else (dim,)
    total = values.masked_fill(~weight, 0.0).sum(dim=dims)
    return total / weight.sum(dim=dims).clamp(min=1)


@torch.no_grad()
def _metric_over(values: Tensor, weight: Tensor, dim: int | None = None) -> Tensor:
    """Detached mean of ``values`` where ``weight`` (over all, or along ``dim``); NaN when
    nothing is selected."""
    dims = tuple(range(values.dim())) if dim is None else (dim,)
    return values.detach().masked_fill(~weight, 0.0).sum(dim=dims) / weight.sum(dim=dims)


def _draw_distractors(
    lengths: Tensor, positions: Tensor, num_negatives: int, generator: torch.Generator | None
) -> Tensor:
    """K distractor indices for the frames at ``positions`` (see ``sample_distractors``).

    Shape: lengths (B,), positions (B, R) -> (B, R, K) int64.
    """
    draws = torch.rand(
        (*positions.shape, num_negatives), generator=generator, device=positions.device
    )
    num_others = (lengths.long() - 1).clamp(min=0)[:, None, None]  # (B, 1, 1)
    # floor(u * n) is in [0, n - 1] except when float rounding lands on n: clamp that away.
    index = torch.minimum((draws * num_others).long(), (num_others - 1).clamp(min=0))
    positions = positions[:, :, None]  # (B, R, 1)
    index = index + (index >= positions).long()  # skip the positive's own index
    drawable = (positions < lengths[:, None, None]) & (num_others >= 1)
    return torch.where(drawable, index, positions)


def sample_distractors(
    lengths: Tensor, num_frames: int, *, num_negatives: int, generator: torch.Generator | None
) -> Tensor:
    """Draw K distractor frame indices per frame, wav2vec 2.0 style.

    For a valid frame t of an utterance with L >= 2 valid frames, each of the K indices is drawn
    uniformly, with replacement, from the L - 1 *other* valid frames (never t itself, never
    padding): draw r in [0, L - 2], then skip t by adding 1 when r >= t (as HF's
    ``_sample_negative_indices``). So fewer than K other frames still gives K draws (repeats).
    Rows with nothing to draw from (padding frames, utterances with L < 2) hold t itself, a
    sentinel the caller must drop (``contrastive_loss`` does). ``generator`` must live on
    ``lengths.device``. ``contrastive_loss`` draws the same way, for its selected frames only.

    Shape: (B,) -> (B, T, K) int64.
    """
    positions = torch.arange(num_frames, device=lengths.device).expand(lengths.shape[0], -1)
    return _draw_distractors(lengths, positions, num_negatives, generator)


@functools.cache
def _fingerprint_weights(dim: int, device: torch.device) -> Tensor:
    """Fixed odd integer multipliers for ``frame_fingerprints`` (cached per width and device).

    Shape: (2, D, H) float64 holding integers: [0] weighs the high, [1] the low 16 bits.
    Multipliers stay below 2^(36 - ceil(log2 D)) so that every partial sum is an integer below
    2^53, which float64 represents exactly.
    """
    weight_bits = 36 - max(1, math.ceil(math.log2(dim)))
    if weight_bits < 16:
        raise ValueError(f"frame_fingerprints supports D_t up to 2^20, got {dim}")
    fixed = torch.Generator().manual_seed(20230914)  # fixed: not the caller's random stream
    weights = torch.randint(
        0, 2 ** (weight_bits - 1), (2, dim, _FINGERPRINT_HASHES), generator=fixed
    )
    return (weights * 2 + 1).double().to(device)


@torch.no_grad()
def frame_fingerprints(y: Tensor) -> Tensor:
    """Exact per-frame fingerprints: equal vectors always get equal fingerprints.

    Each of H hashes is sum_d (hi16(y_d) * u_d + lo16(y_d) * v_d) over the halves of the float32
    bit patterns, with fixed random odd integers u, v. Every product and partial sum is an integer
    below 2^53, so the float64 matrix product computing it is exact whatever its summation order:
    equal vectors cannot differ. Two different vectors share all H = 2 hashes with probability
    below 2^-(2 * 25) at D_t = 1024 (a matmul runs at BLAS speed; an int64 multiply-and-sum was
    2x slower here). -0.0 and +0.0 count as equal.

    Shape: (B, T, D) -> (B, T, H) float64 (integer-valued). Memory: two transient (B, T, D)
    float64 tensors.
    """
    bits = (y.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    weights = _fingerprint_weights(y.shape[-1], y.device)
    high = (bits >> 16).double()  # in [-2^15, 2^15)
    low = (bits & 0xFFFF).double()  # in [0, 2^16)
    return high @ weights[0] + low @ weights[1]


def contrastive_loss(
    z: Tensor,
    y: Tensor,
    select: Tensor,
    lengths: Tensor,
    *,
    tau: float,
    num_negatives: int,
    generator: torch.Generator | None,
    distractors: Tensor | None = None,
) -> PairLoss:
    """InfoNCE over one positive and K in-utterance distractors (METHOD.md step 4).

    L_t = -log( exp(cos(z_t, y_t)/tau) / sum_{t' in {t} U N_t} exp(cos(z_t, y_t')/tau) ),
    N_t drawn as ``sample_distractors`` describes (or ``distractors``, Shape: (B, T, K), if
    given: used as is, e.g. to test). A distractor whose target is identical to the positive's
    (equal ``frame_fingerprints``) is dropped (logit -inf). An utterance with a single valid
    frame has no distractor and contributes no contrastive term: its frames are left out of
    ``loss`` and ``accuracy`` (but not of ``cosine``).

    Computation (no (N, K, D_t) copy of the targets): the selected frames of each utterance are
    packed to the front (R = most selected frames in one utterance), their normalised
    predictions multiply all normalised targets, (B, R, D_t) x (B, D_t, T) -> (B, R, T) cosines,
    and the positive and K distractor columns are gathered from that. Memory at B=8, T=750,
    D_t=512, K=100, all frames selected: cosines 18 MB fp32 (and as much for their gradient in
    backward), normalised z and y 12 MB each (kept for backward), logits 2.4 MB, fingerprints
    2 x 25 MB transient float64; a (N, K, D_t) copy would be 1.2 GB. With span masking at 0.65
    only ~half the rows are selected, halving the matmul.

    Shape: z, y (B, T, D_t); select (B, T); lengths (B,) -> scalars.
    """
    return contrastive_losses(
        [z],
        [y],
        select,
        lengths,
        tau=tau,
        num_negatives=num_negatives,
        generator=generator,
        distractors=None if distractors is None else [distractors],
    )[0]


def contrastive_losses(
    zs: Sequence[Tensor],
    ys: Sequence[Tensor],
    select: Tensor,
    lengths: Tensor,
    *,
    tau: float,
    num_negatives: int,
    generator: torch.Generator | None,
    distractors: Sequence[Tensor] | None = None,
    stack: bool | None = None,
    batch_negatives: bool = False,
) -> list[PairLoss]:
    """``contrastive_loss`` for P pairs that share frames and lengths.

    batch_negatives: besides the K distractors of the same utterance, contrast each selected
        frame t of utterance b with frame t of every other utterance of the batch that is
        longer than t (ObjectiveConfig.batch_negatives). Those share the positive's absolute
        position, so an encoder with absolute positions (Whisper) cannot pick the positive by
        position alone. Costs one (B x D) x (D x B) product per frame index.

    stack: True stacks the P pairs along the batch axis, so every kernel runs once instead of P
        times and the host synchronises once: on a GPU the loss is launch-bound at training
        batch sizes (H200, B=8, T=750, 6 pairs: 21 -> 7 ms forward + backward); memory is then P
        times that of one ``contrastive_loss``. False computes the pairs one after another: on a
        CPU the stacked copies and P-fold buffers cost more than they save (2 threads, same
        setting: 580 -> 725 ms). None (default) stacks on any device but the CPU.
    Each pair draws its own distractors; results do not depend on ``stack`` given the draws.

    Shape: zs[p], ys[p] (B, T, D_t); select (B, T); lengths (B,); distractors[p] (B, T, K)
    -> P results.
    """
    if len(zs) != len(ys) or not zs:
        raise ValueError(f"need as many predictions as targets (>= 1), got {len(zs)} and {len(ys)}")
    if stack is None:
        stack = zs[0].device.type != "cpu"
    if not stack and len(zs) > 1:
        return [
            contrastive_losses(
                [z],
                [y],
                select,
                lengths,
                tau=tau,
                num_negatives=num_negatives,
                generator=generator,
                distractors=None if distractors is None else [distractors[p]],
                batch_negatives=batch_negatives,
            )[0]
            for p, (z, y) in enumerate(zip(zs, ys, strict=True))
        ]
    for z, y in zip(zs, ys, strict=True):
        _check_inputs(z, y, select, lengths)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    num_pairs = len(zs)
    batch_size, num_frames, dim = ys[0].shape
    matmul_dtype = _autocast_matmul_dtype(zs[0].device.type)
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        valid = valid_frames(lengths, num_frames)
        select = select & valid
        num_rows = int(select.sum(dim=1).max()) if batch_size else 0
        if num_rows == 0:
            nan = torch.full((), float("nan"), device=zs[0].device)
            return [PairLoss(loss=z.sum() * 0.0, accuracy=nan, cosine=nan) for z in zs]
        # Pack each utterance's selected frames to the front (stable: time order kept).
        order = torch.argsort((~select).to(torch.uint8), dim=1, stable=True)[:, :num_rows]
        row_selected = select.gather(1, order)  # (B, R)
        row_counted = row_selected & (lengths >= 2)[:, None]  # (B, R)
        # Stack the pairs along the batch axis: B' = P * B.
        z = torch.cat([z.float() for z in zs]) if num_pairs > 1 else zs[0].float()
        y = torch.cat([y.float() for y in ys]) if num_pairs > 1 else ys[0].float()
        order = order.repeat(num_pairs, 1)  # (B', R)
        stacked_lengths = lengths.repeat(num_pairs)  # (B',)
        # Zero the padding so that whatever an encoder leaves there (even NaN) reaches neither
        # the loss nor, through the matmul's backward, any gradient.
        y = y.masked_fill(~valid.repeat(num_pairs, 1)[:, :, None], 0.0)
        if distractors is None:
            row_distractors = _draw_distractors(stacked_lengths, order, num_negatives, generator)
        else:
            given = torch.cat(list(distractors)) if num_pairs > 1 else distractors[0]
            if given.dim() != 3 or given.shape[:2] != (num_pairs * batch_size, num_frames):
                raise ValueError(
                    f"distractors must be P = {num_pairs} tensors of (B, T, K) with (B, T) = "
                    f"{(batch_size, num_frames)}, got {[tuple(d.shape) for d in distractors]}"
                )
            row_distractors = given.gather(1, order[:, :, None].expand(-1, -1, given.shape[-1]))
        z_rows = z.gather(1, order[:, :, None].expand(-1, -1, dim))  # (B', R, D_t)
        rows_kept = row_selected.repeat(num_pairs, 1)[:, :, None]
        z_rows = z_rows.masked_fill(~rows_kept, 0.0)  # rows past the selection
        z_unit = F.normalize(z_rows, dim=-1, eps=COS_EPS)
        y_unit = F.normalize(y, dim=-1, eps=COS_EPS)
        cosines = torch.bmm(  # (B', R, T) float32
            z_unit.to(matmul_dtype), y_unit.to(matmul_dtype).transpose(1, 2)
        ).float()
        columns = torch.cat([order[:, :, None], row_distractors], dim=-1)  # (B', R, 1 + K)
        logits = cosines.gather(2, columns) / tau  # (B', R, 1 + K)
        prints = frame_fingerprints(y)  # (B', T, H)
        flat_columns = columns.reshape(columns.shape[0], -1)
        identical = torch.ones_like(row_distractors, dtype=torch.bool)
        for h in range(prints.shape[-1]):
            column_prints = prints[..., h].gather(1, flat_columns).view_as(columns)
            identical &= column_prints[..., 1:] == column_prints[..., :1]
        dropped = F.pad(identical, (1, 0), value=False)  # the positive is never dropped
        logits = logits.masked_fill(dropped, float("-inf"))
        if batch_negatives:
            z_all = F.normalize(z, dim=-1, eps=COS_EPS)
            cross = _same_index_cosines(z_all, y_unit, order, stacked_lengths, num_pairs)
            logits = torch.cat([logits, cross / tau], dim=-1)  # (B', R, 1 + K + B)
        log_prob_positive = F.log_softmax(logits, dim=-1)[..., 0]  # (B', R)
        # Per-pair frame means: (B', R) -> (P, B * R).
        counted = row_counted.reshape(1, -1).expand(num_pairs, -1)
        selected = row_selected.reshape(1, -1).expand(num_pairs, -1)
        losses = _mean_over(-log_prob_positive.view(num_pairs, -1), counted, dim=1)
        with torch.no_grad():
            best_distractor = logits[..., 1:].max(dim=-1).values
            correct = (logits[..., 0] > best_distractor).float().view(num_pairs, -1)
            accuracy = _metric_over(correct, counted, dim=1)
            cosine = _metric_over((logits[..., 0] * tau).view(num_pairs, -1), selected, dim=1)
    return [
        PairLoss(loss=losses[p], accuracy=accuracy[p], cosine=cosine[p]) for p in range(num_pairs)
    ]


def _autocast_matmul_dtype(device_type: str) -> torch.dtype:
    """The dtype of the contrastive loss' cosine matmul: autocast's (bf16 / fp16) when autocast
    is on for ``device_type``, else float32. Rounding unit vectors to bf16 moves a cosine by
    ~1e-3 at most (8 mantissa bits; the matmul accumulates in float32), a logit by ~1e-2 at
    tau 0.1, against a student prediction already computed in bf16 and cached targets stored
    in fp16. Measured on a native-bf16 CPU (docs/benchmarks.md): the objective's forward +
    backward 1.62x faster at T=750 than with a float32 matmul (395 vs 642 ms, B=8, 6 pairs,
    ``bench/bench_loss.py --bf16``), the bf16 first-step loss 4.6864 vs 4.6862 in fp32
    (``bench/bench_step.py``), the demo student's probe score 778 vs 779."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _same_index_cosines(
    z_unit: Tensor, y_unit: Tensor, order: Tensor, lengths: Tensor, num_pairs: int
) -> Tensor:
    """cos(z[b, t], y[c, t]) for each packed row (b, t = order[b, r]) and every utterance c of
    the same pair block; -inf where c == b or frame t lies past c's end.

    Shape: z_unit, y_unit (B', T, D) unit rows, B' = P * B; order (B', R); lengths (B',)
    -> (B', R, B).
    """
    stacked, num_frames, dim = y_unit.shape
    batch = stacked // num_pairs
    z_t = z_unit.view(num_pairs, batch, num_frames, dim).transpose(1, 2)  # (P, T, B, D)
    y_t = y_unit.view(num_pairs, batch, num_frames, dim).transpose(1, 2)  # (P, T, C, D)
    by_index = torch.matmul(z_t, y_t.transpose(-1, -2))  # (P, T, B, C)
    by_index = by_index.permute(0, 2, 1, 3).reshape(stacked, num_frames, batch)  # (B', T, C)
    rows = by_index.gather(1, order[:, :, None].expand(-1, -1, batch))  # (B', R, C)
    own = torch.arange(stacked, device=order.device) % batch  # (B',) b within its block
    same = own[:, None, None] == torch.arange(batch, device=order.device)[None, None, :]
    past_end = (
        order[:, :, None]
        >= lengths.view(num_pairs, batch)[torch.arange(stacked, device=order.device) // batch][
            :, None, :
        ]
    )  # (B', R, C)
    return rows.masked_fill(same | past_end, float("-inf"))


def _selected_only(
    z: Tensor, y: Tensor, select: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """float32 z and y zeroed outside the selected valid frames (so padding, even NaN, cannot
    reach a gradient), and the selection intersected with the valid frames."""
    select = select & valid_frames(lengths, z.shape[1])
    keep = select[:, :, None]
    return z.float().masked_fill(~keep, 0.0), y.float().masked_fill(~keep, 0.0), select


def _frame_cosine(z: Tensor, y: Tensor) -> Tensor:
    """cos(z_t, y_t) per frame. Shape: (B, T, D) x 2 -> (B, T).

    Written out rather than ``F.cosine_similarity``, which was ~1.5x slower forward + backward
    here (fp32, 2 threads); same eps convention as its current version (product of norms).
    """
    norms = torch.linalg.vector_norm(z, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return (z * y).sum(dim=-1) / norms.clamp_min(COS_EPS)


def l1cos_loss(
    z: Tensor, y: Tensor, select: Tensor, lengths: Tensor, *, lam: float = 1.0
) -> PairLoss:
    """DistilHuBERT's loss: per frame, mean_d |z - y| - lam * log sigmoid(cos(z, y)).

    Shape: z, y (B, T, D_t); select (B, T); lengths (B,) -> scalars.
    """
    _check_inputs(z, y, select, lengths)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, y, select = _selected_only(z, y, select, lengths)
        cosine = _frame_cosine(z, y)
        per_frame = (z - y).abs().mean(dim=-1) - lam * F.logsigmoid(cosine)
        return PairLoss(
            loss=_mean_over(per_frame, select),
            accuracy=None,
            cosine=_metric_over(cosine, select),
        )


def mse_loss(z: Tensor, y: Tensor, select: Tensor, lengths: Tensor) -> PairLoss:
    """Per frame mean_d (z - y)^2, averaged over the selected frames.

    Shape: z, y (B, T, D_t); select (B, T); lengths (B,) -> scalars.
    """
    _check_inputs(z, y, select, lengths)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, y, select = _selected_only(z, y, select, lengths)
        per_frame = (z - y).pow(2).mean(dim=-1)
        return PairLoss(
            loss=_mean_over(per_frame, select),
            accuracy=None,
            cosine=_metric_over(_frame_cosine(z.detach(), y), select),
        )
