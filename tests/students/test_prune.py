"""student.init=prune: activation importance, the plan, the copy, export, and its errors, on a
tiny random Whisper teacher (4 layers x 64, 4 heads of 16, FFN 256)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Same folder, on pytest's sys.path.
from test_students import TEACHER_FFN, TEACHER_HEADS, TEACHER_WIDTH, batch_for, tiny_teacher
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.data.batch import Batch
from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.objectives.heads import PredictionHeads
from colld.objectives.objective import ObjectiveConfig
from colld.students.build import (
    StudentSpec,
    build_student,
    plan_pruned_student,
    resolve_init,
    resolve_source_map,
    source_layers,
)
from colld.students.export import export_student
from colld.students.prune import PrunePlan, measure_importance, plan_pruning

HEAD_DIM = TEACHER_WIDTH // TEACHER_HEADS


def calibration(num: int = 3) -> list[Batch]:
    """Random log-mel batches (Whisper tiny front end: 16 mel bins), some rows padded."""
    gen = torch.Generator().manual_seed(11)
    batches = []
    for i in range(num):
        lengths = torch.tensor([40, 28 + 4 * i])
        features = torch.randn(2, 40, 16, generator=gen)
        features[1, lengths[1] :] = 0.0
        batches.append(Batch(ids=["a", "b"], features=features, feature_lengths=lengths,
                             durations=torch.ones(2)))  # fmt: skip
    return batches


def pruned(teacher: SpeechEncoder, **sizes: int) -> tuple[SpeechEncoder, PrunePlan]:
    spec = StudentSpec(init="prune", **sizes)
    plan = plan_pruned_student(teacher, spec, calibration())
    return build_student(teacher, spec, seed=0, plan=plan).eval(), plan


def states(encoder: SpeechEncoder) -> dict[int, torch.Tensor]:
    features, lengths = batch_for(encoder)
    with torch.no_grad():
        return encoder(features, lengths).hidden_states


FULL = dict(num_layers=4, hidden_dim=TEACHER_WIDTH, num_heads=TEACHER_HEADS, ffn_dim=TEACHER_FFN)


def test_pruning_to_the_teachers_own_sizes_is_the_teacher() -> None:
    """Every parameter is in the layout and lands where it belongs (sorted full index sets)."""
    teacher = tiny_teacher("whisper")
    student, plan = pruned(teacher, **FULL)
    assert plan.layers == [0, 1, 2, 3]
    expected, got = states(teacher), states(student)
    for j, state in expected.items():
        assert torch.equal(state, got[j]), f"hidden state {j}"


def _kill_units(teacher: SpeechEncoder) -> None:
    """Layer 2 (index 1) adds nothing (an identity block); head 2 of every other layer outputs
    zeros; FFN neurons 0..63 of every layer are dead (zero pre-activation, GELU(0) = 0)."""
    with torch.no_grad():
        for index, layer in enumerate(teacher.model.layers):
            if index == 1:
                for linear in (layer.self_attn.out_proj, layer.fc2):
                    linear.weight.zero_()
                    linear.bias.zero_()
                continue
            dims = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
            layer.self_attn.v_proj.weight[dims] = 0.0
            layer.self_attn.v_proj.bias[dims] = 0.0
            layer.fc1.weight[:64] = 0.0
            layer.fc1.bias[:64] = 0.0


def test_dead_heads_neurons_and_layers_are_pruned_and_the_output_is_unchanged() -> None:
    teacher = tiny_teacher("whisper")
    _kill_units(teacher)
    # HF ties the attention's inner width to the model width: dropping a head drops 16 residual
    # channels too, so the exact check keeps all heads and the head choice is checked apart.
    student, plan = pruned(
        teacher, num_layers=3, hidden_dim=TEACHER_WIDTH, num_heads=4, ffn_dim=TEACHER_FFN - 64
    )
    assert plan.layers == [0, 2, 3]  # the identity block goes
    assert plan.ffn.tolist() == [list(range(64, TEACHER_FFN))] * 3
    # What was dropped contributed exactly nothing: the student computes the teacher's states
    # (student layer i is teacher layer plan.layers[i]; different matmul sizes round apart).
    expected, got = states(teacher), states(student)
    for student_layer, teacher_layer in [(0, 0), (1, 1), (2, 3), (3, 4)]:
        torch.testing.assert_close(got[student_layer], expected[teacher_layer], atol=1e-5, rtol=0)
    # layer_map "source": each student layer predicts the teacher layer it was cut from.
    spec = StudentSpec(init="prune", num_layers=3)
    assert source_layers(teacher, spec, plan) == [1, 3, 4]
    source = resolve_source_map(ObjectiveConfig(layer_map="source"), teacher, spec, plan)
    assert source.layer_map == [1, 3, 4]
    assert source.validate(3, 4) == [(1, 1), (2, 3), (3, 4)]
    importance = measure_importance(teacher, calibration(), num_heads=TEACHER_HEADS)
    three_heads = plan_pruning(
        importance, num_layers=3, hidden_dim=48, num_heads=3, ffn_dim=64, head_dim=HEAD_DIM
    )
    assert three_heads.heads.tolist() == [[0, 1, 3]] * 3  # the silent head goes
    assert three_heads.attention_dims(0).tolist() == [*range(0, 32), *range(48, 64)]


def test_the_loudest_residual_channels_are_kept_and_the_heads_start_on_them() -> None:
    teacher = tiny_teacher("whisper")
    loud = [5, 17, 60]
    with torch.no_grad():  # every norm scales these channels up: they dominate what layers read
        for module in teacher.model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[loud] *= 50.0
    student, plan = pruned(teacher, hidden_dim=32, num_heads=2, ffn_dim=96, num_layers=2)
    assert set(loud) <= set(plan.residual.tolist())
    assert plan.residual.tolist() == sorted(plan.residual.tolist())
    assert len(plan.layers) == 2 and plan.heads.shape == (2, 2) and plan.ffn.shape == (2, 96)
    # The copy: e.g. fc1 of student layer 1 = teacher fc1 rows plan.ffn[1], columns residual.
    source = teacher.model.layers[plan.layers[1]].fc1.weight
    expected = source[plan.ffn[1]][:, plan.residual]
    assert torch.equal(student.model.layers[1].fc1.weight, expected)
    assert torch.equal(
        student.model.embed_positions.weight, teacher.model.embed_positions.weight[:, plan.residual]
    )
    heads = PredictionHeads([(1, 2), (2, 4)], 32, 64, init="select", channels=plan.residual)
    x = torch.randn(1, 3, 32)
    projected = heads({1: x, 2: x})[0]
    assert torch.equal(projected[..., plan.residual], x)
    others = sorted(set(range(64)) - set(plan.residual.tolist()))
    assert torch.equal(projected[..., others], torch.zeros(1, 3, 32))


def test_a_pruned_student_exports_and_reloads(tmp_path: Path) -> None:
    teacher = tiny_teacher("whisper")
    student, plan = pruned(teacher, hidden_dim=32, num_heads=2, ffn_dim=96, num_layers=2)
    out_dir = export_student(student, WhisperFeatureExtractor(feature_size=16), tmp_path / "s")
    reloaded = wrap_encoder(WhisperEncoder.from_pretrained(out_dir).eval())
    expected, got = states(student), states(reloaded)
    for j, state in expected.items():
        assert torch.equal(state, got[j]), f"hidden state {j}"


def test_importance_ignores_padded_frames() -> None:
    """Garbage in the padding of a row changes nothing: only valid frames are averaged."""
    teacher = tiny_teacher("whisper")
    clean = calibration()
    noisy = [Batch(ids=b.ids, features=b.features.clone(), feature_lengths=b.feature_lengths,
                   durations=b.durations) for b in clean]  # fmt: skip
    for batch in noisy:
        batch.features[1, int(batch.feature_lengths[1]) :] = 100.0
    a = measure_importance(teacher, clean, num_heads=TEACHER_HEADS)
    b = measure_importance(teacher, noisy, num_heads=TEACHER_HEADS)
    # Whisper's convs see a frame or two of padding at the edge: compare away from it.
    assert a.frames == b.frames == sum(int(x.feature_lengths.sum() + 1) // 2 for x in clean)
    torch.testing.assert_close(a.layers, b.layers, atol=0.05, rtol=0.05)


# --- errors -------------------------------------------------------------------------------------
def test_prune_errors() -> None:
    teacher = tiny_teacher("whisper")
    with pytest.raises(ValueError, match="keeps whole teacher heads of 16 dims.*heads of 12"):
        plan_pruned_student(
            teacher, StudentSpec(init="prune", hidden_dim=48, num_heads=4), calibration()
        )
    with pytest.raises(ValueError, match="student.init=prune needs a pruning plan"):
        build_student(teacher, StudentSpec(init="prune"), seed=0)
    empty = [Batch(ids=[], features=torch.zeros(0, 40, 16), feature_lengths=torch.zeros(0,
                   dtype=torch.long), durations=torch.zeros(0))]  # fmt: skip
    with pytest.raises(ValueError, match="calibration batches hold no valid frame"):
        measure_importance(teacher, empty, num_heads=TEACHER_HEADS)
    importance = measure_importance(teacher, calibration(1), num_heads=TEACHER_HEADS)
    with pytest.raises(
        ValueError, match="student ffn_dim 300 must be between 1 and the teacher's 256"
    ):
        plan_pruning(importance, num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=300,
                     head_dim=HEAD_DIM)  # fmt: skip
    wav2vec2 = tiny_teacher("wav2vec2")
    with pytest.raises(ValueError, match=r"supports the families \['whisper'\].*'wav2vec2'"):
        plan_pruned_student(wav2vec2, StudentSpec(init="prune"), [])
    with pytest.raises(ValueError, match="prune_seconds=0"):
        StudentSpec(init="prune", prune_seconds=0)


def test_source_layer_map_follows_the_init() -> None:
    """init=teacher copies uniform-map layers, so "source" is the uniform map; init=random
    copies none; an unresolved "source" and other strings are refused by name. init=auto
    prunes where whole heads fit, else selects."""
    teacher = tiny_teacher("whisper")
    selected = StudentSpec(num_layers=2, init="teacher")
    assert source_layers(teacher, selected) == [2, 4]
    unchanged = ObjectiveConfig(layer_map=[1, 1])
    assert resolve_source_map(unchanged, teacher, selected) is unchanged
    with pytest.raises(ValueError, match="student.init='random' copies no teacher layer"):
        source_layers(teacher, StudentSpec(init="random"))
    with pytest.raises(ValueError, match="init=prune needs the pruning plan"):
        source_layers(teacher, StudentSpec(init="prune"))
    with pytest.raises(ValueError, match="'source' is resolved from the student's init"):
        ObjectiveConfig(layer_map="source").validate(2, 4)
    with pytest.raises(ValueError, match="layer_map = 'uniform': expected a list"):
        ObjectiveConfig(layer_map="uniform").validate_static()
    with pytest.raises(ValueError, match="needs objective.mode = 'layer-to-layer'"):
        ObjectiveConfig(layer_map="source", mode="prediction-heads").validate_static()
    assert resolve_init(teacher, StudentSpec(num_layers=2)).init == "prune"  # heads of 16
    halves = StudentSpec(num_layers=2, hidden_dim=32, num_heads=4)  # heads of 8: cannot prune
    assert resolve_init(teacher, halves).init == "teacher"
    assert resolve_init(tiny_teacher("wav2vec2"), StudentSpec()).init == "teacher"
    with pytest.raises(ValueError, match=r"init=auto \(prune for this teacher\) needs a pruning"):
        build_student(teacher, StudentSpec(), seed=0)
