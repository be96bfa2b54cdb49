"""Frozen-encoder features for evaluation: every hidden state of every utterance, cached.

``extract_features`` runs a loaded model (or the ``fbank`` baseline) over a list of manifest
rows and keeps all hidden states 0..L of each utterance, cut to its valid frames, as float16
on the CPU. Probes (``colld.eval.probes``) then train on these without touching the encoder.

Batching: utterances are sorted by duration and grouped up to ``batch_seconds`` of audio, padded
with ``pad_features``; the encoders' key-padding masks make a padded clip's valid frames equal
to the clip run alone (tests/eval/test_features.py; for data2vec-audio through the adapter's
own fix, ``colld.encoders.hf``). Exceptions are run one clip at a time (``unbatched_reason``):
wav2vec 2.0-family models whose first conv has group norm (``feat_extract_norm="group"``, e.g.
wav2vec2-base) normalise over the padded length too; and of ONNX exports (``colld.deploy.onnx``,
run by onnxruntime on the CPU) the int8 ones, whose activations are quantised per tensor over
the whole padded batch (a clip's states then depend on the clips beside it: up to 2e-3 on a
tiny Whisper), and those that do not record whether padding changes their states.

Cache: with ``cache_dir``, one safetensors file per (model fingerprint, front end, utterance
list). Its key hashes the fingerprint, the front end's settings and the (id, path, duration) of
every row (and a region row's offset); the metadata (JSON under ``colld_features``) repeats key, model, fingerprint,
frame rate, ids and skipped ids, and a file whose metadata does not match is never used.

Shape legend: see ``colld.encoders.base`` (L layers, T frames, D width, F front-end frames).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from colld.audio import AudioError, FrontEnd
from colld.data.batch import pad_features
from colld.data.manifest import Utterance
from colld.data.utterance_audio import load_utterance
from colld.encoders.base import SpeechEncoder
from colld.eval.models import file_slug
from colld.teachers.base import LoadedModel

if TYPE_CHECKING:
    from colld.deploy.onnx import LoadedOnnx, OnnxEncoder

logger = logging.getLogger(__name__)

FBANK_MODEL = "fbank"
FBANK_FINGERPRINT = "fbank:whisper-log-mel-80"
CACHE_VERSION = 1
_METADATA_KEY = "colld_features"


@dataclass
class FeatureSet:
    """All hidden states of one model on one list of utterances (one corpus split).

    utterances: the rows, in order; ``states[n]`` belongs to ``utterances[n]``.
    states: per utterance, hidden states 0..L stacked. Shape: (L + 1, T_n, D), float16 on CPU.
        The ``fbank`` baseline has a single "layer" (the front-end features, L + 1 = 1).
    frame_rate: frames per second of ``states``.
    model: what produced them (a teacher spec, a student directory or "fbank").
    fingerprint: the model's weight fingerprint ("fbank:<front-end>" for the baseline).
    """

    utterances: list[Utterance]
    states: list[Tensor]
    frame_rate: float
    model: str
    fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)
    """utterance id -> why it was left out (unreadable audio, too short, too long)."""

    @property
    def num_layers(self) -> int:
        """Hidden states per utterance (L + 1)."""
        return int(self.states[0].shape[0])

    @property
    def dim(self) -> int:
        return int(self.states[0].shape[-1])

    def __len__(self) -> int:
        return len(self.utterances)

    def num_frames(self) -> list[int]:
        """T_n of every utterance, in order."""
        return [int(s.shape[1]) for s in self.states]


def extract_features(
    model: LoadedModel | LoadedOnnx | None,
    utterances: Sequence[Utterance],
    root: Path,
    *,
    cache_dir: Path | None = None,
    device: str = "cpu",
    batch_seconds: float = 60.0,
    show_progress: bool = True,
    model_name: str = "",
) -> FeatureSet:
    """Hidden states 0..L of ``model`` (None = the fbank baseline) on every utterance.

    root: the manifest's directory (relative ``path`` fields are resolved against it).
    cache_dir: read / write the features there (see the module docstring); None = no cache.
    batch_seconds: audio per encoder batch (utterances sorted by duration).
    model_name: label stored in the FeatureSet (default: the model's source, or "fbank").
    Utterances that cannot be used (unreadable, too short, longer than the encoder accepts)
    are skipped with one warning each and listed in ``FeatureSet.skipped``; ValueError when
    none is left. A torch encoder is moved to ``device`` and put in eval mode; an ONNX
    export runs on onnxruntime's CPU provider whatever ``device`` says.
    """
    if not utterances:
        raise ValueError("extract_features got no utterances")
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be > 0, found {batch_seconds}")
    if len({u.id for u in utterances}) != len(utterances):
        raise ValueError("extract_features got duplicate utterance ids; ids must be unique")
    front_end = (
        FrontEnd.for_family("whisper") if model is None else FrontEnd(model.feature_extractor)
    )
    fingerprint = FBANK_FINGERPRINT if model is None else model.fingerprint
    label = model_name or (FBANK_MODEL if model is None else model.source)
    key = cache_key(fingerprint, front_end, utterances)
    cache_path = (
        None
        if cache_dir is None
        else Path(cache_dir) / f"{file_slug(label)}-{key[:20]}.safetensors"
    )
    if cache_path is not None:
        cached = _read_cache(cache_path, key, fingerprint, utterances, label)
        if cached is not None:
            logger.info(
                "features of %s on %d utterances read from %s", label, len(cached), cache_path
            )
            return cached
    if model is None:
        states, skipped = _fbank_states(utterances, root, front_end, show_progress)
        frame_rate = front_end.frames_per_second
    else:
        states, skipped = _encoder_states(
            model.encoder, utterances, root, front_end, device, batch_seconds, show_progress, label
        )
        frame_rate = model.encoder.frame_rate
    kept = [u for u in utterances if u.id in states]
    if not kept:
        reasons = sorted({reason.split(":")[0] for reason in skipped.values()})
        raise ValueError(
            f"no usable utterance for {label}: all {len(utterances)} were skipped "
            f"(reasons: {', '.join(reasons)}; first: {next(iter(skipped.items()))})"
        )
    feature_set = FeatureSet(
        utterances=kept,
        states=[states[u.id] for u in kept],
        frame_rate=float(frame_rate),
        model=label,
        fingerprint=fingerprint,
        skipped=skipped,
    )
    if cache_path is not None:
        _write_cache(cache_path, key, feature_set)
    return feature_set


# ---------------------------------------------------------------- computing
def _fbank_states(
    utterances: Sequence[Utterance], root: Path, front_end: FrontEnd, show_progress: bool
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Log-mel of every clip as a single "layer". Shape per utterance: (1, F, C) float16."""
    states: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for utt in tqdm(utterances, desc="features fbank", unit="utt", disable=not show_progress):
        try:
            features = _clip_features(utt, root, front_end)  # (F, C)
        except AudioError as err:
            _skip(skipped, utt, f"{err.reason}: {err.cause}")
            continue
        states[utt.id] = features[None].to(torch.float16).contiguous()
    return states, skipped


def _encoder_states(
    encoder: SpeechEncoder | OnnxEncoder,
    utterances: Sequence[Utterance],
    root: Path,
    front_end: FrontEnd,
    device: str,
    batch_seconds: float,
    show_progress: bool,
    label: str,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All hidden states of every usable clip. Shape per utterance: (L + 1, T_n, D) float16."""
    if isinstance(encoder, SpeechEncoder):
        encoder.to(device).eval()
    elif device != "cpu":
        logger.warning("%s runs on onnxruntime's CPU provider, not on %s", label, device)
        device = "cpu"
    unbatched = unbatched_reason(encoder)
    if unbatched is not None:
        logger.info("%s: one clip at a time (%s)", label, unbatched)
    max_seconds = 0.0 if unbatched is not None else batch_seconds
    states: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    bar = tqdm(
        total=len(utterances), desc=f"features {label}", unit="utt", disable=not show_progress
    )
    with bar:
        for batch in plan_batches([u.duration for u in utterances], max_seconds):
            rows: list[Utterance] = []
            features: list[Tensor] = []
            for utt in (utterances[i] for i in batch):
                try:
                    clip = _clip_features(utt, root, front_end)
                except AudioError as err:
                    _skip(skipped, utt, f"{err.reason}: {err.cause}")
                    continue
                too_long = _too_long(encoder, front_end, clip.shape[0])
                if too_long is not None:
                    _skip(skipped, utt, too_long)
                    continue
                rows.append(utt)
                features.append(clip)
            if rows:
                for utt, utt_states in zip(
                    rows, encode_clips(encoder, features, device), strict=True
                ):
                    states[utt.id] = utt_states
            bar.update(len(batch))
    return states, skipped


def encode_clips(
    encoder: SpeechEncoder | OnnxEncoder, features: Sequence[Tensor], device: str = "cpu"
) -> list[Tensor]:
    """Run ``encoder`` on a padded batch of clips and cut each to its valid frames.

    features: per clip front-end output, Shape: (F_n, C) or (S_n,).
    Returns per clip all hidden states, Shape: (L + 1, T_n, D), float16 on the CPU.
    """
    padded, lengths = pad_features(list(features))  # (B, F, C) or (B, S)
    with torch.inference_mode():
        out = encoder(padded.to(device), lengths.to(device), layers=None)
        stacked = torch.stack(
            [out.hidden_states[j] for j in sorted(out.hidden_states)]
        )  # (L+1, B, T, D)
        stacked = stacked.to(device="cpu", dtype=torch.float16)
    valid = out.lengths.cpu().tolist()
    return [stacked[:, n, : valid[n]].clone() for n in range(len(valid))]


def plan_batches(durations: Sequence[float], max_seconds: float) -> list[list[int]]:
    """Indices grouped by ascending duration, each group at most ``max_seconds`` of audio
    (a longer clip gets a group of its own; ``max_seconds`` 0 = one clip per group)."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for i in order:
        if current and total + durations[i] > max_seconds:
            batches.append(current)
            current, total = [], 0.0
        current.append(i)
        total += durations[i]
    if current:
        batches.append(current)
    return batches


def _clip_features(utt: Utterance, root: Path, front_end: FrontEnd) -> Tensor:
    """Front-end output of one row (its whole file or exactly its region). Shape: (F, C) or
    (S,). Raises AudioError."""
    path = utt.resolved_path(Path(root))
    try:
        return front_end(load_utterance(utt, root, front_end.sample_rate))
    except AudioError as err:
        if err.path is None:  # the front end's errors do not know the file
            raise AudioError(path, err.cause, reason=err.reason) from err
        raise


def _too_long(
    encoder: SpeechEncoder | OnnxEncoder, front_end: FrontEnd, num_inputs: int
) -> str | None:
    """Why a clip of ``num_inputs`` front-end frames (samples) is longer than the encoder
    accepts (Whisper: 30 s, the front end's ``max_samples`` and the position table; an ONNX
    export: its recorded ``max_input_frames``), or None."""
    seconds = num_inputs / front_end.frames_per_second
    if (
        front_end.max_samples is not None
        and seconds * front_end.sample_rate > front_end.max_samples
    ):
        limit = front_end.max_samples / front_end.sample_rate
        return f"too_long: {seconds:.2f} s > the {limit:g} s the front end accepts"
    if not isinstance(encoder, SpeechEncoder):
        most = encoder.max_input_frames
        if most and num_inputs > most:
            return f"too_long: {num_inputs} front-end frames, the ONNX model takes at most {most}"
        return None
    max_positions = getattr(encoder, "max_positions", None)
    if max_positions is not None:
        num_frames = int(encoder.output_lengths(torch.tensor([num_inputs]))[0])
        if num_frames > max_positions:
            return (
                f"too_long: {seconds:.2f} s gives {num_frames} encoder frames, the encoder "
                f"holds {max_positions} positions ({max_positions / encoder.frame_rate:g} s)"
            )
    return None


def batch_invariant(encoder: SpeechEncoder | OnnxEncoder) -> bool:
    """False where padding or batching changes valid frames (``unbatched_reason``)."""
    return unbatched_reason(encoder) is None


def unbatched_reason(encoder: SpeechEncoder | OnnxEncoder) -> str | None:
    """Why a clip's states depend on the batch it runs in (None: they do not), for torch
    encoders and ONNX exports alike (see the module docstring)."""
    group_norm = (
        "its first conv has group norm (feat_extract_norm='group'), which normalises over the "
        "padded length"
    )
    if isinstance(encoder, SpeechEncoder):
        config = getattr(getattr(encoder, "model", None), "config", None)
        return group_norm if getattr(config, "feat_extract_norm", None) == "group" else None
    if encoder.precision == "int8":
        return (
            "int8: activations are quantised per tensor over the whole padded batch, so a "
            "clip's states depend on the clips beside it"
        )
    if encoder.batch_invariant is None:
        return (
            "the export does not record whether padding changes its states "
            "(colld.batch_invariant: exported before colld recorded it)"
        )
    return None if encoder.batch_invariant else group_norm


def _skip(skipped: dict[str, str], utt: Utterance, reason: str) -> None:
    skipped[utt.id] = reason
    logger.warning("skipping utterance %s: %s", utt.id, reason)


# ---------------------------------------------------------------- cache
def _row_key(u: Utterance) -> list[object]:
    """A row's part of the cache key; whole-file, all-channel rows keep the key they had
    before regions and channels existed."""
    key: list[object] = [u.id, u.path, round(float(u.duration), 6)]
    key = [*key, round(float(u.start), 6)] if u.is_region else key
    return key if u.channel is None else [*key, {"channel": u.channel}]


def cache_key(fingerprint: str, front_end: FrontEnd, utterances: Sequence[Utterance]) -> str:
    """sha256 over the model fingerprint, the front end's settings and every (id, path,
    duration[, offset of a region row][, channel]) in order: a different model, front end or utterance
    list gives another key."""
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "front_end": front_end_signature(front_end),
        "utterances": [_row_key(u) for u in utterances],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def front_end_signature(front_end: FrontEnd) -> dict[str, Any]:
    """The front end's kind and scalar settings (what changes its output)."""
    settings = {
        name: value
        for name, value in sorted(front_end.feature_extractor.to_dict().items())
        if isinstance(value, (str, int, float, bool)) or value is None
    }
    return {
        "kind": front_end.kind,
        "extractor": type(front_end.feature_extractor).__name__,
        "min_samples": front_end.min_samples,
        "settings": settings,
    }


def _read_cache(
    path: Path, key: str, fingerprint: str, utterances: Sequence[Utterance], label: str
) -> FeatureSet | None:
    """The cached FeatureSet when ``path`` exists and its metadata matches, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_METADATA_KEY, "null"))
            problem = _metadata_problem(meta, key, fingerprint, utterances)
            if problem is not None:
                logger.warning("not using feature cache %s: %s", path, problem)
                return None
            states = [f.get_tensor(str(n)) for n in range(len(meta["ids"]))]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        logger.warning("not using feature cache %s: unreadable (%s)", path, err)
        return None
    by_id = {u.id: u for u in utterances}
    return FeatureSet(
        utterances=[by_id[i] for i in meta["ids"]],
        states=states,
        frame_rate=float(meta["frame_rate"]),
        model=label,
        fingerprint=fingerprint,
        skipped=dict(meta["skipped"]),
    )


def _metadata_problem(
    meta: Any, key: str, fingerprint: str, utterances: Sequence[Utterance]
) -> str | None:
    """Why a cache file's metadata does not fit the request (None = it fits)."""
    if not isinstance(meta, dict):
        return f"no '{_METADATA_KEY}' metadata"
    if meta.get("version") != CACHE_VERSION:
        return f"cache version {meta.get('version')!r}, expected {CACHE_VERSION}"
    if meta.get("key") != key:
        return "its key (model, front end, utterance list) differs"
    if meta.get("fingerprint") != fingerprint:
        return f"fingerprint {meta.get('fingerprint')!r}, expected {fingerprint!r}"
    ids, skipped = meta.get("ids"), meta.get("skipped")
    if not isinstance(ids, list) or not isinstance(skipped, dict):
        return "ids or skipped missing"
    expected = [u.id for u in utterances if u.id not in skipped]
    if ids != expected or len(ids) + len(skipped) != len(utterances):
        return "its utterance ids differ from the request"
    return None


def _write_cache(path: Path, key: str, feature_set: FeatureSet) -> None:
    """Write ``feature_set`` atomically (temp file beside ``path``, then ``os.replace``)."""
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "model": feature_set.model,
        "fingerprint": feature_set.fingerprint,
        "frame_rate": feature_set.frame_rate,
        "ids": [u.id for u in feature_set.utterances],
        "skipped": feature_set.skipped,
    }
    tensors = {str(n): states.contiguous() for n, states in enumerate(feature_set.states)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("features of %s written to %s", feature_set.model, path)
