"""CTranslate2 model.bin parser + converter (synthetic files) and the embedded-model cache.

The writer below encodes the layout and the name map of ASSETS.md independently of
``colld.teachers.ctranslate2`` (it goes HF -> CT2), so a round trip checks the converter's
CT2 -> HF map rather than restating it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from colld.teachers import ctranslate2 as ct2
from colld.teachers import embedded

DTYPE_CODES = {
    np.dtype("float32"): 0,
    np.dtype("int8"): 1,
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("float16"): 4,
}
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
VOCAB_SIZE = 64


# ------------------------------------------------------------------ an independent writer
def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path,
    variables: dict[str, np.ndarray | tuple[int, np.ndarray]],
    aliases: dict[str, str],
    *,
    spec: str = "WhisperSpec",
    version: int = 6,
) -> dict[str, int]:
    """Write a model.bin; a (code, array) value forces a dtype code. Returns data offsets."""
    out = bytearray(struct.pack("<I", version) + _string(spec) + struct.pack("<I", 3))
    out += struct.pack("<I", len(variables))
    offsets = {}
    for name, value in variables.items():
        code, array = value if isinstance(value, tuple) else (DTYPE_CODES[value.dtype], value)
        out += _string(name) + struct.pack("<B", array.ndim)
        out += b"".join(struct.pack("<I", d) for d in array.shape)
        raw = np.ascontiguousarray(array).tobytes()
        out += struct.pack("<B", code) + struct.pack("<I", len(raw))
        offsets[name] = len(out)
        out += raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    path.write_bytes(bytes(out))
    return offsets


def tiny_hf_model(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=24,
        decoder_ffn_dim=40,
        max_source_positions=30,
        max_target_positions=20,
        pad_token_id=VOCAB_SIZE - len(SPECIAL_TOKENS),
        bos_token_id=VOCAB_SIZE - len(SPECIAL_TOKENS),
        eos_token_id=VOCAB_SIZE - len(SPECIAL_TOKENS),
        decoder_start_token_id=VOCAB_SIZE - len(SPECIAL_TOKENS) + 1,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises biases and norms to 0/1: make them informative
        for name, param in model.named_parameters():
            if "bias" in name or "layer_norm" in name:
                param.normal_()
    return model


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().astype(np.float16)


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """HF -> CTranslate2 WhisperSpec names (ASSETS.md table), float16."""
    sd = {k: v for k, v in model.state_dict().items()}
    variables: dict[str, np.ndarray] = {}

    def linear(ct2_name: str, hf_names: list[str], key_bias_slice: int | None = None) -> None:
        variables[f"{ct2_name}/weight"] = _np(torch.cat([sd[f"{n}.weight"] for n in hf_names]))
        biases = [
            torch.zeros(sd[f"{n}.weight"].shape[0]) if i == key_bias_slice else sd[f"{n}.bias"]
            for i, n in enumerate(hf_names)
        ]
        variables[f"{ct2_name}/bias"] = _np(torch.cat(biases))

    def norm(ct2_name: str, hf_name: str) -> None:
        variables[f"{ct2_name}/gamma"] = _np(sd[f"{hf_name}.weight"])
        variables[f"{ct2_name}/beta"] = _np(sd[f"{hf_name}.bias"])

    for side, hf_side in (("encoder", "model.encoder"), ("decoder", "model.decoder")):
        num_layers = getattr(model.config, f"{side}_layers")
        heads = getattr(model.config, f"{side}_attention_heads")
        variables[f"{side}/num_heads"] = np.array(heads, dtype=np.int16)
        for i in range(num_layers):
            c, h = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            attn = f"{h}.self_attn"
            linear(
                f"{c}/self_attention/linear_0",
                [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
                key_bias_slice=1,
            )
            linear(f"{c}/self_attention/linear_1", [f"{attn}.out_proj"])
            if side == "decoder":
                cross = f"{h}.encoder_attn"
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
                linear(f"{c}/attention/linear_0", [f"{cross}.q_proj"])
                linear(
                    f"{c}/attention/linear_1",
                    [f"{cross}.k_proj", f"{cross}.v_proj"],
                    key_bias_slice=0,
                )
                linear(f"{c}/attention/linear_2", [f"{cross}.out_proj"])
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
            linear(f"{c}/ffn/linear_0", [f"{h}.fc1"])
            linear(f"{c}/ffn/linear_1", [f"{h}.fc2"])
        norm(f"{side}/layer_norm", f"{hf_side}.layer_norm")
        variables[f"{side}/position_encodings/encodings"] = _np(
            sd[f"{hf_side}.embed_positions.weight"]
        )
    for conv in ("conv1", "conv2"):
        variables[f"encoder/{conv}/weight"] = _np(sd[f"model.encoder.{conv}.weight"])
        variables[f"encoder/{conv}/bias"] = _np(sd[f"model.encoder.{conv}.bias"])
    variables["decoder/embeddings/weight"] = _np(sd["model.decoder.embed_tokens.weight"])
    variables["decoder/activation"] = np.array(3, dtype=np.int8)
    variables["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    variables["decoder/scale_embeddings"] = np.array(0, dtype=np.int8)
    return variables


ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_ct2_dir(
    directory: Path, model: WhisperForConditionalGeneration, **overrides
) -> dict[str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    variables = {**ct2_variables(model), **overrides}
    offsets = write_model_bin(directory / "model.bin", variables, ALIASES)
    vocabulary = [f"tok{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS))] + SPECIAL_TOKENS
    (directory / "vocabulary.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    ct2_config = {"suppress_ids": [1, 2], "suppress_ids_begin": [3], "alignment_heads": [[1, 0]]}
    (directory / "config.json").write_text(json.dumps(ct2_config), encoding="utf-8")
    return offsets


def _rounded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().half().float()


# ------------------------------------------------------------------ parser
def test_parse_round_trip(tmp_path: Path) -> None:
    variables = {
        "a/weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a/half": np.array([1.5, -2.0], dtype=np.float16),
        "a/ids": np.array([7, 8, 9], dtype=np.int32),
        "a/count": np.array(5, dtype=np.int8),  # int8 scalars are flags, not quantisation
        "a/bf16": (5, np.array([0x3FC0, 0xC020], dtype=np.uint16)),  # 1.5, -2.5 in bfloat16
    }
    write_model_bin(tmp_path / "model.bin", variables, {"b/weight": "a/weight"})
    model = ct2.read_model_bin(tmp_path / "model.bin")
    assert (model.spec_name, model.spec_revision, model.binary_version) == ("WhisperSpec", 3, 6)
    assert list(model.variables) == list(variables)
    np.testing.assert_array_equal(model.get("b/weight"), variables["a/weight"])
    assert model.get("a/half").dtype == np.float16
    np.testing.assert_array_equal(model.get("a/ids"), [7, 8, 9])
    assert model.scalar("a/count") == 5
    np.testing.assert_array_equal(model.get("a/bf16"), np.array([1.5, -2.5], dtype=np.float32))
    assert model.aliases == {"b/weight": "a/weight"}
    with pytest.raises(KeyError, match="no variable 'nope'"):
        model.get("nope")


@pytest.mark.parametrize(
    ("name", "value", "what"),
    [
        ("enc/linear/weight", np.ones((4, 4), dtype=np.int8), "int8"),
        ("enc/linear/weight", np.ones((4, 4), dtype=np.int16), "int16"),
        ("enc/linear/weight_scale", np.ones(4, dtype=np.float32), "float32"),
    ],
)
def test_quantised_model_is_refused(
    tmp_path: Path, name: str, value: np.ndarray, what: str
) -> None:
    write_model_bin(tmp_path / "model.bin", {"ok": np.ones(2, np.float32), name: value}, {})
    with pytest.raises(ct2.Ct2QuantizedError, match=rf"'{name}' is {what}.*quantised.*float16"):
        ct2.read_model_bin(tmp_path / "model.bin")


def test_truncated_file_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    data = np.arange(100, dtype=np.float32)
    offsets = write_model_bin(path, {"x": np.ones(3, np.float32), "big": data}, {})
    whole = path.read_bytes()
    path.write_bytes(whole[: offsets["big"] + 50])
    with pytest.raises(ct2.Ct2FormatError) as err:
        ct2.read_model_bin(path)
    message = str(err.value)
    assert str(path) in message and f"byte offset {offsets['big']}" in message
    assert "data of 'big'" in message
    path.write_bytes(whole[:3])
    with pytest.raises(ct2.Ct2FormatError, match=r"byte offset 0: binary version"):
        ct2.read_model_bin(path)
    path.write_bytes(whole + b"junk")
    with pytest.raises(ct2.Ct2FormatError, match=rf"4 unexpected bytes .* offset {len(whole)}"):
        ct2.read_model_bin(path)


def test_corrupt_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_model_bin(path, {"x": np.ones(3, np.float32)}, {}, version=5)
    with pytest.raises(ct2.Ct2FormatError, match="binary version 5, expected 6"):
        ct2.read_model_bin(path)
    write_model_bin(path, {"x": (9, np.ones(3, np.float32))}, {})
    with pytest.raises(ct2.Ct2FormatError, match="unknown dtype code 9"):
        ct2.read_model_bin(path)
    assert ct2.is_ct2_dir(tmp_path)
    assert not ct2.is_ct2_dir(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.bin").write_bytes(b"\x89PNG not a model")
    assert not ct2.is_ct2_dir(tmp_path / "other")


# ------------------------------------------------------------------ converter
def test_full_model_round_trip_loads_strictly(tmp_path: Path) -> None:
    original = tiny_hf_model()
    write_ct2_dir(tmp_path, original)
    converted = ct2.ct2_to_hf_whisper(tmp_path, encoder_only=False)
    assert isinstance(converted, WhisperForConditionalGeneration)
    config = converted.config
    for key in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
        "decoder_start_token_id",
        "eos_token_id",
    ):
        assert getattr(config, key) == getattr(original.config, key), key
    expected = original.state_dict()
    got = converted.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], _rounded(value), rtol=0, atol=0, msg=key)
    assert converted.proj_out.weight is converted.model.decoder.embed_tokens.weight
    assert config.suppress_tokens == [1, 2] and config.begin_suppress_tokens == [3]

    features = torch.randn(1, 8, 60)  # HF's encoder wants 2 * max_source_positions frames
    decoder_input_ids = torch.tensor([[config.decoder_start_token_id, 5, 6]])
    reference = original.half().float()
    with torch.no_grad():
        torch.testing.assert_close(
            converted(features, decoder_input_ids=decoder_input_ids).logits,
            reference(features, decoder_input_ids=decoder_input_ids).logits,
        )
        generated = converted.generate(features, max_new_tokens=3)
    assert converted.generation_config.is_multilingual is False
    assert converted.generation_config.no_timestamps_token_id == VOCAB_SIZE - 1
    assert generated.shape[0] == 1 and 1 <= generated.shape[1] <= 3
    assert int(generated.max()) < VOCAB_SIZE


def test_encoder_only_and_teacher(tmp_path: Path) -> None:
    original = tiny_hf_model(seed=1)
    write_ct2_dir(tmp_path, original)
    encoder = ct2.ct2_to_hf_whisper(tmp_path, encoder_only=True)
    expected = original.model.encoder.state_dict()
    assert set(encoder.state_dict()) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(encoder.state_dict()[key], _rounded(value), rtol=0, atol=0)

    loaded = ct2.load_ct2_teacher(tmp_path)
    assert loaded.fingerprint == hashlib.sha256((tmp_path / "model.bin").read_bytes()).hexdigest()
    assert loaded.feature_extractor.feature_size == 8
    assert not loaded.encoder.training
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    out = loaded.encoder(torch.randn(1, 21, 8), torch.tensor([21]))
    assert out.hidden_states[2].shape == (1, 11, 16) and out.frame_rate == 50.0


def test_unmappable_variable_and_unsupported_scalars_are_refused(tmp_path: Path) -> None:
    model = tiny_hf_model()
    write_ct2_dir(tmp_path, model, **{"encoder/layer_0/mystery/weight": np.ones(2, np.float16)})
    with pytest.raises(ct2.Ct2FormatError, match="no Hugging Face Whisper counterpart.*mystery"):
        ct2.ct2_to_hf_whisper(tmp_path, encoder_only=True)
    write_ct2_dir(tmp_path, model, **{"decoder/pre_norm": np.array(0, np.int8)})
    with pytest.raises(ct2.Ct2FormatError, match="decoder/pre_norm = 0.*needs 1"):
        ct2.ct2_to_hf_whisper(tmp_path, encoder_only=False)


def test_wrong_name_map_would_be_caught(tmp_path: Path) -> None:
    """Guard for the round trip: a swapped q/k in the file changes the converted weights."""
    model = tiny_hf_model()
    variables = ct2_variables(model)
    name = "encoder/layer_0/self_attention/linear_0/weight"
    q, k, v = np.split(variables[name], 3)
    write_ct2_dir(tmp_path, model, **{name: np.concatenate([k, q, v])})
    converted = ct2.ct2_to_hf_whisper(tmp_path, encoder_only=True)
    assert not torch.equal(
        converted.layers[0].self_attn.q_proj.weight,
        _rounded(model.model.encoder.layers[0].self_attn.q_proj.weight),
    )


# ------------------------------------------------------------------ embedded cache
def _fake_packages(root: Path, model_bin: bytes) -> None:
    """Two importable data packages holding model.bin in two parts (like whisper-base)."""
    half = len(model_bin) // 2
    for package, part, data in (
        ("colldfake_part1", "model.bin.part1", model_bin[:half]),
        ("colldfake_part2", "model.bin.part2", model_bin[half:]),
    ):
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("", encoding="utf-8")
        (root / package / "data" / part).write_bytes(data)


@pytest.fixture
def fake_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> embedded.EmbeddedModel:
    source = tmp_path / "source"
    write_ct2_dir(source, tiny_hf_model())
    model_bin = (source / "model.bin").read_bytes()
    packages = tmp_path / "site"
    _fake_packages(packages, model_bin)
    for name in ("vocabulary.txt", "config.json"):
        (packages / "colldfake_part1" / "data" / name).write_bytes((source / name).read_bytes())
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    fake = embedded.EmbeddedModel(
        name="fake",
        description="tiny synthetic Whisper",
        licence="MIT",
        requirements=("colldfake-part1==1.0", "colldfake-part2==1.0"),
        model_parts=(
            embedded.PackagedFile(package="colldfake_part1", path="data/model.bin.part1"),
            embedded.PackagedFile(package="colldfake_part2", path="data/model.bin.part2"),
        ),
        side_files=(
            embedded.PackagedFile(package="colldfake_part1", path="data/vocabulary.txt"),
            embedded.PackagedFile(package="colldfake_part1", path="data/config.json"),
        ),
        sha256=hashlib.sha256(model_bin).hexdigest(),
        size=len(model_bin),
    )
    monkeypatch.setitem(embedded.EMBEDDED, "fake", fake)
    return fake


def test_embedded_join_verify_and_marker(
    fake_embedded: embedded.EmbeddedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = embedded.embedded_model_dir("fake")
    assert model_dir == tmp_path / "cache" / "embedded" / "fake"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.bin",
        "model.bin.verified.json",
        "vocabulary.txt",
    ]
    assert ct2.file_sha256(model_dir / "model.bin") == fake_embedded.sha256

    hashed = []
    real_sha = embedded.file_sha256
    monkeypatch.setattr(embedded, "file_sha256", lambda p: hashed.append(p) or real_sha(p))
    embedded.embedded_model_dir("fake")
    assert hashed == []  # marker matched size + mtime: no rehash

    (model_dir / "model.bin").write_bytes(b"corrupted cache")
    assert embedded.embedded_model_dir("fake") == model_dir  # rehashed, rejoined
    assert hashed == [model_dir / "model.bin"]
    assert real_sha(model_dir / "model.bin") == fake_embedded.sha256

    loaded = embedded.load_embedded_teacher("fake")
    assert loaded.fingerprint == fake_embedded.sha256 and loaded.source == "fake"
    assert loaded.encoder.num_layers == 2


def test_embedded_checksum_mismatch_names_both_hashes(
    fake_embedded: embedded.EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = replace(fake_embedded, sha256="0" * 64)
    monkeypatch.setitem(embedded.EMBEDDED, "fake", wrong)
    with pytest.raises(embedded.EmbeddedModelError) as err:
        embedded.embedded_model_dir("fake")
    assert fake_embedded.sha256 in str(err.value) and "0" * 64 in str(err.value)
    assert "--force-reinstall" in str(err.value)


def test_embedded_missing_package_gives_pip_line(
    fake_embedded: embedded.EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = replace(
        fake_embedded,
        requirements=("colld-not-installed==9.9",),
        model_parts=(embedded.PackagedFile(package="colld_not_installed", path="model.bin"),),
    )
    monkeypatch.setitem(embedded.EMBEDDED, "fake", missing)
    with pytest.raises(
        embedded.EmbeddedModelError, match=r"pip install 'colld-not-installed==9\.9'"
    ):
        embedded.embedded_model_dir("fake")
    with pytest.raises(KeyError, match="whisper-base"):
        embedded.embedded_model_dir("whisper-huge")


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(embedded.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "colld"
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "mine"))
    assert embedded.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(embedded.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_root() == Path.home() / ".cache" / "colld"


def test_registry_entries_are_complete() -> None:
    assert set(embedded.EMBEDDED) == {"whisper-base", "whisper-tiny.en"}
    for model in embedded.EMBEDDED.values():
        assert model.licence == "MIT" and model.description
        assert all("==" in r for r in model.requirements)
        assert len(model.sha256) == 64 and model.size > 0
