"""Per-pair losses against hand-computed values and an explicit-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from colld.objectives.losses import (
    contrastive_loss,
    contrastive_losses,
    frame_fingerprints,
    l1cos_loss,
    mse_loss,
    sample_distractors,
)
from colld.objectives.masking import valid_frames


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_contrastive(z, y, select, lengths, distractors, tau):
    """wav2vec 2.0's InfoNCE written as a plain loop over frames (float64)."""
    z, y = z.double(), y.double()

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    losses, correct, cosines = [], [], []
    for b, length in enumerate(lengths.tolist()):
        for t in range(length):
            if not select[b, t]:
                continue
            positive = cos(z[b, t], y[b, t]) / tau
            cosines.append(positive * tau)
            if length < 2:
                continue  # no distractor: no contrastive term
            negatives = [
                cos(z[b, t], y[b, k]) / tau
                for k in distractors[b, t].tolist()
                if not torch.equal(y[b, k], y[b, t])
            ]
            logits = torch.tensor([positive] + negatives, dtype=torch.float64)
            losses.append(-(logits[0] - torch.logsumexp(logits, 0)).item())
            correct.append(not negatives or positive > max(negatives))
    return (
        sum(losses) / len(losses),
        sum(correct) / len(correct),
        sum(cosines) / len(cosines),
    )


def test_hand_computed_orthogonal_targets() -> None:
    y = torch.eye(3)[None]  # (1, 3, 3): three orthogonal targets
    z = y.clone()
    lengths = torch.tensor([3])
    select = torch.ones(1, 3, dtype=torch.bool)
    distractors = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    result = contrastive_loss(
        z, y, select, lengths, tau=0.1, num_negatives=2, generator=None, distractors=distractors
    )
    # Positive logit 1 / 0.1 = 10, both distractors 0: -log(e^10 / (e^10 + 2)).
    assert result.loss.item() == pytest.approx(math.log1p(2 * math.exp(-10)), abs=1e-6)  # fp32
    assert result.accuracy.item() == 1.0
    assert result.cosine.item() == pytest.approx(1.0)


def test_matches_explicit_loop_with_the_same_draws() -> None:
    generator = _gen(0)
    lengths = torch.tensor([9, 6, 2, 1])
    z = torch.randn(4, 9, 5, generator=generator)
    y = torch.randn(4, 9, 5, generator=generator)
    y[0, 5] = y[0, 3]  # identical targets: each is dropped as the other's distractor
    y[1, 0] = y[1, 1] = y[1, 2]
    select = torch.rand(4, 9, generator=generator) < 0.6
    select[2:, 0] = True
    distractors = sample_distractors(lengths, 9, num_negatives=4, generator=_gen(7))
    result = contrastive_loss(
        z, y, select, lengths, tau=0.5, num_negatives=4, generator=None, distractors=distractors
    )
    loss, accuracy, cosine = _reference_contrastive(
        z, y, select & valid_frames(lengths, 9), lengths, distractors, tau=0.5
    )
    assert result.loss.item() == pytest.approx(loss, rel=1e-5)
    assert result.accuracy.item() == pytest.approx(accuracy)
    assert result.cosine.item() == pytest.approx(cosine, rel=1e-5)
    # Own draws: deterministic under a generator, different under another.
    first = contrastive_loss(z, y, select, lengths, tau=0.5, num_negatives=4, generator=_gen(1))
    again = contrastive_loss(z, y, select, lengths, tau=0.5, num_negatives=4, generator=_gen(1))
    other = contrastive_loss(z, y, select, lengths, tau=0.5, num_negatives=4, generator=_gen(2))
    assert torch.equal(first.loss, again.loss) and not torch.equal(first.loss, other.loss)


def test_batched_pairs_equal_separate_calls() -> None:
    lengths = torch.tensor([12, 7, 1])
    select = torch.rand(3, 12, generator=_gen(40)) < 0.5
    zs = [torch.randn(3, 12, 6, generator=_gen(41 + p)) for p in range(3)]
    ys = [torch.randn(3, 12, 6, generator=_gen(51 + p)) for p in range(3)]
    draws = [
        sample_distractors(lengths, 12, num_negatives=5, generator=_gen(61 + p)) for p in range(3)
    ]
    kwargs = dict(tau=0.2, num_negatives=5, generator=None)
    stacked = contrastive_losses(zs, ys, select, lengths, distractors=draws, stack=True, **kwargs)
    looped = contrastive_losses(zs, ys, select, lengths, distractors=draws, stack=False, **kwargs)
    for z, y, d, one, other in zip(zs, ys, draws, stacked, looped, strict=True):
        single = contrastive_loss(z, y, select, lengths, distractors=d, **kwargs)
        for result in (one, other):
            assert torch.allclose(result.loss, single.loss)
            assert torch.equal(result.accuracy, single.accuracy)
            assert torch.allclose(result.cosine, single.cosine)


def test_sampled_distractors_exhaustively_valid_and_uniform() -> None:
    lengths = torch.tensor([0, 1, 2, 3, 7, 20])
    num_frames = 22
    generator = _gen(1)
    counts = torch.zeros(num_frames)
    for _ in range(50):
        index = sample_distractors(lengths, num_frames, num_negatives=64, generator=generator)
        assert index.shape == (6, num_frames, 64) and index.dtype == torch.int64
        positions = torch.arange(num_frames)[None, :, None]
        drawable = (positions < lengths[:, None, None]) & (lengths >= 2)[:, None, None]
        in_range = index < lengths[:, None, None]
        assert ((index != positions) & in_range)[drawable.expand_as(index)].all()
        assert (index == positions)[~drawable.expand_as(index)].all()  # sentinel rows
        counts += torch.bincount(index[5, 4], minlength=num_frames)
    assert (index[2, 0] == 1).all() and (index[2, 1] == 0).all()  # L = 2: the other frame
    # Frame 4 of the 20-frame utterance: 19 others, each drawn ~ 50 * 64 / 19 = 168 times.
    assert counts[4] == 0 and counts[20:].sum() == 0
    others = torch.cat([counts[:4], counts[5:20]])
    assert others.min() > 110 and others.max() < 230


def test_loss_near_minimum_when_predictions_equal_well_separated_targets() -> None:
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=_gen(2)))
    y = basis[None]  # 64 orthonormal targets
    z = 3.0 * y  # cosine ignores scale
    lengths = torch.tensor([64])
    select = torch.ones(1, 64, dtype=torch.bool)
    result = contrastive_loss(z, y, select, lengths, tau=0.1, num_negatives=100, generator=_gen(3))
    # 100 distractors (with replacement from 63 frames), all at cosine 0.
    assert result.loss.item() == pytest.approx(math.log1p(100 * math.exp(-10)), rel=1e-3)
    assert result.accuracy.item() == 1.0
    shuffled = contrastive_loss(
        z.flip(1), y, select, lengths, tau=0.1, num_negatives=100, generator=_gen(3)
    )
    assert shuffled.loss.item() > 5 and shuffled.accuracy.item() == 0.0


def test_distractors_identical_to_the_positive_are_dropped() -> None:
    y = torch.ones(1, 6, 4)  # every frame has the same target
    z = torch.randn(1, 6, 4, generator=_gen(4))
    select = torch.ones(1, 6, dtype=torch.bool)
    result = contrastive_loss(
        z, y, select, torch.tensor([6]), tau=0.1, num_negatives=10, generator=_gen(5)
    )
    assert result.loss.item() == 0.0  # only the positive is left in the sum
    assert result.accuracy.item() == 1.0
    # Fingerprints are exact: equal vectors agree, a one-ulp change does not; -0.0 == +0.0.
    one_ulp_up = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    frames = torch.tensor([[[1.0, -0.0], [1.0, 0.0], [one_ulp_up, 0.0]]])
    prints = frame_fingerprints(frames)
    assert torch.equal(prints[0, 0], prints[0, 1])
    assert not torch.equal(prints[0, 0], prints[0, 2])


def test_fingerprints_equal_for_far_apart_duplicates_and_distinct_otherwise() -> None:
    y = torch.randn(3, 700, 1024, generator=_gen(30))
    y[2, 650] = y[0, 3]  # duplicates far apart: different matmul tiles must still agree
    y[1, 0] = y[0, 3]
    prints = frame_fingerprints(y)
    assert torch.equal(prints[0, 3], prints[2, 650]) and torch.equal(prints[0, 3], prints[1, 0])
    assert len(torch.unique(prints.view(-1, prints.shape[-1]), dim=0)) == 3 * 700 - 2
    basis = frame_fingerprints(torch.eye(512)[None])  # one-hot targets are all distinct
    assert len(torch.unique(basis[0], dim=0)) == 512


def test_padding_and_unselected_frames_never_reach_loss_or_gradient() -> None:
    lengths = torch.tensor([10, 6])
    valid = valid_frames(lengths, 10)
    z = torch.randn(2, 10, 8, generator=_gen(6))
    y = torch.randn(2, 10, 8, generator=_gen(7))
    select = torch.rand(2, 10, generator=_gen(8)) < 0.5
    select[:, 0] = True
    clean = contrastive_loss(z, y, select, lengths, tau=0.1, num_negatives=20, generator=_gen(9))
    z_nan = z.masked_fill(~valid[..., None], float("nan")).requires_grad_()
    y_nan = y.masked_fill(~valid[..., None], float("nan"))
    dirty = contrastive_loss(
        z_nan, y_nan, select | ~valid, lengths, tau=0.1, num_negatives=20, generator=_gen(9)
    )
    assert torch.allclose(dirty.loss, clean.loss)
    dirty.loss.backward()
    grad = z_nan.grad
    assert torch.isfinite(grad).all()
    assert (grad[~(select & valid)] == 0).all()
    assert (grad[select & valid].abs().sum(-1) > 0).all()


def test_single_frame_utterance_contributes_no_contrastive_term() -> None:
    z = torch.randn(2, 5, 4, generator=_gen(10))
    y = torch.randn(2, 5, 4, generator=_gen(11))
    select = torch.ones(2, 5, dtype=torch.bool)
    lengths = torch.tensor([1, 5])
    distractors = sample_distractors(lengths, 5, num_negatives=8, generator=_gen(12))
    both = contrastive_loss(
        z, y, select, lengths, tau=0.2, num_negatives=8, generator=None, distractors=distractors
    )
    alone = contrastive_loss(
        z[1:], y[1:], select[1:], lengths[1:], tau=0.2, num_negatives=8, generator=None,
        distractors=distractors[1:],
    )  # fmt: skip
    assert torch.allclose(both.loss, alone.loss)
    assert torch.allclose(both.accuracy, alone.accuracy)
    cos_single = torch.cosine_similarity(z[0, 0], y[0, 0], dim=0)
    assert torch.allclose(both.cosine, (alone.cosine * 5 + cos_single) / 6)


def test_empty_selection_gives_zero_loss_and_nan_metrics() -> None:
    z = torch.randn(2, 4, 3, requires_grad=True)
    y = torch.randn(2, 4, 3)
    select = torch.zeros(2, 4, dtype=torch.bool)
    lengths = torch.tensor([4, 3])
    for result in (
        contrastive_loss(z, y, select, lengths, tau=0.1, num_negatives=3, generator=None),
        l1cos_loss(z, y, select, lengths),
        mse_loss(z, y, select, lengths),
    ):
        assert result.loss.item() == 0.0
        result.loss.backward()
        assert math.isnan(result.cosine.item())


def test_contrastive_under_autocast_is_float32_with_a_low_precision_cosine_matmul() -> None:
    """Under autocast the cosine matmul runs in autocast's dtype (bf16 here) and everything
    else in float32: the loss is float32, within bf16 rounding of the float32 loss, not equal
    to it (so the matmul really ran in bf16), and exactly the float32 loss with autocast off."""
    head = torch.nn.Linear(64, 64)
    h = torch.randn(2, 40, 64, generator=_gen(13))
    y = torch.randn(2, 40, 64, generator=_gen(14))
    lengths = torch.tensor([40, 29])
    select = torch.ones(2, 40, dtype=torch.bool)
    kwargs = dict(tau=0.1, num_negatives=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(h)
        assert z.dtype == torch.bfloat16
        result = contrastive_loss(z, y, select, lengths, generator=_gen(1), **kwargs)
        with torch.autocast("cpu", enabled=False):
            unrounded = contrastive_loss(z, y, select, lengths, generator=_gen(1), **kwargs)
    assert result.loss.dtype == torch.float32
    reference = contrastive_loss(z.float(), y, select, lengths, generator=_gen(1), **kwargs)
    assert torch.equal(unrounded.loss, reference.loss)
    assert not torch.equal(result.loss, reference.loss)
    assert result.loss.item() == pytest.approx(reference.loss.item(), rel=2e-3)
    assert result.cosine.item() == pytest.approx(reference.cosine.item(), abs=2e-3)
    result.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_l1cos_and_mse_known_numbers() -> None:
    z = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    y = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-9.0, 3.0]]])
    lengths = torch.tensor([3])
    select = torch.tensor([[True, True, False]])  # the third frame must not count
    # Frame 1: L1 (1 + 1) / 2 = 1, cos 0 -> -log sigmoid(0) = log 2.
    # Frame 2: L1 (1 + 0) / 2 = 0.5, cos 1 -> -log sigmoid(1) = log(1 + e^-1).
    l1cos = l1cos_loss(z, y, select, lengths, lam=1.0)
    expected = (1 + math.log(2) + 0.5 + math.log1p(math.exp(-1))) / 2
    assert l1cos.loss.item() == pytest.approx(expected, rel=1e-6)
    assert l1cos.cosine.item() == pytest.approx(0.5)
    assert l1cos.accuracy is None
    l1cos_2 = l1cos_loss(z, y, select, lengths, lam=2.0)
    expected_2 = (1 + 2 * math.log(2) + 0.5 + 2 * math.log1p(math.exp(-1))) / 2
    assert l1cos_2.loss.item() == pytest.approx(expected_2, rel=1e-6)
    # MSE: frame 1 (1 + 1) / 2 = 1, frame 2 (1 + 0) / 2 = 0.5.
    assert mse_loss(z, y, select, lengths).loss.item() == pytest.approx(0.75)
    # Padding (lengths) is excluded even when selected.
    assert mse_loss(z, y, torch.ones(1, 3, dtype=torch.bool), torch.tensor([2])).loss.item() == (
        pytest.approx(0.75)
    )


@pytest.mark.parametrize("loss_name", ["contrastive", "l1cos", "mse"])
def test_gradient_flows_to_predictions(loss_name: str) -> None:
    z = torch.randn(2, 7, 6, generator=_gen(15), requires_grad=True)
    y = torch.randn(2, 7, 6, generator=_gen(16))
    lengths = torch.tensor([7, 4])
    select = torch.ones(2, 7, dtype=torch.bool)
    if loss_name == "contrastive":
        result = contrastive_loss(z, y, select, lengths, tau=0.1, num_negatives=5, generator=None)
    elif loss_name == "l1cos":
        result = l1cos_loss(z, y, select, lengths)
    else:
        result = mse_loss(z, y, select, lengths)
    result.loss.backward()
    valid = valid_frames(lengths, 7)
    assert (z.grad[valid].abs().sum(-1) > 0).all()
    assert (z.grad[~valid] == 0).all()


def test_contrastive_argument_errors() -> None:
    z = torch.randn(1, 3, 2)
    select = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(z, z, select, torch.tensor([3]), tau=0.0, num_negatives=2, generator=None)
    with pytest.raises(ValueError, match="num_negatives"):
        contrastive_loss(z, z, select, torch.tensor([3]), tau=0.1, num_negatives=0, generator=None)
    with pytest.raises(ValueError, match=r"\(B, T, D_t\)"):
        contrastive_loss(
            z, z[0], select, torch.tensor([3]), tau=0.1, num_negatives=2, generator=None
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_contrastive_on_cuda_matches_cpu_under_bf16_autocast() -> None:
    device = torch.device("cuda")
    lengths = torch.tensor([30, 17, 1, 25])
    z = torch.randn(4, 30, 16, generator=_gen(20))
    y = torch.randn(4, 30, 16, generator=_gen(21))
    y[0, 3] = y[0, 4]
    select = torch.rand(4, 30, generator=_gen(22)) < 0.5
    distractors = sample_distractors(lengths, 30, num_negatives=12, generator=_gen(23))
    kwargs = dict(tau=0.1, num_negatives=12, generator=None)
    cpu = contrastive_loss(z, y, select, lengths, distractors=distractors, **kwargs)
    z_cuda = z.to(device).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cuda = contrastive_loss(
            z_cuda, y.to(device), select.to(device), lengths.to(device),
            distractors=distractors.to(device), **kwargs,
        )  # fmt: skip
    assert cuda.loss.dtype == torch.float32
    # The cosine matmul runs in bf16 under autocast: agreement within bf16 rounding.
    assert torch.allclose(cuda.loss.cpu(), cpu.loss, rtol=2e-3)
    assert torch.allclose(cuda.accuracy.cpu(), cpu.accuracy, atol=0.05)
    cuda.loss.backward()
    assert torch.isfinite(z_cuda.grad).all()
    generator = torch.Generator(device=device).manual_seed(0)
    index = sample_distractors(lengths.to(device), 30, num_negatives=50, generator=generator)
    positions = torch.arange(30, device=device)[None, :, None]
    drawable = (positions < lengths.to(device)[:, None, None]) & (lengths.to(device) >= 2)[
        :, None, None
    ]
    ok = (index != positions) & (index < lengths.to(device)[:, None, None])
    assert ok[drawable.expand_as(index)].all()


def test_batch_negatives_defeat_a_position_only_predictor() -> None:
    """z carries only the frame index; y = index code + utterance content. Same-utterance
    distractors are told apart by position alone; same-index ones from other utterances not."""
    g = torch.Generator().manual_seed(0)
    batch, frames, dim = 6, 40, 32
    position = torch.randn(frames, dim, generator=g)
    y = position[None] + 0.3 * torch.randn(batch, frames, dim, generator=g)
    z = position[None].expand(batch, -1, -1).clone()
    select = torch.ones(batch, frames, dtype=torch.bool)
    lengths = torch.full((batch,), frames)
    kw = dict(tau=0.1, num_negatives=10)
    plain = contrastive_losses([z], [y], select, lengths, generator=g, **kw)[0]
    crossed = contrastive_losses(
        [z], [y], select, lengths, generator=g, batch_negatives=True, **kw
    )[0]
    assert plain.accuracy > 0.95
    assert crossed.accuracy < 0.5
    assert crossed.loss > plain.loss + 1.0


def test_batch_negative_cosines_match_a_loop() -> None:
    from colld.objectives.losses import _same_index_cosines

    g = torch.Generator().manual_seed(1)
    pairs, batch, frames, dim = 2, 3, 5, 4
    z = torch.nn.functional.normalize(torch.randn(pairs * batch, frames, dim, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(pairs * batch, frames, dim, generator=g), dim=-1)
    lengths = torch.tensor([5, 3, 4] * pairs)
    order = torch.tensor([[0, 2, 4]] * (pairs * batch))
    got = _same_index_cosines(z, y, order, lengths, pairs)
    for row in range(pairs * batch):
        block, b = divmod(row, batch)
        for r, t in enumerate(order[row].tolist()):
            for c in range(batch):
                other = block * batch + c
                if c == b or t >= lengths[other]:
                    assert got[row, r, c] == float("-inf")
                else:
                    assert torch.isclose(got[row, r, c], z[row, t] @ y[other, t])
