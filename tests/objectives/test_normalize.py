"""Target normalisation: statistics over valid frames only, running stats, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colld.objectives.masking import valid_frames
from colld.objectives.normalize import TargetNormalizer


def _batch(seed: int, lengths: list[int], num_frames: int = 12, dim: int = 6) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(len(lengths), num_frames, dim, generator=generator) * 3 + 1
    y[..., 0] *= 50  # an outlier dimension, like Whisper base's hidden_states[4][..., 388]
    lengths_t = torch.tensor(lengths)
    valid = valid_frames(lengths_t, num_frames)
    return y, valid


def _with_garbage_padding(y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return y.masked_fill(~valid[..., None], 1e6)


@pytest.mark.parametrize("kind", ["none", "layer_norm", "instance", "standardize"])
def test_padding_is_zero_and_never_contributes(kind: str) -> None:
    y, valid = _batch(0, [12, 7, 3])
    out = TargetNormalizer(kind, [4], 6).train()(y, valid, 4)
    garbage = TargetNormalizer(kind, [4], 6).train()(_with_garbage_padding(y, valid), valid, 4)
    assert out.dtype == torch.float32
    assert torch.allclose(out, garbage)
    assert (out[~valid] == 0).all()


def test_layer_norm_is_per_frame_without_affine() -> None:
    y, valid = _batch(1, [12, 5])
    out = TargetNormalizer("layer_norm", [1], 6)(y, valid, 1)
    frames = out[valid]
    assert torch.allclose(frames.mean(-1), torch.zeros(len(frames)), atol=1e-5)
    assert torch.allclose(frames.var(-1, unbiased=False), torch.ones(len(frames)), atol=1e-3)
    assert not any(p.requires_grad for p in TargetNormalizer("layer_norm", [1], 6).parameters())


def test_instance_norm_matches_torch_on_each_trimmed_utterance() -> None:
    y, valid = _batch(2, [12, 9, 4])
    out = TargetNormalizer("instance", [2], 6)(y, valid, 2)
    for b, length in enumerate([12, 9, 4]):
        # F.instance_norm normalises (N, C, L) over L: here C = D_t dims, L = valid frames only.
        expected = F.instance_norm(y[b : b + 1, :length].transpose(1, 2), eps=1e-5).transpose(1, 2)
        assert torch.allclose(out[b, :length], expected[0], atol=1e-5)


def test_standardize_running_stats_equal_stats_of_all_frames_seen() -> None:
    normalizer = TargetNormalizer("standardize", [3, 5], 6).train()
    seen = []
    for seed, lengths in enumerate([[12, 4], [3, 11, 12], [1, 7]]):
        y, valid = _batch(10 + seed, lengths)
        normalizer(_with_garbage_padding(y, valid), valid, 5)
        seen.append(y[valid])
    frames = torch.cat(seen)
    stats = normalizer.stats["5"]
    assert int(stats.count) == len(frames) == 12 + 4 + 3 + 11 + 12 + 1 + 7
    assert torch.allclose(stats.mean, frames.mean(0), rtol=1e-5, atol=1e-4)
    assert torch.allclose(stats.var, frames.var(0, unbiased=False), rtol=1e-4)
    assert int(normalizer.stats["3"].count) == 0  # other layers keep their own statistics
    # The outlier dim no longer dominates: all dims come out on the same scale.
    out = normalizer.eval()(y, valid, 5)[valid]
    assert out.abs().max() < 10


def test_standardize_frozen_in_eval_and_resumes_from_state_dict() -> None:
    normalizer = TargetNormalizer("standardize", [6], 6).train()
    y, valid = _batch(20, [12, 10])
    normalizer(y, valid, 6)
    state = normalizer.state_dict()
    assert set(state) == {"stats.6.count", "stats.6.mean", "stats.6.var"}
    normalizer.eval()
    y2, valid2 = _batch(21, [8, 12])
    before = normalizer(y2, valid2, 6)
    assert int(normalizer.stats["6"].count) == 22  # eval did not update
    restored = TargetNormalizer("standardize", [6], 6)
    restored.load_state_dict(state)
    restored.eval()
    assert torch.equal(restored(y2, valid2, 6), before)
    with pytest.raises(KeyError, match=r"layer 2;.*\[6\]"):
        restored(y2, valid2, 2)


def test_bfloat16_input_and_unknown_kind() -> None:
    y, valid = _batch(30, [12])
    out = TargetNormalizer("instance", [1], 6)(y.bfloat16(), valid, 1)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"unknown target_norm 'batch'.*'layer_norm'"):
        TargetNormalizer("batch", [1], 6)
