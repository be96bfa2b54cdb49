"""CTranslate2 (faster-whisper) Whisper directories -> Hugging Face Whisper models.

A CTranslate2 Whisper directory holds ``model.bin`` (binary version 6), ``config.json``
(alignment heads, language ids, suppressed tokens), ``tokenizer.json`` and
``vocabulary.txt`` (or ``vocabulary.json``). ``read_model_bin`` parses ``model.bin`` into
numpy arrays (hand-written: the ``ctranslate2`` package can load the model for its own
runtime but offers no reader that returns the weights); ``ct2_to_hf_whisper`` maps them onto
``WhisperForConditionalGeneration`` or ``WhisperEncoder``. Every config size is read off the
tensor shapes and scalars. Only float models (float32/float16/bfloat16) are supported.

model.bin layout (little-endian): uint32 version; string spec name; uint32 spec revision;
uint32 number of variables; per variable: string name, uint8 rank, rank x uint32 dims,
uint8 dtype, uint32 byte count, raw row-major data; then uint32 number of aliases and
(alias, target) string pairs. A string is a uint16 byte length (counting a trailing NUL)
and the bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from colld.encoders.whisper import WhisperSpeechEncoder
from colld.teachers.base import LoadedModel

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSION = 6
MODEL_FILE = "model.bin"
# CTranslate2 DataType codes -> numpy dtypes (bfloat16 is read as uint16 and widened).
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),
}
_QUANTISED_DTYPES = {1, 2}
# CTranslate2 ActivationType codes -> Hugging Face activation names.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}
_GELU = 3  # WhisperSpec default when the scalar is absent
# Multilingual Whisper vocabularies have 51865+ tokens (openai/whisper's rule).
_MULTILINGUAL_MIN_VOCAB = 51865


class Ct2FormatError(ValueError):
    """A model.bin that cannot be read; the message names the file and the byte offset."""


class Ct2QuantizedError(Ct2FormatError):
    """An int8/int16 quantised CTranslate2 model (colld needs float weights)."""


@dataclass(frozen=True, kw_only=True)
class Ct2Model:
    """A parsed model.bin.

    variables: name -> array (scalars have shape ()); float16 stays float16, bfloat16 is
        widened to float32 (exactly).
    aliases: alias name -> the variable name it stands for (e.g. a tied projection).
    """

    path: Path
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """The array for ``name`` (aliases resolved); KeyError names the file."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise KeyError(f"{self.path}: no variable {name!r} in this CTranslate2 model")
        return self.variables[target]

    def scalar(self, name: str) -> int:
        value = self.get(name)
        if value.shape != ():
            raise Ct2FormatError(f"{self.path}: {name!r} should be a scalar, found {value.shape}")
        return int(value)


class _Reader:
    """Sequential little-endian reads that fail with the file and the offset."""

    def __init__(self, data: bytearray, path: Path) -> None:
        self.data = data
        self.view = memoryview(data)
        self.path = path
        self.offset = 0

    def take(self, num_bytes: int, what: str) -> memoryview:
        end = self.offset + num_bytes
        if end > len(self.data):
            raise Ct2FormatError(
                f"{self.path}: truncated or corrupt at byte offset {self.offset}: {what} needs "
                f"{num_bytes} bytes but the file ends at {len(self.data)}"
            )
        chunk = self.view[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        start = self.offset
        length = self.unpack("<H", f"length of {what}")
        raw = bytes(self.take(length, what))
        if not raw.endswith(b"\0"):
            raise Ct2FormatError(
                f"{self.path}: corrupt {what} at byte offset {start}: no trailing NUL"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise Ct2FormatError(
                f"{self.path}: corrupt {what} at byte offset {start}: not UTF-8 ({err})"
            ) from None


def _quantised_message(path: Path, name: str, dtype_name: str) -> str:
    return (
        f"{path}: variable {name!r} is {dtype_name}: this is a quantised CTranslate2 model "
        f"(e.g. converted with --quantization int8). colld needs float weights; reconvert "
        f"with ct2-transformers-converter --quantization float16 (or float32)"
    )


def _read_variable(reader: _Reader) -> tuple[str, np.ndarray]:
    start = reader.offset
    name = reader.string("variable name")
    rank = reader.unpack("<B", f"rank of {name!r}")
    shape = tuple(reader.unpack("<I", f"dims of {name!r}") for _ in range(rank))
    code = reader.unpack("<B", f"dtype of {name!r}")
    if code not in _DTYPES:
        raise Ct2FormatError(
            f"{reader.path}: variable {name!r} at byte offset {start} has unknown dtype code "
            f"{code} (expected one of {sorted(_DTYPES)})"
        )
    dtype_name, dtype = _DTYPES[code]
    if rank > 0 and (code in _QUANTISED_DTYPES or name.endswith("_scale")):
        raise Ct2QuantizedError(_quantised_message(reader.path, name, dtype_name))
    num_bytes = reader.unpack("<I", f"byte count of {name!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if num_bytes != expected:
        raise Ct2FormatError(
            f"{reader.path}: variable {name!r} at byte offset {start} declares {num_bytes} bytes "
            f"but {dtype_name} {list(shape)} needs {expected}"
        )
    # A view into the file's (writable) buffer: no copy.
    array = np.frombuffer(reader.take(num_bytes, f"data of {name!r}"), dtype=dtype).reshape(shape)
    if dtype_name == "bfloat16":  # bf16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return name, array


def read_model_bin(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 model.bin (binary version 6) into named numpy arrays.

    Raises Ct2QuantizedError for int8/int16 weights or ``*_scale`` variables, and
    Ct2FormatError (file and byte offset named) for truncated or corrupt files.
    """
    path = Path(path)
    size = path.stat().st_size
    data = bytearray(size)
    with path.open("rb") as f:
        if f.readinto(data) != size:
            raise Ct2FormatError(f"{path}: could not read all {size} bytes")
    reader = _Reader(data, path)
    version = reader.unpack("<I", "binary version")
    if version != SUPPORTED_BINARY_VERSION:
        raise Ct2FormatError(
            f"{path}: CTranslate2 binary version {version}, expected {SUPPORTED_BINARY_VERSION}"
        )
    spec_name = reader.string("spec name")
    spec_revision = reader.unpack("<I", "spec revision")
    num_variables = reader.unpack("<I", "number of variables")
    variables: dict[str, np.ndarray] = {}
    for _ in range(num_variables):
        name, array = _read_variable(reader)
        variables[name] = array
    num_aliases = reader.unpack("<I", "number of aliases")
    aliases: dict[str, str] = {}
    for _ in range(num_aliases):
        alias = reader.string("alias name")
        aliases[alias] = reader.string(f"target of alias {alias!r}")
    if reader.offset != size:
        raise Ct2FormatError(
            f"{path}: {size - reader.offset} unexpected bytes after the aliases at byte offset "
            f"{reader.offset}"
        )
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"{path}: alias {alias!r} points to unknown {target!r}")
    return Ct2Model(
        path=path,
        binary_version=version,
        spec_name=spec_name,
        spec_revision=spec_revision,
        variables=variables,
        aliases=aliases,
    )


def is_ct2_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory whose model.bin starts with a CTranslate2 header."""
    model_bin = Path(path) / MODEL_FILE
    if not model_bin.is_file():
        return False
    with model_bin.open("rb") as f:
        head = f.read(6)
        if len(head) < 6:
            return False
        version, length = struct.unpack("<IH", head)
        name = f.read(length)
    return 1 <= version <= SUPPORTED_BINARY_VERSION and name.endswith(b"Spec\0")


def file_sha256(path: str | Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- name map (CT2 -> HF)
# Per layer, CTranslate2 module -> Hugging Face module (under encoder.layers.i / decoder.layers.i).
_LAYER_MODULES = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_1": "self_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
    # decoder only: cross-attention
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
}
# Fused projections stacked along dim 0 -> the Hugging Face projections, in order.
_FUSED_MODULES = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),  # decoder only
}
_TOP_MODULES = {"conv1": "conv1", "conv2": "conv2", "layer_norm": "layer_norm"}
_TOP_TENSORS = {
    "encoder/position_encodings/encodings": "encoder.embed_positions.weight",
    "decoder/position_encodings/encodings": "decoder.embed_positions.weight",
    "decoder/embeddings/weight": "decoder.embed_tokens.weight",
}
_PARAM_NAMES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
# Scalars: name -> the only value the Hugging Face model can reproduce (None: read elsewhere).
_SCALARS: dict[str, int | None] = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": None,
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": None,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_heads": None,  # generation only (from config.json)
    "decoder/alignment_layer": None,
}
_LAYER_NAME = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias|gamma|beta)$")
_TOP_NAME = re.compile(r"^(encoder|decoder)/([a-z_0-9]+)/(weight|bias|gamma|beta)$")
# The tied output projection: CTranslate2 aliases it to the token embeddings.
_PROJECTION = "decoder/projection/weight"


def _map_variable(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One CT2 variable -> (HF key without the ``model.`` prefix, array) pairs; [] if unknown.

    The key slice of a fused q/k/v bias is dropped: HF has no key bias, and dropping it is
    exact (q . b_k is the same for every key of a query, so softmax ignores it).
    """
    if name in _TOP_TENSORS:
        return [(_TOP_TENSORS[name], array)]
    if match := _LAYER_NAME.match(name):
        side, index, module, param = match.groups()
        prefix = f"{side}.layers.{index}."
        if module in _LAYER_MODULES:
            return [(f"{prefix}{_LAYER_MODULES[module]}.{_PARAM_NAMES[param]}", array)]
        if module in _FUSED_MODULES:
            targets = _FUSED_MODULES[module]
            parts = np.split(array, len(targets), axis=0)
            return [
                (f"{prefix}{target}.{_PARAM_NAMES[param]}", part)
                for target, part in zip(targets, parts, strict=True)
                if not (param == "bias" and target.endswith("k_proj"))
            ]
        return []
    if (match := _TOP_NAME.match(name)) and match.group(2) in _TOP_MODULES:
        side, module, param = match.groups()
        return [(f"{side}.{_TOP_MODULES[module]}.{_PARAM_NAMES[param]}", array)]
    return []


def ct2_whisper_state_dict(
    model: Ct2Model, *, encoder_only: bool, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """HF state dict for ``WhisperForConditionalGeneration`` (or ``WhisperEncoder``).

    Every CT2 variable must map somewhere (or be a known scalar); anything else raises.
    """
    _check_spec(model)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, array in model.variables.items():
        if name in _SCALARS:
            continue
        if encoder_only and name.startswith("decoder/"):
            continue
        mapped = _map_variable(name, array)
        if not mapped:
            unknown.append(name)
        for key, part in mapped:
            tensor = torch.from_numpy(np.ascontiguousarray(part)).to(dtype)
            if encoder_only:
                state[key.removeprefix("encoder.")] = tensor
            else:
                state[f"model.{key}"] = tensor
    if unknown:
        raise Ct2FormatError(
            f"{model.path}: variables with no Hugging Face Whisper counterpart: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}"
        )
    if not encoder_only:
        embeddings = state["model.decoder.embed_tokens.weight"]
        projection = model.aliases.get(_PROJECTION)
        if projection is not None and projection != "decoder/embeddings/weight":
            raise Ct2FormatError(
                f"{model.path}: {_PROJECTION} aliases {projection!r}; only a projection tied to "
                f"decoder/embeddings/weight is supported"
            )
        state["proj_out.weight"] = embeddings  # tied (tie_word_embeddings=True)
    return state


def _check_spec(model: Ct2Model) -> None:
    if model.spec_name != "WhisperSpec":
        raise Ct2FormatError(f"{model.path}: spec {model.spec_name!r}, expected 'WhisperSpec'")
    for name, required in _SCALARS.items():
        if required is not None and name in model.variables and model.scalar(name) != required:
            raise Ct2FormatError(
                f"{model.path}: {name} = {model.scalar(name)}, but Hugging Face Whisper needs "
                f"{required}"
            )


def _num_layers(model: Ct2Model, side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise Ct2FormatError(f"{model.path}: {side} layers are not numbered 0..n-1: {indices}")
    return len(indices)


# ---------------------------------------------------------------- tokens and configs
def read_vocabulary(model_dir: str | Path) -> list[str]:
    """CTranslate2's vocabulary (token id = position): vocabulary.txt or vocabulary.json."""
    model_dir = Path(model_dir)
    if (model_dir / "vocabulary.json").is_file():
        return json.loads((model_dir / "vocabulary.json").read_text(encoding="utf-8"))
    path = model_dir / "vocabulary.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no vocabulary.txt or vocabulary.json")
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_ct2_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_id(vocabulary: list[str], token: str, model_dir: Path) -> int:
    try:
        return vocabulary.index(token)
    except ValueError:
        raise Ct2FormatError(f"{model_dir}: token {token!r} is not in the vocabulary") from None


def whisper_config_from_ct2(model: Ct2Model, model_dir: str | Path) -> WhisperConfig:
    """A WhisperConfig whose sizes are read off the CT2 tensors, scalars and config.json."""
    model_dir = Path(model_dir)
    _check_spec(model)
    ct2_config = _read_ct2_config(model_dir)
    vocabulary = read_vocabulary(model_dir)
    conv1 = model.get("encoder/conv1/weight")  # (D, C, 3)
    embeddings = model.get("decoder/embeddings/weight")  # (V, D)
    if len(vocabulary) != embeddings.shape[0]:
        raise Ct2FormatError(
            f"{model_dir}: vocabulary has {len(vocabulary)} tokens, embeddings "
            f"{embeddings.shape[0]} rows"
        )
    end_of_text = _token_id(vocabulary, "<|endoftext|>", model_dir)
    activation = (
        model.scalar("decoder/activation") if "decoder/activation" in model.variables else _GELU
    )
    if activation not in _ACTIVATIONS:
        raise Ct2FormatError(f"{model.path}: unknown decoder/activation code {activation}")
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=_num_layers(model, "encoder"),
        decoder_layers=_num_layers(model, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.get("decoder/position_encodings/encodings").shape[0],
        activation_function=_ACTIVATIONS[activation],
        scale_embedding=bool(model.scalar("decoder/scale_embeddings"))
        if "decoder/scale_embeddings" in model.variables
        else False,
        pad_token_id=end_of_text,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        decoder_start_token_id=_token_id(vocabulary, "<|startoftranscript|>", model_dir),
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=True,
    )


def ct2_generation_config(config: WhisperConfig, model_dir: str | Path) -> GenerationConfig:
    """What ``generate(input_features, language=..., task="transcribe")`` needs.

    Special-token ids come from the vocabulary; language ids, suppressed tokens and
    alignment heads from CTranslate2's config.json.
    """
    model_dir = Path(model_dir)
    vocabulary = read_vocabulary(model_dir)
    ct2_config = _read_ct2_config(model_dir)
    generation = GenerationConfig.from_model_config(config)
    generation.max_length = config.max_target_positions
    generation.no_timestamps_token_id = _token_id(vocabulary, "<|notimestamps|>", model_dir)
    generation.prev_sot_token_id = _token_id(vocabulary, "<|startofprev|>", model_dir)
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50
    generation.is_multilingual = config.vocab_size >= _MULTILINGUAL_MIN_VOCAB
    generation.suppress_tokens = ct2_config.get("suppress_ids")
    generation.begin_suppress_tokens = ct2_config.get("suppress_ids_begin")
    if "alignment_heads" in ct2_config:
        generation.alignment_heads = ct2_config["alignment_heads"]
    if generation.is_multilingual:
        lang_to_id = {vocabulary[i]: i for i in ct2_config.get("lang_ids", [])}
        bad = [token for token in lang_to_id if not re.fullmatch(r"<\|[a-z]{2,3}\|>", token)]
        if bad or not lang_to_id:
            raise Ct2FormatError(
                f"{model_dir}/config.json: lang_ids should name language tokens like '<|en|>', "
                f"found {bad[:5] or 'none'}"
            )
        generation.lang_to_id = lang_to_id
        generation.task_to_id = {
            task: _token_id(vocabulary, f"<|{task}|>", model_dir)
            for task in ("transcribe", "translate")
        }
    return generation


def load_ct2_tokenizer(model_dir: str | Path) -> WhisperTokenizer:
    """The Whisper tokenizer from the directory's tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json (needed to decode text)")
    return WhisperTokenizer(tokenizer_file=str(path))


# ---------------------------------------------------------------- models
@overload
def ct2_to_hf_whisper(
    model_dir: str | Path, *, encoder_only: Literal[True], dtype: torch.dtype = ...
) -> WhisperEncoder: ...
@overload
def ct2_to_hf_whisper(
    model_dir: str | Path, *, encoder_only: Literal[False], dtype: torch.dtype = ...
) -> WhisperForConditionalGeneration: ...
def ct2_to_hf_whisper(
    model_dir: str | Path, *, encoder_only: bool, dtype: torch.dtype = torch.float32
) -> WhisperForConditionalGeneration | WhisperEncoder:
    """Convert a CTranslate2 Whisper directory to a Hugging Face model in eval mode.

    Loading is strict: every HF parameter comes from the file and every CT2 variable goes
    somewhere (the dropped zero key bias and the scalars aside, see ``_map_variable``).
    The full model gets a generation config (``ct2_generation_config``).
    """
    model_dir = Path(model_dir)
    ct2 = read_model_bin(model_dir / MODEL_FILE)
    config = whisper_config_from_ct2(ct2, model_dir)
    state = ct2_whisper_state_dict(ct2, encoder_only=encoder_only, dtype=dtype)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = WhisperEncoder(config) if encoder_only else WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    if not encoder_only:
        model.tie_weights()
        model.generation_config = ct2_generation_config(config, model_dir)
    leftover = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    ]
    if leftover:
        raise RuntimeError(f"{model_dir}: not loaded from model.bin: {leftover}")
    logger.info(
        "converted %s: %s, %d encoder layers, d %d, %.1fM parameters",
        model_dir,
        type(model).__name__,
        config.encoder_layers,
        config.d_model,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model.eval()


def load_ct2_teacher(
    model_dir: str | Path, *, fingerprint: str | None = None, source: str | None = None
) -> LoadedModel:
    """A frozen Whisper encoder teacher from a CTranslate2 directory.

    fingerprint: the sha256 of model.bin when already known (computed otherwise).
    """
    model_dir = Path(model_dir)
    model = ct2_to_hf_whisper(model_dir, encoder_only=True)
    encoder = WhisperSpeechEncoder(model).eval()
    encoder.requires_grad_(False)
    return LoadedModel(
        encoder=encoder,
        feature_extractor=WhisperFeatureExtractor(feature_size=model.config.num_mel_bins),
        source=source or str(model_dir),
        fingerprint=fingerprint or file_sha256(model_dir / MODEL_FILE),
    )
