"""``colld export --onnx``: export a model, quantise it, and check both against PyTorch.

The check runs the torch encoder and each ONNX file on the same clips: every clip alone
(batch 1, its own length, so the dynamic time axis is exercised) and all clips as one padded
batch (dynamic batch axis and padding). For each hidden state h0..hL it reports the largest
absolute difference over valid frames of all those runs, beside the largest absolute value of
the torch states (the scale the difference compares to). float32 must stay within
``tolerance * max(1, scale)``; int8 is reported, never bounded (its error is the point of
measuring it).

Files written to the output folder: ``model.onnx``, ``model.int8.onnx`` (with ``int8``),
``preprocessor_config.json`` (the front end, ``colld.deploy.onnx.FRONT_END_FILE``) and
``onnx_check.json`` (``ExportReport.to_json``).
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from colld.audio import FrontEnd, load_audio
from colld.data.batch import pad_features
from colld.data.manifest import read_manifest
from colld.data.utterance_audio import load_utterance
from colld.deploy.onnx import EXPORTER, OnnxEncoder, export_onnx, quantize_int8
from colld.encoders.base import SpeechEncoder
from colld.eval.models import load_model_spec
from colld.testing import harmonic_tone

logger = logging.getLogger(__name__)

REPORT_FILE = "onnx_check.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# probe-test clips of the corpus used when no --audio is given: shortest, median, longest.
CORPUS_MANIFEST = "manifests/probe-test.jsonl"
MAX_CHECK_SECONDS = 10.0
TONE_SECONDS = (1.0, 2.5, 4.0)


@dataclass
class Clip:
    """A clip the check runs on: where it came from and its samples. Shape: (S,)."""

    name: str
    waveform: np.ndarray = field(repr=False)

    def seconds(self, sample_rate: int) -> float:
        return round(self.waveform.shape[0] / sample_rate, 3)


@dataclass
class StateDiffs:
    """Per hidden state 0..L: max |onnx - torch| over valid frames of every run (per ONNX
    file, by name), and max |torch| (the scale)."""

    max_abs_diff: dict[str, list[float]]
    reference_max_abs: list[float]


@dataclass
class ExportReport:
    """What ``export_and_check`` did; written as ``onnx_check.json``."""

    model: str
    family: str
    num_layers: int
    exporter: str
    opset: int
    files: dict[str, str]
    clips: dict[str, float]
    """clip name -> seconds."""
    diffs: StateDiffs
    tolerance: float
    fp32_ok: bool
    versions: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def table(self) -> str:
        """Markdown: one row per hidden state, one column per ONNX file, then the scale."""
        names = list(self.diffs.max_abs_diff)
        lines = [
            "| state | " + " | ".join(f"{n} max abs diff" for n in names) + " | torch max abs |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for j, scale in enumerate(self.diffs.reference_max_abs):
            cells = [f"{self.diffs.max_abs_diff[n][j]:.3g}" for n in names]
            lines.append(f"| h{j} | " + " | ".join(cells) + f" | {scale:.3g} |")
        return "\n".join(lines)


def compare_with_torch(
    encoder: SpeechEncoder,
    front_end: FrontEnd,
    clips: Sequence[np.ndarray],
    runners: dict[str, OnnxEncoder],
) -> StateDiffs:
    """Run ``encoder`` and every runner on each clip alone and on all clips as one padded
    batch; per hidden state, the largest difference on valid frames (module docstring)."""
    if not clips:
        raise ValueError("compare_with_torch needs at least one clip")
    num_states = encoder.num_layers + 1
    diffs = {name: [0.0] * num_states for name in runners}
    scale = [0.0] * num_states
    features = [front_end(clip) for clip in clips]
    batches = [[f] for f in features] + ([features] if len(features) > 1 else [])
    for batch in batches:
        padded, lengths = pad_features(batch, front_end.feature_dim)
        with torch.inference_mode():
            reference = encoder(padded, lengths)
        valid = reference.padding_mask()[:, :, None]  # (B, T, 1)
        for j in range(num_states):
            scale[j] = max(scale[j], float((reference.hidden_states[j].abs() * valid).max()))
        for name, runner in runners.items():
            out = runner(padded, lengths)
            if not torch.equal(out.lengths, reference.lengths):
                raise RuntimeError(
                    f"{name}: ONNX lengths {out.lengths.tolist()} differ from torch's "
                    f"{reference.lengths.tolist()} for inputs of {lengths.tolist()}"
                )
            for j in range(num_states):
                delta = (out.hidden_states[j] - reference.hidden_states[j]).abs() * valid
                diffs[name][j] = max(diffs[name][j], float(delta.max()))
    return StateDiffs(max_abs_diff=diffs, reference_max_abs=scale)


def check_clips(
    front_end: FrontEnd, audio: Sequence[str | Path] = (), corpus: str | Path | None = None
) -> list[Clip]:
    """The clips of the check: ``audio`` files if given, else the shortest, median and
    longest probe-test clips of ``corpus`` (up to ``MAX_CHECK_SECONDS``), else synthetic tones
    (``TONE_SECONDS``). Clips are cut to the front end's longest input (Whisper: 30 s)."""
    rate = front_end.sample_rate
    if audio:
        clips = [Clip(str(path), load_audio(path, rate)) for path in audio]
    elif corpus is not None and (Path(corpus) / CORPUS_MANIFEST).is_file():
        manifest = Path(corpus) / CORPUS_MANIFEST
        utterances, _ = read_manifest(manifest)
        usable = sorted(
            (u for u in utterances if u.duration <= MAX_CHECK_SECONDS), key=lambda u: u.duration
        )
        if not usable:
            raise ValueError(f"{manifest} has no clip of at most {MAX_CHECK_SECONDS} s")
        picked = [usable[i] for i in sorted({0, len(usable) // 2, len(usable) - 1})]
        clips = [Clip(u.id, load_utterance(u, manifest.parent, rate)) for u in picked]
    else:
        rng = np.random.default_rng(0)
        clips = [Clip(f"tone-{s}s", harmonic_tone(s, rng, sample_rate=rate)) for s in TONE_SECONDS]
    if front_end.max_samples:
        for clip in clips:
            clip.waveform = clip.waveform[: front_end.max_samples]
    return clips


def export_and_check(
    spec: str,
    out_dir: str | Path,
    *,
    int8: bool = False,
    opset: int | None = None,
    audio: Sequence[str | Path] = (),
    corpus: str | Path | None = None,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Export ``spec`` (a student directory or a teacher spec) to ``out_dir``, optionally
    quantise it, check against PyTorch and write ``onnx_check.json``.

    Raises ValueError when float32 differs from torch by more than ``tolerance * max(1,
    scale)`` on some hidden state (the files and the report are written first).
    """
    loaded = load_model_spec(spec)
    if loaded is None:
        raise ValueError(f"'{spec}' has no encoder to export; expected a student or teacher")
    encoder = loaded.encoder.float().eval()
    front_end = FrontEnd(loaded.feature_extractor)
    clips = check_clips(front_end, audio, corpus)
    out_dir = Path(out_dir)
    fp32 = export_onnx(
        encoder,
        front_end,
        out_dir / FP32_FILE,
        source=spec,
        fingerprint=loaded.fingerprint,
        opset=opset,
    )
    files = {"fp32": fp32}
    if int8:
        files["int8"] = quantize_int8(files["fp32"], out_dir / INT8_FILE)
    threads = torch.get_num_threads()
    runners = {name: OnnxEncoder(path, threads=threads) for name, path in files.items()}
    diffs = compare_with_torch(encoder, front_end, [c.waveform for c in clips], runners)
    fp32_ok = all(
        d <= tolerance * max(1.0, s)
        for d, s in zip(diffs.max_abs_diff["fp32"], diffs.reference_max_abs, strict=True)
    )
    report = ExportReport(
        model=spec,
        family=encoder.family,
        num_layers=encoder.num_layers,
        exporter=EXPORTER,
        opset=_opset(files["fp32"]),
        files={name: path.name for name, path in files.items()},
        clips={c.name: c.seconds(front_end.sample_rate) for c in clips},
        diffs=diffs,
        tolerance=tolerance,
        fp32_ok=fp32_ok,
        versions=_versions(),
    )
    (out_dir / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
    if not fp32_ok:
        raise ValueError(
            f"the float32 ONNX export of {spec} differs from PyTorch by more than {tolerance:g} "
            f"x max(1, scale) on some hidden state:\n{report.table()}\n"
            f"(report: {out_dir / REPORT_FILE})"
        )
    return report


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _versions() -> dict[str, Any]:
    import onnx
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "python": platform.python_version(),
    }
