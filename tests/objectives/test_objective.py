"""The objective module: config validation, layer bookkeeping, frame selection, totals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from colld.encoders.base import EncoderOutput
from colld.objectives.losses import mse_loss
from colld.objectives.masking import valid_frames
from colld.objectives.objective import DistillObjective, LossOutput, ObjectiveConfig

NUM_STUDENT, NUM_TEACHER, STUDENT_DIM, TEACHER_DIM = 4, 6, 8, 12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _states(seed: int, layers, dim: int, batch: int = 3, frames: int = 40) -> dict:
    generator = _gen(seed)
    return {j: torch.randn(batch, frames, dim, generator=generator) for j in layers}


def _objective(**overrides) -> DistillObjective:
    config = ObjectiveConfig(**overrides)
    return DistillObjective(config, STUDENT_DIM, TEACHER_DIM, NUM_STUDENT, NUM_TEACHER)


def test_config_defaults_match_method() -> None:
    config = ObjectiveConfig()
    assert (config.loss, config.mode, config.target, config.loss_frames) == (
        "contrastive",
        "layer-to-layer",
        "hidden",
        "all",  # ours, not METHOD.md's "masked": docs/results/masking.md
    )
    assert (config.tau, config.num_negatives, config.mask) == (0.1, 100, True)
    assert (config.mask_prob, config.mask_span, config.mask_min_spans) == (0.65, 10, 2)
    assert config.target_norm == "layer_norm"
    with pytest.raises(TypeError):
        ObjectiveConfig("contrastive")  # type: ignore[misc]  # kw-only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tau": 0.0}, r"objective\.tau = 0\.0 must be > 0"),
        ({"num_negatives": 0}, r"num_negatives = 0 must be >= 1"),
        ({"mask_prob": 1.5}, r"mask_prob = 1\.5 must lie in \[0, 1\]"),
        ({"mask_prob": -0.1}, r"mask_prob"),
        ({"mask_span": 0}, r"mask_span = 0"),
        ({"loss": "infonce"}, r"loss = 'infonce' is unknown.*'contrastive', 'l1cos', 'mse'"),
        ({"mode": "l2l"}, r"mode = 'l2l' is unknown.*'prediction-heads'"),
        ({"target": "attn"}, r"target = 'attn' is unknown.*'ffn'"),
        ({"target_norm": "bn"}, r"target_norm = 'bn' is unknown.*'standardize'"),
        ({"loss_frames": "some"}, r"loss_frames = 'some' is unknown.*'unmasked'"),
        ({"mask": "true"}, r"mask = 'true' must be a bool"),
        ({"num_negatives": 2.5}, r"num_negatives = 2\.5 must be a int"),
        ({"layer_map": [1, 2, 3]}, r"objective\.layer_map: .*3 entries.*4 entries"),
        ({"layer_map": [1, 2, 3, 9]}, r"layer_map\[3\] = 9.*1\.\.6"),
        ({"pair_weights": [1.0, 1.0]}, r"pair_weights has 2 entries.*4 pairs.*s4->t6"),
        ({"pair_weights": [1.0, -1.0, 1.0, 1.0]}, r"pair_weights\[1\] = -1\.0 must be >= 0"),
        ({"pair_weights": [0.0, 0.0, 0.0, 0.0]}, r"all 0"),
        ({"l1cos_lambda": -1.0}, r"l1cos_lambda"),
        (
            {"head_init": "eye"},
            r"head_init = 'eye'; expected one of \('auto', 'random', 'select'\)",
        ),
        ({"head_init": "select", "head_hidden_dim": 16}, r"'select' needs single-Linear heads"),
    ],
)
def test_validate_rejects_bad_values(overrides: dict, message: str) -> None:
    config = dataclasses.replace(ObjectiveConfig(), **overrides)
    with pytest.raises(ValueError, match=message):
        config.validate(NUM_STUDENT, NUM_TEACHER)


def test_select_heads_put_the_student_dims_on_the_teachers_first_dims() -> None:
    objective = _objective(head_init="select")
    states = _states(0, range(1, NUM_STUDENT + 1), STUDENT_DIM)
    for prediction, (i, _) in zip(objective.heads(states), objective.pairs, strict=True):
        assert torch.equal(prediction[..., :STUDENT_DIM], states[i])
        assert not prediction[..., STUDENT_DIM:].any()
    random_heads = _objective()
    assert not torch.equal(random_heads.heads(states)[0][..., :STUDENT_DIM], states[1])


def test_layer_bookkeeping_layer_to_layer_and_prediction_heads() -> None:
    objective = _objective()
    assert objective.teacher_layers == [2, 3, 5, 6]
    assert objective.student_layers == [1, 2, 3, 4]
    assert objective.pair_names == ["s1->t2", "s2->t3", "s3->t5", "s4->t6"]
    assert len(objective.heads.heads) == 4
    distil = _objective(mode="prediction-heads", loss="l1cos", mask=False, head_hidden_dim=16)
    assert distil.student_layers == [4] and distil.teacher_layers == [2, 4, 6]
    assert distil.pair_names == ["s4->t2", "s4->t4", "s4->t6"]
    assert isinstance(distil.heads.heads[0], torch.nn.Sequential)


def test_forward_reports_every_pair_and_the_mean_total() -> None:
    objective = _objective()
    student = _states(0, objective.student_layers, STUDENT_DIM)
    teacher = _states(1, objective.teacher_layers, TEACHER_DIM)
    lengths = torch.tensor([40, 33, 25])
    mask = objective.make_mask(lengths, 40, _gen(2))
    assert mask is not None and mask.shape == (3, 40) and mask.any()
    out = objective(student, teacher, lengths, mask, _gen(3))
    assert isinstance(out, LossOutput)
    assert list(out.parts) == objective.pair_names == list(out.accuracy) == list(out.cosine)
    assert list(out.student_std) == ["s1", "s2", "s3", "s4"]
    assert torch.allclose(out.total, torch.stack(list(out.parts.values())).mean())
    assert all(0.0 <= a.item() <= 1.0 for a in out.accuracy.values())
    out.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())


def test_pair_weights_weight_the_total() -> None:
    weights = [1.0, 0.0, 2.0, 1.0]
    objective = _objective(loss="mse", pair_weights=weights, mask=False)
    student = _states(4, objective.student_layers, STUDENT_DIM)
    teacher = _states(5, objective.teacher_layers, TEACHER_DIM)
    out = objective(student, teacher, torch.tensor([40, 30, 20]), None)
    parts = torch.stack(list(out.parts.values()))
    assert torch.allclose(out.total, (parts * torch.tensor(weights)).sum() / 4.0)
    assert out.accuracy == {}


@pytest.mark.parametrize("loss_frames", ["masked", "unmasked", "all"])
def test_loss_frames_select_the_documented_frames(loss_frames: str) -> None:
    objective = _objective(loss="mse", loss_frames=loss_frames, target_norm="none")
    student = _states(6, objective.student_layers, STUDENT_DIM)
    teacher = _states(7, objective.teacher_layers, TEACHER_DIM)
    lengths = torch.tensor([40, 31, 12])
    mask = objective.make_mask(lengths, 40, _gen(8))
    out = objective(student, teacher, lengths, mask)
    valid = valid_frames(lengths, 40)
    expected_select = {"masked": mask & valid, "unmasked": ~mask & valid, "all": valid}[loss_frames]
    predictions = objective.heads(student)
    for (_, j), z, name in zip(objective.pairs, predictions, objective.pair_names, strict=True):
        expected = mse_loss(z, teacher[j], expected_select, lengths).loss
        assert torch.allclose(out.parts[name], expected)
    # With masking off (mask None) every choice counts all valid frames.
    unmasked = objective(student, teacher, lengths, None)
    for (_, j), z, name in zip(objective.pairs, predictions, objective.pair_names, strict=True):
        assert torch.allclose(unmasked.parts[name], mse_loss(z, teacher[j], valid, lengths).loss)


def test_make_mask_is_none_when_masking_is_off() -> None:
    assert _objective(mask=False).make_mask(torch.tensor([50]), 50, None) is None


def test_student_std_signals_collapse() -> None:
    objective = _objective(loss="l1cos", mask=False)
    student = _states(9, objective.student_layers, STUDENT_DIM)
    student[2] = student[2] * 3.0
    student[3] = student[3][:, :1].expand(-1, 40, -1).clone()  # constant over time
    student[1][0, 30:] = 1e4  # padding must not count
    teacher = _states(10, objective.teacher_layers, TEACHER_DIM)
    out = objective(student, teacher, torch.tensor([30, 40, 40]), None)
    assert out.student_std["s3"].item() == pytest.approx(0.0, abs=1e-6)
    assert 0.8 < out.student_std["s1"].item() < 1.2
    assert 2.4 < out.student_std["s2"].item() < 3.6


def test_standardize_statistics_live_in_the_objective_state_dict() -> None:
    objective = _objective(target_norm="standardize", loss="l1cos", mask=False)
    student = _states(11, objective.student_layers, STUDENT_DIM)
    teacher = _states(12, objective.teacher_layers, TEACHER_DIM)
    lengths = torch.tensor([40, 20, 10])
    objective.train()(student, teacher, lengths, None)
    state = objective.state_dict()
    assert int(state["normalizer.stats.5.count"]) == 70
    restored = _objective(target_norm="standardize", loss="l1cos", mask=False)
    restored.load_state_dict(state)
    first = objective.eval()(student, teacher, lengths, None)
    second = restored.eval()(student, teacher, lengths, None)
    assert torch.equal(first.total, second.total)


def test_teacher_targets_pick_hidden_or_ffn() -> None:
    hidden = _states(13, range(7), TEACHER_DIM)
    ffn = _states(14, range(1, 7), TEACHER_DIM)
    output = EncoderOutput(
        hidden_states=hidden, lengths=torch.tensor([40] * 3), frame_rate=50.0, ffn_outputs=ffn
    )
    assert _objective().teacher_targets(output)[5] is hidden[5]
    assert _objective(target="ffn").teacher_targets(output)[5] is ffn[5]
    output.ffn_outputs = {}
    with pytest.raises(KeyError, match="return_ffn"):
        _objective(target="ffn").teacher_targets(output)


def test_contrastive_objective_learns_a_hidden_linear_map() -> None:
    """A tiny end-to-end run: heads must recover teacher frames from rotated student states."""
    torch.manual_seed(0)
    objective = _objective(mask=False, num_negatives=20)
    rotation = torch.linalg.qr(torch.randn(TEACHER_DIM, TEACHER_DIM))[0][:, :STUDENT_DIM]
    optimizer = torch.optim.Adam(objective.parameters(), lr=5e-2)
    lengths = torch.tensor([40, 35, 30])
    history = []
    for step in range(30):
        teacher = _states(100 + step, objective.teacher_layers, TEACHER_DIM)
        student = {i: teacher[j] @ rotation for i, j in objective.pairs}
        out = objective(student, teacher, lengths, None, _gen(step))
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        history.append((out.total.item(), out.accuracy["s4->t6"].item()))
    assert history[-1][0] < 0.2 * history[0][0]  # ~6.0 -> ~0.4
    assert history[-1][1] > 0.85  # 8 of 12 dims reach the student: not quite 1
