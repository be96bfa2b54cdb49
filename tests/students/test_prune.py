"""student.init=prune: activation importance, the plan, the copy, export, and its errors, on
tiny random teachers (4 layers x 64, 4 heads of 16, FFN 256): Whisper, and the waveform
families wav2vec 2.0 (post-LN and stable-layer-norm), HuBERT and data2vec-audio, whose grouped
positional conv (2 groups of 32 channels) keeps the same number of channels per group."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

# Same folder, on pytest's sys.path.
from test_students import TEACHER_FFN, TEACHER_HEADS, TEACHER_WIDTH, batch_for, tiny_teacher
from transformers import AutoModel, WhisperFeatureExtractor
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
from colld.students.prune import (
    PrunePlan,
    copy_pruned_weights,
    measure_importance,
    plan_pruning,
)
from colld.teachers.hf import wrap_hf_teacher

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


def waveform_calibration(num: int = 3) -> list[Batch]:
    """Random 16 kHz waveform batches (the wav2vec 2.0 family's front end), some rows padded."""
    gen = torch.Generator().manual_seed(11)
    batches = []
    for i in range(num):
        lengths = torch.tensor([1200, 800 + 100 * i])
        features = torch.randn(2, 1200, generator=gen)
        features[1, lengths[1] :] = 0.0
        batches.append(Batch(ids=["a", "b"], features=features, feature_lengths=lengths,
                             durations=torch.ones(2)))  # fmt: skip
    return batches


def calibration_for(teacher: SpeechEncoder) -> list[Batch]:
    return calibration() if teacher.family == "whisper" else waveform_calibration()


def pruned(teacher: SpeechEncoder, **sizes: int) -> tuple[SpeechEncoder, PrunePlan]:
    spec = StudentSpec(init="prune", **sizes)
    plan = plan_pruned_student(teacher, spec, calibration_for(teacher))
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


def _prune_dead_units_and_compare(teacher: SpeechEncoder) -> PrunePlan:
    """Prune a teacher whose layer 2 is an identity block and whose FFN neurons 0..63 are dead
    to 3 layers and the live neurons; check the plan drops exactly those and that the student
    computes the teacher's states (student layer i is teacher layer plan.layers[i]; different
    matmul sizes round apart). HF ties the attention's inner width to the model width, so
    dropping a head would drop residual channels too: all heads are kept here."""
    student, plan = pruned(
        teacher, num_layers=3, hidden_dim=TEACHER_WIDTH, num_heads=4, ffn_dim=TEACHER_FFN - 64
    )
    assert plan.layers == [0, 2, 3]  # the identity block goes
    assert plan.ffn.tolist() == [list(range(64, TEACHER_FFN))] * 3
    expected, got = states(teacher), states(student)
    for student_layer, teacher_layer in [(0, 0), (1, 1), (2, 3), (3, 4)]:
        torch.testing.assert_close(got[student_layer], expected[teacher_layer], atol=1e-5, rtol=0)
    return plan


def test_dead_heads_neurons_and_layers_are_pruned_and_the_output_is_unchanged() -> None:
    teacher = tiny_teacher("whisper")
    _kill_units(teacher)
    plan = _prune_dead_units_and_compare(teacher)
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
    supported = r"\['data2vec-audio', 'hubert', 'wav2vec2', 'whisper'\]"
    for family in ("wavlm", "wav2vec2-bert"):
        with pytest.raises(ValueError, match=rf"supports the families {supported}.*'{family}'"):
            plan_pruned_student(tiny_teacher(family), StudentSpec(init="prune"), [])
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
    assert resolve_init(tiny_teacher("wav2vec2"), StudentSpec()).init == "prune"
    assert resolve_init(tiny_teacher("wav2vec2-bert"), StudentSpec()).init == "teacher"
    with pytest.raises(ValueError, match=r"init=auto \(prune for this teacher\) needs a pruning"):
        build_student(teacher, StudentSpec(), seed=0)


# --- waveform families: wav2vec 2.0, HuBERT, data2vec-audio -----------------------------------
HF_FAMILIES = ["wav2vec2", "wav2vec2-stable", "hubert", "data2vec-audio"]
GROUPS, GROUP_SIZE = 2, TEACHER_WIDTH // 2  # the tiny models' positional conv


def _effective_pos_conv(encoder: SpeechEncoder) -> torch.Tensor:
    """g * v / ||v|| (norm over dims 0, 1 for each tap) of wav2vec2 / HuBERT's pos conv, from
    the state dict (either weight-norm naming). Shape: (D, D / G, K)."""
    state = encoder.model.state_dict()
    prefix = "encoder.pos_conv_embed.conv."
    g = state.get(prefix + "parametrizations.weight.original0", state.get(prefix + "weight_g"))
    v = state.get(prefix + "parametrizations.weight.original1", state.get(prefix + "weight_v"))
    return g * v / v.norm(dim=(0, 1), keepdim=True)


def _cut_grouped(weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The reference cut of a grouped conv weight (D, D / G, K): output channel r of the kept
    set reads the kept channels of r's group, indexed within the group."""
    kept = residual.tolist()
    rows = []
    for channel in kept:
        group = channel // GROUP_SIZE
        inputs = [c - group * GROUP_SIZE for c in kept if c // GROUP_SIZE == group]
        rows.append(weight[channel][inputs])
    return torch.stack(rows)


@pytest.mark.parametrize(
    "family, overrides",
    [*((family, {}) for family in HF_FAMILIES), ("wav2vec2", {"num_conv_pos_embedding_groups": 1})],
    ids=[*HF_FAMILIES, "wav2vec2-one-group"],
)
def test_pruning_a_waveform_teacher_to_its_own_sizes_is_the_teacher(
    family: str, overrides: dict
) -> None:
    """Every parameter is in the layout (the conv front end whole, the weight-normed or stacked
    grouped pos conv cut per group) and lands where it belongs: bit-exact hidden states."""
    teacher = tiny_teacher(family, **overrides)
    student, plan = pruned(teacher, **FULL)
    assert plan.layers == [0, 1, 2, 3] and plan.residual.tolist() == list(range(TEACHER_WIDTH))
    expected, got = states(teacher), states(student)
    for j, state in expected.items():
        assert torch.equal(state, got[j]), f"hidden state {j}"


def _kill_hf_units(teacher: SpeechEncoder) -> None:
    """As ``_kill_units``: layer 2 (index 1) adds nothing to its residual stream, head 2 of
    every other layer outputs zeros, FFN neurons 0..63 of every layer are dead."""
    with torch.no_grad():
        for index, layer in enumerate(teacher.model.encoder.layers):
            if index == 1:
                for linear in (layer.attention.out_proj, layer.feed_forward.output_dense):
                    linear.weight.zero_()
                    linear.bias.zero_()
                continue
            dims = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
            layer.attention.v_proj.weight[dims] = 0.0
            layer.attention.v_proj.bias[dims] = 0.0
            layer.feed_forward.intermediate_dense.weight[:64] = 0.0
            layer.feed_forward.intermediate_dense.bias[:64] = 0.0


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2-stable"])
def test_dead_units_of_a_wav2vec2_teacher_are_pruned_and_the_output_is_unchanged(
    family: str,
) -> None:
    """Post-LN (wav2vec2) and pre-LN (stable) layers. In the post-LN teacher the silent block
    still runs its two LayerNorms over an already normalised state, which changes it by
    rounding only (about 1e-6): hence assert_close."""
    teacher = tiny_teacher(family)
    _kill_hf_units(teacher)
    plan = _prune_dead_units_and_compare(teacher)
    assert source_layers(teacher, StudentSpec(init="prune", num_layers=3), plan) == [1, 3, 4]
    importance = measure_importance(teacher, waveform_calibration(), num_heads=TEACHER_HEADS)
    assert importance.groups == GROUPS
    three_heads = plan_pruning(
        importance, num_layers=3, hidden_dim=48, num_heads=3, ffn_dim=64, head_dim=HEAD_DIM
    )
    assert three_heads.heads.tolist() == [[0, 1, 3]] * 3  # the silent head goes


def _scale_residual_norms(teacher: SpeechEncoder, channels: list[int], factor: float) -> None:
    """Scale ``channels`` of every LayerNorm over the residual stream (not the conv front
    end's): what every layer reads of them, i.e. their importance."""
    with torch.no_grad():
        for module in teacher.model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.normalized_shape == (
                TEACHER_WIDTH,
            ):
                module.weight[channels] *= factor
                module.bias[channels] *= factor


def test_residual_channels_are_kept_group_balanced_and_the_pos_conv_is_cut_per_group() -> None:
    # Quiet channels, 8 in each group: every residual norm outputs zeros there.
    teacher = tiny_teacher("wav2vec2")
    quiet = [*range(0, 16, 2), *range(40, 48)]
    _scale_residual_norms(teacher, quiet, 0.0)
    student, plan = pruned(teacher, num_layers=4, hidden_dim=48, num_heads=3, ffn_dim=TEACHER_FFN)
    kept = plan.residual.tolist()
    assert kept == sorted(set(range(TEACHER_WIDTH)) - set(quiet))  # exactly the quiet ones go
    # The student's weight-normed pos conv: its effective weight is the teacher's, cut per group.
    got = student.model.encoder.pos_conv_embed.conv.weight.detach()
    expected = _cut_grouped(_effective_pos_conv(teacher), plan.residual)
    assert got.shape == (48, 24, 8)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # And as a module: on a stream whose dropped channels are zero, the student's pos conv
    # computes the teacher's on the kept channels.
    x = torch.randn(2, 20, TEACHER_WIDTH)
    x[..., quiet] = 0.0
    with torch.no_grad():
        teacher_out = teacher.model.encoder.pos_conv_embed(x)[..., plan.residual]
        student_out = student.model.encoder.pos_conv_embed(x[..., plan.residual])
    torch.testing.assert_close(student_out, teacher_out, atol=1e-5, rtol=0)

    # Loud channels all in group 0: the global top 32 would take more than 16 there.
    teacher = tiny_teacher("wav2vec2")
    loud = list(range(24))
    _scale_residual_norms(teacher, loud, 50.0)
    importance = measure_importance(teacher, waveform_calibration(), num_heads=TEACHER_HEADS)
    global_top = importance.residual.topk(32).indices
    assert int((global_top < GROUP_SIZE).sum()) > 16
    plan = plan_pruning(
        importance, num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=96, head_dim=HEAD_DIM
    )
    kept = plan.residual.tolist()
    assert kept == sorted(kept) and len(kept) == 32
    assert set(kept[:16]) <= set(loud) and all(GROUP_SIZE <= c for c in kept[16:])
    order = importance.residual[GROUP_SIZE:].argsort(descending=True)[:16] + GROUP_SIZE
    assert kept[16:] == sorted(order.tolist())  # group 1 by its own importance


@pytest.mark.parametrize("naming", ["parametrizations", "weight_g/weight_v"])
def test_the_students_pos_conv_weight_is_the_teachers_effective_weight_cut(naming: str) -> None:
    """Pruning v changes ||v||: g is rescaled so that the effective weight is the cut. A teacher
    saved with torch's older weight_norm (weight_g / weight_v) is read too."""
    teacher = tiny_teacher("hubert")
    if naming == "weight_g/weight_v":
        conv = teacher.model.encoder.pos_conv_embed.conv
        torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")  # keeps g * v / ||v||
        weight = conv.weight.detach().clone()  # a plain tensor for the frozen teacher
        del conv.weight
        conv.weight = torch.nn.Parameter(weight, requires_grad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notice
            torch.nn.utils.weight_norm(conv, name="weight", dim=2)
        assert "encoder.pos_conv_embed.conv.weight_g" in teacher.model.state_dict()
    student, plan = pruned(teacher, num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=128)
    assert [int((plan.residual // GROUP_SIZE == g).sum()) for g in range(GROUPS)] == [16, 16]
    got = student.model.encoder.pos_conv_embed.conv.weight.detach()
    expected = _cut_grouped(_effective_pos_conv(teacher), plan.residual)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # data2vec-audio's stacked grouped convs (no weight norm) are cut the same way.
    teacher = tiny_teacher("data2vec-audio")
    student, plan = pruned(teacher, num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=128)
    for index, layer in enumerate(student.model.encoder.pos_conv_embed.layers):
        source = teacher.model.encoder.pos_conv_embed.layers[index].conv
        assert torch.equal(layer.conv.weight, _cut_grouped(source.weight, plan.residual))
        assert torch.equal(layer.conv.bias, source.bias[plan.residual])


def test_auto_init_prunes_a_wav2vec2_teacher_and_the_student_exports(tmp_path: Path) -> None:
    """init=auto: the default deep-narrow student keeps whole heads (2 of 16 dims over 32),
    so a wav2vec2 teacher is pruned; the student trains a step, exports and reloads."""
    teacher = tiny_teacher("wav2vec2")
    spec = StudentSpec()
    assert resolve_init(teacher, spec).init == "prune"
    plan = plan_pruned_student(teacher, spec, waveform_calibration())
    student = build_student(teacher, spec, seed=0, plan=plan)
    assert student.hidden_dim == 32 and plan.heads.shape[1] == 2
    features, lengths = batch_for(student)
    out = student(features, lengths)
    sum(state.pow(2).mean() for state in out.hidden_states.values()).backward()
    conv = student.model.encoder.pos_conv_embed.conv.parametrizations.weight
    assert conv.original0.grad is not None and conv.original1.grad is not None
    extractor = wrap_hf_teacher(teacher.model).feature_extractor
    out_dir = export_student(student.eval(), extractor, tmp_path / "s")
    reloaded = wrap_encoder(AutoModel.from_pretrained(out_dir).eval())
    expected, got = states(student), states(reloaded)
    for j, state in expected.items():
        assert torch.equal(state, got[j]), f"hidden state {j}"


def test_a_teacher_without_a_mask_embedding_can_be_pruned() -> None:
    """HF creates masked_spec_embed only for mask_time_prob or mask_feature_prob > 0; the
    student always has one (colld masks) and keeps its own init where the teacher has none."""
    teacher = tiny_teacher("wav2vec2", mask_time_prob=0.0, mask_feature_prob=0.0)
    assert "masked_spec_embed" not in teacher.model.state_dict()
    student, plan = pruned(teacher, num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=128)
    assert student.model.masked_spec_embed.shape == (32,)


def test_grouped_prune_errors() -> None:
    teacher = tiny_teacher("wav2vec2", num_conv_pos_embedding_groups=32)
    importance = measure_importance(teacher, waveform_calibration(1), num_heads=TEACHER_HEADS)
    with pytest.raises(ValueError, match="each of the teacher's 32 positional-conv groups.*"
                       "hidden_dim 16 is not divisible by 32"):  # fmt: skip
        plan_pruning(importance, num_layers=2, hidden_dim=16, num_heads=1, ffn_dim=64,
                     head_dim=HEAD_DIM)  # fmt: skip
    # A hand-made plan that keeps group 0 only: a grouped conv cannot hold it.
    teacher = tiny_teacher("wav2vec2")
    spec = StudentSpec(init="prune", num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=128)
    lopsided = PrunePlan(layers=[0, 1], residual=torch.arange(32),
                         heads=torch.tensor([[0, 1], [0, 1]]),
                         ffn=torch.arange(128).repeat(2, 1), head_dim=HEAD_DIM)  # fmt: skip
    with pytest.raises(ValueError, match=r"keeps \[32, 0\] residual channels in the teacher's 2"):
        build_student(teacher, spec, seed=0, plan=lopsided)
    # A student parameter the layout does not know is refused by name.
    plan = plan_pruned_student(teacher, spec, waveform_calibration(1))
    student = build_student(teacher, spec, seed=0, plan=plan)
    student.model.encoder.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="encoder.extra has no entry in the wav2vec2 pruning"):
        copy_pruned_weights(teacher, student, plan)
