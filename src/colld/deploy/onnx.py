"""ONNX export of a colld encoder, int8 dynamic quantisation, and an onnxruntime runner.

The graph (batch and time axes dynamic; C, D and L+1 fixed):
    inputs   features          float32. Shape: (B, F, C) time-major log-mel for Whisper (as the
                               torch encoder takes it, C = num_mel_bins), (B, F, 160) stacked
                               fbank for w2v-BERT, (B, S) 16 kHz waveform for the others.
             feature_lengths   int64, valid frames (samples) per row. Shape: (B,).
    outputs  hidden_states     float32, every hidden state h0..hL stacked on a leading axis,
                               numbered as in ``colld.encoders.base`` (h0 = input of the first
                               layer, hL = last_hidden_state). Shape: (L+1, B, T, D). One stacked
                               output rather than L+1 named ones: runners pick layers by index
                               and the probes' weighted sum wants them all. Padded frames hold
                               arbitrary values, as in torch.
             lengths           int64, valid encoder frames per row. Shape: (B,).
    metadata_props             colld.family, colld.num_layers, colld.hidden_dim,
                               colld.frame_rate, colld.min_input_frames, colld.max_input_frames
                               (0 = no limit), colld.source; and, read by ``colld evaluate``:
                               colld.parameters (``count_encoder_parameters`` of the exported
                               encoder), colld.batch_invariant ("true" / "false": whether
                               padding leaves a clip's valid frames as they are, see
                               ``colld.eval.features``), colld.fingerprint (of the source's
                               weights, when the caller gives it).

Beside the file, ``export_onnx`` writes the model's Hugging Face feature extractor
(``preprocessor_config.json``, ``FRONT_END_FILE``): the front end that makes ``features`` from
audio, which ``load_onnx_model`` reads back (``quantize_int8`` copies it when it writes to
another folder).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, non-strict, then onnxscript). It
handles every colld family with dynamic batch and time on torch 2.13 (tiny models of all six
checked: h0..hL within 5e-6 of torch at lengths other than the example's). It cannot trace
``SpeechEncoder.forward`` as is: the input checks there turn tensors into Python ints
(``int(lengths.min())``), which torch.export refuses (data-dependent guard), and Hugging Face's
``WhisperEncoder.forward`` only takes 3000 frames. So the graph comes from a small export-only
module per family (``_WhisperGraph``, ``_HFGraph``) that computes the same states without the
checks; ``OnnxEncoder`` makes those checks before each run instead. The TorchScript exporter
(``dynamo=False``) is not used: tracing records such ints as constants, so T would silently
stay the example's length (e.g. Whisper's position-table slice), and it is deprecated.

int8: ``onnxruntime.quantization.quantize_dynamic`` with QInt8 weights on the MatMul / Gemm
nodes (the linear layers: attention projections, FFNs), activations quantised per tensor at run
time. Kept float32, measured on tiny random models: convolutions (quantising Whisper's two as
well raised h0's max abs error from 1e-7 to 1e-3) and the wav2vec 2.0 family's
``feature_projection`` (its input, the conv features, spans a wide range: quantised, h0 was off
by 0.87, excluded 2e-6; it is ~0.5% of wav2vec 2.0 base's multiply-adds). The excluded nodes
are found by the module scope the exporter records on each node.

Shape legend: see ``colld.encoders.base``.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoFeatureExtractor
from transformers.utils import FEATURE_EXTRACTOR_NAME

from colld.audio import FrontEnd
from colld.data.batch import pad_features
from colld.encoders.base import EncoderOutput, SpeechEncoder, check_layers
from colld.eval.features import batch_invariant
from colld.students.build import count_encoder_parameters
from colld.teachers.hf import files_fingerprint
from colld.testing import harmonic_tone

try:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"colld.deploy.onnx needs onnx, onnxruntime and onnxscript ({err.name} is missing); "
        "install the deploy extra: pip install -e '.[deploy]'"
    ) from err

logger = logging.getLogger(__name__)

INPUT_NAMES = ("features", "feature_lengths")
OUTPUT_NAMES = ("hidden_states", "lengths")
INT8_OP_TYPES = ("MatMul", "Gemm")
# Ops that only a quantised graph holds (what ``OnnxEncoder.precision`` looks for).
QUANTISED_OP_TYPES = frozenset(
    {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul"}
)
FRONT_END_FILE = FEATURE_EXTRACTOR_NAME  # "preprocessor_config.json"
# Module scopes (of the export graph) whose nodes int8 leaves in float32 (module docstring).
INT8_FLOAT_SCOPES = ("model.feature_projection",)
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_PREPROCESS_HINT = "Please consider to run pre-processing before quantization"
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
EXPORTER = "torch.onnx.export(dynamo=True)"
_META = "colld."
# Metadata every colld export has (newer keys are optional: older exports lack them).
_REQUIRED_META = (
    "family", "num_layers", "hidden_dim", "frame_rate", "min_input_frames", "max_input_frames",
)  # fmt: skip
# Seconds of audio in the example batch the graph is traced with (any length works later).
_EXAMPLE_SECONDS = 2.0
# Longest input searched for the front end's frame limits (Whisper: 3000 mel frames).
_FRAME_SEARCH = 1 << 17


class OnnxExportError(ValueError):
    """A model the exporter cannot turn into ONNX; the message names the model and the op."""


# ------------------------------------------------------------------------ export-only graphs
class _WhisperGraph(nn.Module):
    """``WhisperSpeechEncoder.forward`` (all states, no mask) without its int() checks."""

    def __init__(self, encoder: SpeechEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model

    def forward(self, features: Tensor, feature_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Shape: (B, F, C), (B,) -> (L+1, B, T, D), (B,)."""
        from transformers.masking_utils import create_bidirectional_mask

        lengths = self.encoder.output_lengths(feature_lengths)
        hidden = self.encoder._front_end(features, feature_lengths)  # (B, T, D)
        num_frames = hidden.shape[1]
        valid = torch.arange(num_frames, device=features.device)[None, :] < lengths[:, None]
        hidden = hidden + self.model.embed_positions.weight[:num_frames]
        attention_mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=valid
        )
        states = [hidden]
        for layer in self.model.layers:
            hidden = layer(hidden, attention_mask)
            states.append(hidden)
        states[-1] = self.model.layer_norm(states[-1])
        return torch.stack(states), lengths  # (L+1, B, T, D)


class _HFGraph(nn.Module):
    """The wav2vec 2.0 family: Hugging Face's own hidden states, the last one replaced by
    ``last_hidden_state`` (after the final layer norm of pre-LN variants, as colld numbers
    them; see ``colld.encoders.hf``)."""

    def __init__(self, encoder: SpeechEncoder) -> None:
        super().__init__()
        model = encoder.model
        extras = [n for n in ("adapter", "intermediate_ffn") if getattr(model, n, None) is not None]
        if extras:
            raise OnnxExportError(
                f"{type(model).__name__} runs {' and '.join(extras)} after its encoder, so its "
                f"last_hidden_state is not colld's hidden state {encoder.num_layers}; export a "
                "model saved with add_adapter=False (colld students never have one)"
            )
        self.encoder = encoder
        self.model = model

    def forward(self, features: Tensor, feature_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Shape: (B, S) or (B, F, 160), (B,) -> (L+1, B, T, D), (B,)."""
        num_inputs = features.shape[1]
        valid = torch.arange(num_inputs, device=features.device)[None, :] < feature_lengths[:, None]
        out = self.model(features, attention_mask=valid.long(), output_hidden_states=True)
        states = [*out.hidden_states[: self.encoder.num_layers], out.last_hidden_state]
        return torch.stack(states), self.encoder.output_lengths(feature_lengths)


def _graph_module(encoder: SpeechEncoder) -> nn.Module:
    graph = _WhisperGraph(encoder) if encoder.family == "whisper" else _HFGraph(encoder)
    return graph.eval()


# ------------------------------------------------------------------------------------ export
def export_onnx(
    encoder: SpeechEncoder,
    front_end: FrontEnd,
    path: str | Path,
    *,
    opset: int | None = None,
    source: str = "",
    fingerprint: str = "",
) -> Path:
    """Export ``encoder`` (float32, eval mode) to ``path`` and its front end beside it (see the
    module docstring).

    front_end: the model's front end: traces the example batch, saved as ``FRONT_END_FILE``.
    opset: ONNX opset (None = the exporter's default).
    source: the model spec, recorded in the metadata and named in errors.
    fingerprint: the source's weight fingerprint (``LoadedModel.fingerprint``), recorded so
        that ``colld evaluate`` can tell whether the source directory still holds these weights.
    Raises OnnxExportError naming the op when the graph holds one ONNX cannot express.
    """
    path = Path(path)
    if encoder.training:
        raise ValueError("export_onnx: put the encoder in eval mode first (dropout, LayerDrop)")
    graph = _graph_module(encoder)
    min_frames, max_frames = input_frame_limits(encoder)
    example = _example_batch(front_end, min_frames, max_frames)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("frames")
    label = source or type(encoder.model).__name__
    try:
        with _quiet_exporters():
            program = torch.onnx.export(
                graph,
                example,
                dynamo=True,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch, 1: time}, {0: batch}),
                opset_version=opset,
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as err:
        raise OnnxExportError(f"cannot export {label} to ONNX: {_export_failure(err)}") from err
    program.model.metadata_props.update(
        {
            _META + "family": encoder.family,
            _META + "num_layers": str(encoder.num_layers),
            _META + "hidden_dim": str(encoder.hidden_dim),
            _META + "frame_rate": repr(float(encoder.frame_rate)),
            _META + "min_input_frames": str(min_frames),
            _META + "max_input_frames": str(max_frames),
            _META + "source": source,
            _META + "parameters": str(count_encoder_parameters(encoder)),
            _META + "batch_invariant": str(batch_invariant(encoder)).lower(),
            _META + "fingerprint": fingerprint,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))  # weights go to an external-data file beside it past 1.5 GB
    front_end.feature_extractor.save_pretrained(path.parent)  # FRONT_END_FILE
    logger.info("exported %s to %s (opset %s)", label, path, program.model.opset_imports[""])
    return path


def quantize_int8(source: str | Path, destination: str | Path) -> Path:
    """Dynamic int8 quantisation of an exported model (see the module docstring); its front-end
    file is copied when ``destination`` lies in another folder."""
    source, destination = Path(source), Path(destination)
    model = onnx.load(str(source), load_external_data=False)
    external = any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    kept = [
        node.name
        for node in model.graph.node
        if node.op_type in INT8_OP_TYPES
        and any(
            prop.key == _SCOPES_KEY
            and any(f"'{scope}'" in prop.value for scope in INT8_FLOAT_SCOPES)
            for prop in node.metadata_props
        )
    ]
    if kept:
        logger.info("int8: keeping %s in float32 (%s)", kept, ", ".join(INT8_FLOAT_SCOPES))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporters():
        quantize_dynamic(
            source,
            destination,
            op_types_to_quantize=list(INT8_OP_TYPES),
            nodes_to_exclude=kept,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )
    front_end_file = source.parent / FRONT_END_FILE
    if front_end_file.is_file() and source.parent.resolve() != destination.parent.resolve():
        shutil.copy2(front_end_file, destination.parent / FRONT_END_FILE)
    return destination


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Keep the exporter's and the quantiser's chatter out of colld's INFO log: onnxscript /
    onnx_ir pass logs, torchvision-op notices, and what quantize_dynamic logs on the root
    logger (per-tensor INFO lines and a hint to run ``quant_pre_process`` first, which fails on
    these graphs: its shape inference asserts on Range)."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(
            _PREPROCESS_HINT
        )

    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [log.level for log in loggers]
    root = logging.getLogger()
    root.addFilter(keep)
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(keep)
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def input_frame_limits(encoder: SpeechEncoder) -> tuple[int, int]:
    """(fewest, most) front-end frames (samples) one row may have; most = 0 for no limit.

    Fewest: the shortest input that gives one encoder frame. Most: Whisper's position table.
    """
    frames = torch.arange(1, _FRAME_SEARCH + 1)
    out = encoder.output_lengths(frames)
    min_frames = int(frames[out >= 1][0])
    max_positions = getattr(encoder, "max_positions", None)
    max_frames = int(frames[out <= max_positions][-1]) if max_positions else 0
    return min_frames, max_frames


def _example_batch(front_end: FrontEnd, min_frames: int, max_frames: int) -> tuple[Tensor, Tensor]:
    """Two rows of a synthetic clip, the second shorter (padded). Shape: (2, F, C) / (2, S)."""
    clip = harmonic_tone(_EXAMPLE_SECONDS, np.random.default_rng(0))
    features = front_end(clip)
    if max_frames:
        features = features[:max_frames]
    short = max(min_frames, features.shape[0] * 3 // 4)
    return pad_features([features, features[:short]], front_end.feature_dim)


def _export_failure(err: BaseException) -> str:
    """The op ONNX has no function for, else the summary line of the exporter's error."""
    chain, cause = [], err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    for item in chain:
        found = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", str(item))
        if found:
            return (
                f"op {found[1]}.{found[2]} has no ONNX equivalent (no ONNX function or "
                "decomposition registered for it); rewrite it with supported ops or register "
                "one with torch.onnx.export(custom_translation_table=...)"
            )
    for item in chain:
        summary = re.search(r"<class '([\w.]+)'>: (.+)", str(item))
        if summary:
            return f"{summary[1].rsplit('.', 1)[-1]}: {summary[2].strip()}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# ------------------------------------------------------------------------------------ runner
class OnnxEncoder:
    """An exported encoder run by onnxruntime (CPU), called like a ``SpeechEncoder``.

    ``encoder(features, feature_lengths, layers=None)`` returns an ``EncoderOutput`` in the
    torch encoder's layout (layer -> (B, T, D) tensors, lengths, frame rate); no masking or FFN
    outputs (inference only). threads: onnxruntime intra-op threads (None = its default).

    Besides the shape facts of the metadata: ``precision`` (``graph_precision``), ``files``
    (``model_files``), ``source`` and ``source_fingerprint`` ("" when not recorded),
    ``parameters`` and ``batch_invariant`` (None when not recorded: exports made before colld
    recorded them).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found; expected an .onnx file")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise ValueError(f"onnxruntime cannot load {self.path}: {err}") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [_META + k for k in _REQUIRED_META if _META + k not in meta]
        if missing:
            raise ValueError(
                f"{self.path} lacks the metadata {missing}; expected a model written by "
                "`colld export --onnx` (colld.deploy.onnx.export_onnx)"
            )
        self.family: str = meta[_META + "family"]
        self.num_layers = int(meta[_META + "num_layers"])
        self.hidden_dim = int(meta[_META + "hidden_dim"])
        self.frame_rate = float(meta[_META + "frame_rate"])
        self.min_input_frames = int(meta[_META + "min_input_frames"])
        self.max_input_frames = int(meta[_META + "max_input_frames"])
        self.source: str = meta.get(_META + "source", "")
        self.source_fingerprint: str = meta.get(_META + "fingerprint", "")
        parameters = meta.get(_META + "parameters")
        self.parameters: int | None = None if parameters is None else int(parameters)
        invariant = meta.get(_META + "batch_invariant")
        self.batch_invariant: bool | None = None if invariant is None else invariant == "true"
        graph = onnx.load(str(self.path), load_external_data=False)
        self.precision = graph_precision(graph)
        self.files = model_files(self.path, graph)
        feature_shape = self.session.get_inputs()[0].shape
        self.feature_dim: int | None = feature_shape[2] if len(feature_shape) == 3 else None

    @property
    def file_bytes(self) -> int:
        """Size on disk of the .onnx file and its external data (``files``)."""
        return sum(f.stat().st_size for f in self.files)

    def __call__(
        self, features: Tensor, feature_lengths: Tensor, layers: Sequence[int] | None = None
    ) -> EncoderOutput:
        """Shape: features (B, F, C) or (B, S), feature_lengths (B,) -> states (B, T, D)."""
        wanted = check_layers(layers, self.num_layers)
        self._check_inputs(features, feature_lengths)
        hidden, lengths = self.session.run(
            list(OUTPUT_NAMES),
            {
                "features": features.detach().cpu().float().numpy(),
                "feature_lengths": feature_lengths.detach().cpu().long().numpy(),
            },
        )
        states = torch.from_numpy(hidden)  # (L+1, B, T, D)
        return EncoderOutput(
            hidden_states={j: states[j] for j in wanted},
            lengths=torch.from_numpy(lengths),
            frame_rate=self.frame_rate,
            ffn_outputs={},
        )

    def _check_inputs(self, features: Tensor, feature_lengths: Tensor) -> None:
        expected = "(B, S)" if self.feature_dim is None else f"(B, F, {self.feature_dim})"
        feature_shape = tuple(features.shape)
        if (
            len(feature_shape) != (2 if self.feature_dim is None else 3)
            or feature_shape[2:] not in ((), (self.feature_dim,))
            or tuple(feature_lengths.shape) != feature_shape[:1]
        ):
            raise ValueError(
                f"{self.family} ONNX model expects features of Shape {expected} and "
                f"feature_lengths of Shape (B,), found {feature_shape} and "
                f"{tuple(feature_lengths.shape)}"
            )
        num_inputs = features.shape[1]
        if self.max_input_frames and num_inputs > self.max_input_frames:
            raise ValueError(
                f"input too long for this {self.family} model: F = {num_inputs} frames, at most "
                f"{self.max_input_frames} (its position table); split the audio into segments"
            )
        if feature_lengths.numel() and (
            int(feature_lengths.min()) < self.min_input_frames
            or int(feature_lengths.max()) > num_inputs
        ):
            raise ValueError(
                f"feature_lengths should lie in {self.min_input_frames}..{num_inputs} (the "
                f"shortest input giving one encoder frame .. the padded F), found "
                f"{feature_lengths.tolist()}"
            )


def graph_precision(model: onnx.ModelProto) -> str:
    """ "int8" when ``model`` holds quantisation ops (``QUANTISED_OP_TYPES``), else "float32"
    (what ``export_onnx`` writes)."""
    quantised = any(node.op_type in QUANTISED_OP_TYPES for node in model.graph.node)
    return "int8" if quantised else "float32"


def model_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    """The .onnx file at ``path`` and the external-data files the initialisers of ``model``
    (loaded from it) name."""
    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return [path, *(path.parent / location for location in sorted(locations))]


# ------------------------------------------------------------------------------ evaluation
@dataclass
class LoadedOnnx:
    """An ONNX export loaded to be evaluated like a ``colld.teachers.LoadedModel``.

    encoder: the onnxruntime runner.
    feature_extractor: the Hugging Face feature extractor saved beside the file
        (``FRONT_END_FILE``).
    source: the spec the user gave (the .onnx file or its folder).
    fingerprint: "onnx:" + sha256 over the model's files (names and contents), so fp32, int8
        and the torch model never share a feature cache or a reused result.
    """

    encoder: OnnxEncoder
    feature_extractor: Any
    source: str
    fingerprint: str


def load_onnx_model(
    path: str | Path, *, source: str = "", threads: int | None = None
) -> LoadedOnnx:
    """Load an export of ``colld export --onnx`` (fp32 or int8) and the front end beside it.

    source: the spec to record (default: ``path``). threads: onnxruntime intra-op threads.
    Raises ValueError for a file without colld's metadata, FileNotFoundError naming
    ``FRONT_END_FILE`` when the front end is not beside it.
    """
    encoder = OnnxEncoder(path, threads=threads)
    front_end_file = encoder.path.parent / FRONT_END_FILE
    if not front_end_file.is_file():
        raise FileNotFoundError(
            f"{front_end_file} not found: the front end of {encoder.path} is unknown. "
            f"`colld export --onnx` writes it beside the model (older exports lack it): "
            f"re-export, or copy {FRONT_END_FILE} from the source model "
            f"('{encoder.source or 'unrecorded'}') there"
        )
    return LoadedOnnx(
        encoder=encoder,
        feature_extractor=AutoFeatureExtractor.from_pretrained(encoder.path.parent),
        source=source or str(path),
        fingerprint="onnx:" + files_fingerprint(encoder.files),
    )
