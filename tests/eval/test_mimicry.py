"""Teacher mimicry: linear CKA, the CKA matrix of two feature sets, the exported objective and
its per-pair cosines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import WhisperFeatureExtractor

from colld.config import to_dict
from colld.data.manifest import Utterance
from colld.encoders import wrap_encoder
from colld.eval.features import FeatureSet
from colld.eval.mimicry import (
    aligned_lengths,
    cka_matrix,
    linear_cka,
    load_objective,
    objective_unavailable_reason,
    pair_cosines,
)
from colld.objectives.normalize import layer_norm_targets
from colld.objectives.objective import DistillObjective, ObjectiveConfig
from colld.students.export import export_student
from colld.testing import tiny_model


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook feature-space formula in numpy float64."""
    x, y = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


# ---------------------------------------------------------------- linear_cka
def test_linear_cka_identity_orthogonal_and_isotropic_invariance() -> None:
    x = _randn(300, 12, seed=0)
    rotation, _ = torch.linalg.qr(_randn(12, 12, seed=1))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 7.5 * x + 3.0) == pytest.approx(1.0, abs=1e-10)  # offset: centred away
    y = _randn(300, 5, seed=2) + x[:, :5]
    assert linear_cka(x @ rotation * 0.1, y) == pytest.approx(linear_cka(x, y), abs=1e-10)


def test_linear_cka_is_not_invariant_to_non_isotropic_scaling() -> None:
    x = _randn(300, 12, seed=0)
    scales = torch.linspace(0.1, 10.0, 12, dtype=torch.float64)
    assert linear_cka(x, x * scales) < 0.9


def test_linear_cka_near_zero_for_independent_data() -> None:
    value = linear_cka(_randn(5000, 4, seed=3), _randn(5000, 6, seed=4))
    assert 0.0 <= value < 0.01


@pytest.mark.parametrize(("n", "d1", "d2"), [(200, 6, 9), (8, 40, 60)])  # feature / Gram form
def test_linear_cka_matches_reference_in_both_forms(n: int, d1: int, d2: int) -> None:
    x = _randn(n, d1, seed=5)
    y = x @ _randn(d1, d2, seed=6) + 0.5 * _randn(n, d2, seed=7)
    assert linear_cka(x.float(), y.half()) == pytest.approx(
        _reference_cka(x.float(), y.half().float()), rel=1e-9
    )


def test_linear_cka_errors_and_constant_input() -> None:
    with pytest.raises(ValueError, match="x has N=5, y has N=6"):
        linear_cka(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="N >= 2"):
        linear_cka(torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"two \(N, D\) matrices"):
        linear_cka(torch.ones(4), torch.ones(4, 2))
    assert np.isnan(linear_cka(torch.ones(5, 2), _randn(5, 2, seed=0)))


# ---------------------------------------------------------------- cka_matrix
def _feature_set(
    states: list[torch.Tensor], *, model: str = "m", ids: list[str] | None = None
) -> FeatureSet:
    ids = ids or [f"u{n}" for n in range(len(states))]
    return FeatureSet(
        utterances=[Utterance(id=i, path=f"{i}.wav", duration=1.0) for i in ids],
        states=[s.to(torch.float16) for s in states],
        frame_rate=50.0,
        model=model,
        fingerprint=model,
    )


def _random_states(num_states: int, dim: int, frames: list[int], seed: int) -> list[torch.Tensor]:
    return [_randn(num_states, t, dim, seed=seed + n).float() for n, t in enumerate(frames)]


def test_cka_matrix_of_a_set_with_itself() -> None:
    states = _random_states(4, 16, [30, 45, 25], seed=0)
    states = [s + s[:1] for s in states]  # layers share a component: off-diagonal > 0
    a = _feature_set(states)
    matrix = cka_matrix(a, a)
    assert matrix.shape == (4, 4) and matrix.dtype == torch.float64
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix, matrix.T, atol=1e-12)
    assert torch.allclose(matrix, cka_matrix(a, _feature_set(states)), atol=1e-12)  # no shortcut
    off_diagonal = matrix[~torch.eye(4, dtype=torch.bool)]
    assert ((off_diagonal > 0.2) & (off_diagonal < 0.9)).all()


def test_cka_matrix_entries_are_pooled_linear_cka_and_subsampling_is_seeded() -> None:
    a = _feature_set(_random_states(3, 8, [20, 35], seed=1), model="a")
    b = _feature_set(_random_states(2, 5, [20, 35], seed=9), model="b")
    matrix = cka_matrix(a, b)
    assert matrix.shape == (3, 2)
    pooled_a = torch.cat(a.states, dim=1)  # (3, 55, 8)
    pooled_b = torch.cat(b.states, dim=1)
    assert matrix[2, 1] == pytest.approx(linear_cka(pooled_a[2], pooled_b[1]), rel=1e-12)
    sub = cka_matrix(a, b, max_frames=30, seed=3)
    assert torch.equal(sub, cka_matrix(a, b, max_frames=30, seed=3))
    assert not torch.equal(sub, cka_matrix(a, b, max_frames=30, seed=4))
    assert not torch.equal(sub, matrix)
    assert torch.allclose(cka_matrix(a, a, max_frames=30).diagonal(), torch.ones(3).double())


def test_cka_matrix_truncates_a_frame_or_two_and_refuses_more() -> None:
    states = _random_states(2, 8, [20, 30], seed=2)
    a = _feature_set(states, model="a")
    b_states = [states[0], torch.cat([states[1], _randn(2, 2, 8, seed=0).float()], dim=1)]
    b = _feature_set(b_states, model="b")  # u1 has 2 extra frames at the end
    assert aligned_lengths(a, b) == [20, 30]
    assert torch.allclose(cka_matrix(a, b).diagonal(), torch.ones(2).double())
    c_states = [states[0], torch.cat([states[1], _randn(2, 3, 8, seed=0).float()], dim=1)]
    with pytest.raises(ValueError, match=r"utterance 'u1': a has 30 frames, c has 33"):
        cka_matrix(a, _feature_set(c_states, model="c"))


def test_cka_matrix_refuses_different_utterances_or_rates() -> None:
    states = _random_states(2, 8, [20, 30], seed=2)
    a = _feature_set(states, model="a")
    with pytest.raises(ValueError, match=r"utterance 1 is 'u1' in a but 'x' in b"):
        cka_matrix(a, _feature_set(states, model="b", ids=["u0", "x"]))
    with pytest.raises(ValueError, match=r"'u1' is only in a"):
        cka_matrix(a, _feature_set(states[:1], model="b"))
    slow = _feature_set(states, model="fbank")
    slow.frame_rate = 100.0
    with pytest.raises(ValueError, match="frame rates differ"):
        cka_matrix(a, slow)


# ---------------------------------------------------------------- load_objective
STUDENT_LAYERS, TEACHER_LAYERS, STUDENT_DIM, TEACHER_DIM = 2, 4, 32, 48


def _objective(**overrides: object) -> DistillObjective:
    config = ObjectiveConfig(**overrides)  # type: ignore[arg-type]
    return DistillObjective(config, STUDENT_DIM, TEACHER_DIM, STUDENT_LAYERS, TEACHER_LAYERS)


def _export(objective: DistillObjective, out_dir: Path, *, metadata: bool = True) -> Path:
    student = wrap_encoder(
        tiny_model("whisper", num_layers=STUDENT_LAYERS, hidden=STUDENT_DIM, heads=2, ffn=64)
    )
    heads = {f"objective.{k}": v for k, v in objective.state_dict().items()}
    provenance = {
        "objective": to_dict(objective.config),
        "pairs": [list(p) for p in objective.pairs],
        "student_dim": STUDENT_DIM,
        "teacher_dim": TEACHER_DIM,
        "num_student_layers": STUDENT_LAYERS,
        "num_teacher_layers": TEACHER_LAYERS,
    }
    return export_student(
        student,
        WhisperFeatureExtractor(),
        out_dir,
        extra_files={"distill_heads.safetensors": heads},
        metadata=provenance if metadata else None,
    )


def test_load_objective_round_trip(tmp_path: Path) -> None:
    objective = _objective(target_norm="standardize", head_hidden_dim=16, layer_map=[2, 4])
    objective.train()
    objective.normalizer(_randn(2, 10, TEACHER_DIM, seed=0).float(), torch.ones(2, 10).bool(), 4)
    out_dir = _export(objective, tmp_path / "student")
    loaded = load_objective(out_dir)
    assert loaded is not None and not loaded.training
    assert loaded.pairs == objective.pairs == [(1, 2), (2, 4)]
    assert loaded.config == objective.config
    expected, found = objective.state_dict(), loaded.state_dict()
    assert sorted(found) == sorted(expected) and "normalizer.stats.4.mean" in found
    assert all(torch.equal(found[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_objective_absent_or_mismatched(tmp_path: Path) -> None:
    objective = _objective(target_norm="none")
    bare = _export(objective, tmp_path / "bare", metadata=False)
    assert load_objective(bare) is None
    assert "has no colld.json" in (objective_unavailable_reason(bare) or "")
    out_dir = _export(objective, tmp_path / "student")
    provenance = json.loads((out_dir / "colld.json").read_text())
    (out_dir / "colld.json").write_text(json.dumps({**provenance, "teacher_dim": 40}))
    with pytest.raises(ValueError, match="does not fit the objective"):
        load_objective(out_dir)
    (out_dir / "colld.json").write_text(json.dumps({**provenance, "pairs": [[1, 1], [2, 2]]}))
    with pytest.raises(ValueError, match="recorded pairs"):
        load_objective(out_dir)
    del provenance["student_dim"]
    (out_dir / "colld.json").write_text(json.dumps(provenance))
    with pytest.raises(ValueError, match=r"lacks \['student_dim'\]"):
        load_objective(out_dir)
    save_file(
        {"encoder.mask_embedding": torch.zeros(STUDENT_DIM)}, out_dir / "distill_heads.safetensors"
    )
    assert "holds no 'objective.*' tensors" in (objective_unavailable_reason(out_dir) or "")
    assert load_objective(out_dir) is None


# ---------------------------------------------------------------- pair_cosines
def _identity_heads(objective: DistillObjective, sign: float = 1.0) -> None:
    with torch.no_grad():
        for head in objective.heads.heads:
            head.weight.copy_(sign * torch.eye(*head.weight.shape))
            head.bias.zero_()


def test_pair_cosines_are_one_for_identity_heads_and_equal_features() -> None:
    config = ObjectiveConfig(target_norm="none")
    objective = DistillObjective(config, 16, 16, num_student_layers=3, num_teacher_layers=3)
    _identity_heads(objective)
    states = _random_states(4, 16, [12, 20], seed=3)
    features = _feature_set(states)
    cosines = pair_cosines(objective, features, features)
    assert list(cosines) == ["s1->t1", "s2->t2", "s3->t3"] and cosines.skipped_reason is None
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in cosines.values())
    _identity_heads(objective, sign=-1.0)
    assert pair_cosines(objective, features, features)["s2->t2"] == pytest.approx(-1.0, abs=1e-6)


def test_pair_cosines_use_head_and_target_norm_and_weigh_every_frame() -> None:
    objective = _objective(target_norm="layer_norm")
    objective.train()  # pair_cosines must evaluate in eval mode and restore the mode
    student = _feature_set(_random_states(STUDENT_LAYERS + 1, STUDENT_DIM, [7, 30], seed=4))
    teacher = _feature_set(_random_states(TEACHER_LAYERS + 1, TEACHER_DIM, [8, 30], seed=8))
    cosines = pair_cosines(objective, student, teacher)  # u0: 1 frame truncated
    assert objective.training
    (i, j), head = objective.pairs[1], objective.heads.heads[1]
    with torch.no_grad():
        z = torch.cat(
            [head(s[i, :7].float()) for s in student.states[:1]]
            + [head(student.states[1][i].float())]
        )
        y = torch.cat([teacher.states[0][j, :7], teacher.states[1][j]]).float()
        y = layer_norm_targets(y[None], torch.ones(1, 37, dtype=torch.bool))[0]
    expected = torch.nn.functional.cosine_similarity(z, y, dim=-1).mean()
    assert cosines[f"s{i}->t{j}"] == pytest.approx(float(expected), abs=1e-6)


def test_pair_cosines_skip_ffn_targets_and_check_sizes() -> None:
    student = _feature_set(_random_states(STUDENT_LAYERS + 1, STUDENT_DIM, [9], seed=0))
    teacher = _feature_set(_random_states(TEACHER_LAYERS + 1, TEACHER_DIM, [9], seed=1))
    skipped = pair_cosines(_objective(target="ffn"), student, teacher)
    assert skipped == {} and "FFN outputs" in (skipped.skipped_reason or "")
    with pytest.raises(ValueError, match=r"teacher features .* width 32; .* width 48"):
        pair_cosines(_objective(), student, student)
    shallow = _feature_set(_random_states(2, TEACHER_DIM, [9], seed=1))
    with pytest.raises(ValueError, match=r"needs states 0\.\.4"):
        pair_cosines(_objective(), student, shallow)


def test_position_retrieval_separates_position_from_content() -> None:
    from colld.eval.mimicry import position_retrieval

    frames, dim = 40, 16
    position = _randn(frames, dim, seed=100).float()
    states = []
    for n in range(6):
        content = _randn(frames, dim, seed=200 + n).float()
        # state 0: content only; state 1: position only (+ a little content); state 2: mixed
        states.append(torch.stack([content, position + 0.05 * content, position + 2 * content]))
    values = position_retrieval(_feature_set(states))
    assert len(values) == 3
    assert values[0] < 0.15  # chance is 1/40
    assert values[1] > 0.95
    assert values[0] < values[2] < values[1]
    short = _feature_set([s[:, :5] for s in states])
    assert all(v != v for v in position_retrieval(short))  # NaN: no pair long enough
