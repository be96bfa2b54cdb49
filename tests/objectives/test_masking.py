"""Span masking: HF/fairseq ``mask_time_prob`` semantics, padding, determinism, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colld.objectives.masking import num_spans, span_mask, valid_frames


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run_lengths(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, current = [], 0
    for value in row.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_coverage_matches_hf_at_065_span_10() -> None:
    lengths = torch.full((64,), 2000)
    mask = span_mask(lengths, 2000, mask_prob=0.65, span=10, min_spans=2, generator=_gen(0))
    ours = mask.float().mean().item()
    # Expected coverage with n = 0.065 L distinct uniform starts: 1 - (1 - n / (L - 9))^10.
    expected = 1 - (1 - 0.065 * 2000 / 1991) ** 10
    assert abs(ours - expected) < 0.01
    assert 0.46 < ours < 0.51  # METHOD.md: "~48% of frames are covered at 0.65"


@pytest.mark.slow  # importing transformers' wav2vec2 module takes ~10 s here
def test_coverage_matches_hf_compute_mask_indices() -> None:
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    for length in (60, 400, 2000):
        lengths = torch.full((64,), length)
        ours = span_mask(lengths, length, mask_prob=0.65, span=10, min_spans=2, generator=_gen(0))
        np.random.seed(0)
        hf = np.mean(
            [
                _compute_mask_indices((64, length), mask_prob=0.65, mask_length=10, min_masks=2)
                for _ in range(5)
            ]
        )
        assert abs(ours.float().mean().item() - hf) < 0.02, length


def test_expected_number_of_spans_uses_probabilistic_rounding() -> None:
    lengths = torch.full((20000,), 105)  # 0.65 * 105 / 10 = 6.825 spans on average
    counts = num_spans(lengths, mask_prob=0.65, span=10, min_spans=2, generator=_gen(1))
    assert set(counts.unique().tolist()) == {6, 7}
    assert abs(counts.float().mean().item() - 6.825) < 0.02


def test_padding_never_masked_and_spans_are_whole() -> None:
    generator = _gen(2)
    for _ in range(20):
        lengths = torch.randint(0, 120, (16,))
        num_frames = int(lengths.max()) + 7
        mask = span_mask(
            lengths, num_frames, mask_prob=0.65, span=10, min_spans=2, generator=generator
        )
        assert mask.shape == (16, num_frames) and mask.dtype == torch.bool
        assert not (mask & ~valid_frames(lengths, num_frames)).any()
        for row, length in zip(mask, lengths.tolist(), strict=True):
            # A union of overlapping 10-frame spans: every run is at least 10 frames long.
            assert all(run >= 10 for run in _run_lengths(row))
            if length >= 20:
                assert row.sum() >= 11  # at least 2 distinct starts


def test_min_spans_respected() -> None:
    lengths = torch.tensor([100] * 200 + [15] * 50 + [10] * 10)
    mask = span_mask(lengths, 100, mask_prob=0.0, span=10, min_spans=2, generator=_gen(3))
    covered = mask.sum(dim=1)
    long_rows = covered[:200]
    assert ((long_rows >= 11) & (long_rows <= 20)).all()  # exactly 2 distinct starts
    assert (long_rows > 11).any() and (long_rows == 20).any()  # they may overlap or not
    assert (covered[200:250] == 10).all()  # capped at L // span = 1 span
    assert (covered[250:] == 10).all()  # L == span: the one span covers it all
    none = span_mask(lengths, 100, mask_prob=0.0, span=10, min_spans=0, generator=_gen(3))
    assert not none.any()


def test_short_utterances_get_no_span() -> None:
    lengths = torch.tensor([0, 1, 5, 9, 40])
    mask = span_mask(lengths, 40, mask_prob=0.65, span=10, min_spans=2, generator=_gen(4))
    assert not mask[:4].any()
    assert mask[4].sum() >= 10


def test_deterministic_under_generator() -> None:
    lengths = torch.tensor([300, 250, 17, 120])
    kwargs = dict(mask_prob=0.65, span=10, min_spans=2)
    first = span_mask(lengths, 300, generator=_gen(5), **kwargs)
    again = span_mask(lengths, 300, generator=_gen(5), **kwargs)
    other = span_mask(lengths, 300, generator=_gen(6), **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_full_probability_and_bad_arguments() -> None:
    lengths = torch.tensor([500])
    mask = span_mask(lengths, 500, mask_prob=1.0, span=10, min_spans=2, generator=_gen(7))
    assert 0.55 < mask.float().mean().item() < 0.75  # 50 spans over 491 starts: ~1 - e^-1
    with pytest.raises(ValueError, match="mask_prob"):
        span_mask(lengths, 500, mask_prob=1.5, span=10, min_spans=2, generator=None)
    with pytest.raises(ValueError, match="span"):
        span_mask(lengths, 500, mask_prob=0.5, span=0, min_spans=2, generator=None)
    with pytest.raises(ValueError, match="num_frames=400"):
        span_mask(lengths, 400, mask_prob=0.5, span=10, min_spans=2, generator=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_span_mask_on_cuda_with_a_cuda_generator() -> None:
    device = torch.device("cuda")
    lengths = torch.tensor([2000] * 32 + [7, 300], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    mask = span_mask(lengths, 2000, mask_prob=0.65, span=10, min_spans=2, generator=generator)
    assert mask.device.type == "cuda"
    assert 0.46 < mask[:32].float().mean().item() < 0.51
    assert not (mask & ~valid_frames(lengths, 2000)).any()
    assert not mask[32].any()
