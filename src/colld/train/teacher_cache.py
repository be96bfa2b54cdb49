"""Build and open a run's teacher-target cache (``colld cache-teacher``, ``data.target_cache``).

``build_cache`` runs the frozen teacher once over the fixed segments of the run's training data
(``colld.data.target_cache.plan_segments``) and stores the targets of the teacher layers the
run's objective maps to, then does the same for the run's dev data in the nested ``dev/``
directory; ``open_run_cache`` (``open_dev_cache``) opens a cache for training (the dev loss)
after checking that it holds exactly what this run would compute online. A run whose targets
all come from the cache never runs the teacher, so the teacher is not moved to the training
device (on a GPU, its memory is the student's); a cache built before dev was cached still
serves training, with the dev loss computed online. The fingerprint (``run_fingerprint``)
covers: the teacher's weight fingerprint, the target kind (hidden / ffn), the teacher layers,
the front end (kind, rate, minimum clip, the feature extractor's settings), the segment length
(``data.max_duration``), the training data (count and hash of id, path, offset, duration) and
the augmentation record. Augmentation is refused: augmented audio changes every epoch, so a
fixed cache cannot hold its targets (``validate`` refuses ``data.target_cache`` with
augmentation on, and ``build_cache`` refuses to build).

The teacher runs where and as the run would run it online: on CUDA when the run would use it,
under the autocast of the run's ``train.precision`` (``colld.train.precision``: bf16 on a
native-bf16 CPU or a bf16 GPU by default, fp32 elsewhere); targets are stored as float16, and
each segment's front-end output (what the student sees) as float32 beside them, so cached
training decodes no audio. The precision is recorded (``teacher_dtype`` in fingerprint.json,
``build_config.yaml``) but not compared: it changes the targets by rounding only, as it
changes an online run's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from colld import __version__
from colld.audio import AudioError, FrontEnd
from colld.config import ConfigError, RunConfig, dump_config
from colld.data.augment import Augmenter
from colld.data.batch import pad_features
from colld.data.manifest import Utterance
from colld.data.target_cache import (
    BUILD_CONFIG_FILE,
    DEV_DIR,
    FORMAT_VERSION,
    CacheWriter,
    Segment,
    StaleCacheError,
    TargetCache,
    complete_command,
    data_record,
    directory_bytes,
    open_cache,
    plan_segments,
)
from colld.data.utterance_audio import load_region
from colld.objectives.layer_map import SOURCE_MAP
from colld.students.build import resolve_init, resolve_source_map, resolve_student_sizes
from colld.teachers import LoadedModel, load_teacher
from colld.train.data_setup import resolve_sources
from colld.train.precision import autocast_dtype, teacher_autocast

log = logging.getLogger(__name__)

# Feature-extractor settings that do not change one clip's features.
_VOLATILE_EXTRACTOR_KEYS = ("processor_class", "return_attention_mask", "padding_side")


def cache_teacher_layers(cfg: RunConfig, teacher: LoadedModel) -> list[int]:
    """The teacher layers this run's objective maps to (sorted), without building a student."""
    spec = resolve_init(teacher.encoder, cfg.student)
    if cfg.objective.layer_map == SOURCE_MAP and spec.init == "prune":
        # The kept layers are measured on training audio (the pruning plan): cache every layer.
        return list(range(1, teacher.encoder.num_layers + 1))
    objective = resolve_source_map(cfg.objective, teacher.encoder, spec)
    sizes = resolve_student_sizes(teacher.encoder, spec)
    pairs = objective.validate(sizes.num_layers, teacher.encoder.num_layers)
    return sorted({j for _, j in pairs})


def front_end_record(frontend: FrontEnd) -> dict[str, Any]:
    """What the features depend on: kind, rate, minimum clip and the extractor's settings."""
    settings = {
        k: v
        for k, v in frontend.feature_extractor.to_dict().items()
        if k not in _VOLATILE_EXTRACTOR_KEYS
    }
    return {
        "kind": frontend.kind,
        "sample_rate": frontend.sample_rate,
        "min_samples": frontend.min_samples,
        "feature_dim": frontend.feature_dim,
        "extractor": json.loads(json.dumps(settings, sort_keys=True, default=str)),
    }


def run_fingerprint(
    cfg: RunConfig,
    teacher: LoadedModel,
    teacher_layers: list[int],
    utterances: list[Utterance],
    frontend: FrontEnd,
) -> dict[str, Any]:
    """The cache fingerprint this run needs (compared keys and provenance; see module doc)."""
    return {
        "format": FORMAT_VERSION,
        "teacher_fingerprint": teacher.fingerprint,
        "target": cfg.objective.target,
        "teacher_layers": list(teacher_layers),
        "front_end": front_end_record(frontend),
        "segment_seconds": cfg.data.max_duration,
        "data": data_record(utterances),
        "augmentation": Augmenter(cfg.data.augment, frontend.sample_rate).describe(),
        # provenance, not compared
        "teacher_spec": cfg.teacher.spec,
        "teacher_dim": teacher.encoder.hidden_dim,
        "frame_rate": teacher.encoder.frame_rate,
        "dtype": "float16",
        "features": {"dtype": "float32", "dim": frontend.feature_dim},
        "colld_version": __version__,
    }


def open_run_cache(
    cfg: RunConfig,
    teacher: LoadedModel,
    teacher_layers: list[int],
    utterances: list[Utterance],
    *,
    dev: bool = False,
) -> TargetCache:
    """Open ``cfg.data.target_cache`` (``dev``: its dev part, ``DEV_DIR``) for the run whose
    training (dev) data are ``utterances``; raises StaleCacheError / PartialCacheError."""
    frontend = FrontEnd(teacher.feature_extractor)
    expected = run_fingerprint(cfg, teacher, teacher_layers, utterances, frontend)
    directory = Path(cfg.data.target_cache) / (DEV_DIR if dev else "")
    cache = open_cache(directory, expected)
    log.info(
        "teacher-target cache %s: %d segments, %.2f h, layers %s",
        cache.directory,
        len(cache.rows),
        cache.audio_seconds / 3600,
        cache.layers,
    )
    return cache


def open_dev_cache(
    cfg: RunConfig, teacher: LoadedModel, teacher_layers: list[int], utterances: list[Utterance]
) -> TargetCache | None:
    """The dev part of ``cfg.data.target_cache`` for the dev data ``utterances``; None (with a
    log line) for a cache built before dev was cached: such a run's dev loss runs the teacher.
    Raises StaleCacheError / PartialCacheError as ``open_run_cache``."""
    directory = Path(cfg.data.target_cache)
    try:
        return open_run_cache(cfg, teacher, teacher_layers, utterances, dev=True)
    except FileNotFoundError:  # open_cache: no cache there
        log.warning(
            "the teacher-target cache %s holds no dev targets (built before colld cached dev): "
            "dev loss runs the teacher, which stays on the training device; add them with: %s",
            directory,
            complete_command(directory),
        )
        return None
    except StaleCacheError as err:
        raise StaleCacheError(
            f"{err} The training part matches: to keep it, delete {directory / DEV_DIR} and "
            f"rerun colld cache-teacher with this run's config and --out {directory}, which "
            "rebuilds the dev part alone"
        ) from None


@dataclass
class CacheSummary:
    """What ``build_cache`` reports. ``built`` counts segments written by this call."""

    directory: Path
    num_segments: int
    num_skipped: int
    audio_hours: float
    num_bytes: int
    built: int
    build_seconds: float
    dev: CacheSummary | None = None  # the dev split's cache (``DEV_DIR``), when the run has dev

    @property
    def mb_per_hour(self) -> float:
        return self.num_bytes / 1e6 / self.audio_hours if self.audio_hours else float("nan")

    def lines(self) -> list[str]:
        return [
            f"teacher-target cache: {self.directory}",
            f"segments: {self.num_segments} ({self.num_skipped} skipped), {self.built} built now "
            f"in {self.build_seconds:.1f} s",
            f"size on disk: {self.num_bytes / 1e6:.1f} MB for {self.audio_hours:.3f} h of audio "
            f"= {self.mb_per_hour:.0f} MB per hour",
            *(
                []
                if self.dev is None
                else [
                    f"dev: {self.dev.num_segments} segments ({self.dev.num_skipped} skipped), "
                    f"{self.dev.built} built now in {self.dev.build_seconds:.1f} s, "
                    f"{self.dev.num_bytes / 1e6:.1f} MB in "
                    f"{self.dev.directory}"
                ]
            ),
        ]


class _ChunkDataset(Dataset):
    """Chunk i -> [(segment, features or None, num_samples, skip reason or None)]."""

    def __init__(self, chunks: list[list[Segment]], root: Path, frontend: FrontEnd) -> None:
        self.chunks, self.root, self.frontend = chunks, root, frontend

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> list[tuple[Segment, torch.Tensor | None, int, str | None]]:
        out = []
        for segment in self.chunks[index]:
            path = segment.utterance.resolved_path(self.root)
            try:
                rate = self.frontend.sample_rate
                waveform = load_region(
                    path, rate, segment.offset, segment.duration, channel=segment.utterance.channel
                )
                out.append((segment, self.frontend(waveform), waveform.shape[0], None))
            except (AudioError, OSError) as err:
                reason = f"{getattr(err, 'reason', 'unreadable')}: {err}"
                log.warning("cache: skipping segment '%s' (%s)", segment.id, reason)
                out.append((segment, None, 0, reason))
        return out


def _identity(items: Any) -> Any:
    return items


def _chunks(segments: list[Segment], start: int, chunk_seconds: float) -> list[list[Segment]]:
    """Consecutive segments from ``start`` in groups of at most ``chunk_seconds`` (>= 1 each)."""
    chunks, current, seconds = [], [], 0.0
    for segment in segments[start:]:
        if current and seconds + segment.duration > chunk_seconds:
            chunks.append(current)
            current, seconds = [], 0.0
        current.append(segment)
        seconds += segment.duration
    if current:
        chunks.append(current)
    return chunks


@torch.no_grad()
def _teacher_chunk(
    teacher: LoadedModel,
    items: list[tuple[Segment, torch.Tensor, int]],
    layers: list[int],
    target: str,
    batch_seconds: float,
    sample_rate: int,
    device: torch.device,
) -> list[dict[int, np.ndarray]]:
    """Teacher targets of each item (in ``items`` order), run in length-sorted batches whose
    padded size stays within ``batch_seconds``. Shape: layer -> (T_i, D_t) float32."""
    order = sorted(range(len(items)), key=lambda i: -items[i][2])
    results: list[dict[int, np.ndarray] | None] = [None] * len(items)
    start = 0
    while start < len(order):
        longest = items[order[start]][2] / sample_rate
        count = max(1, int(batch_seconds // longest)) if longest > 0 else len(order)
        group = order[start : start + count]
        features, feature_lengths = pad_features([items[i][1] for i in group])
        out = teacher.encoder(
            features.to(device),
            feature_lengths.to(device),
            layers=layers,
            return_ffn=target == "ffn",
        )
        states = out.ffn_outputs if target == "ffn" else out.hidden_states
        lengths = out.lengths.tolist()
        for row, i in enumerate(group):
            results[i] = {j: states[j][row, : lengths[row]].float().cpu().numpy() for j in layers}
        start += count
    return results  # type: ignore[return-value]


def _device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available")
    use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def build_cache(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    teacher: LoadedModel | None = None,
    chunk_seconds: float | None = None,
    progress: bool = True,
    layers: list[int] | None = None,
) -> CacheSummary:
    """Build (or complete) the teacher-target cache of ``cfg``'s training data in ``out_dir``
    (default ``data.target_cache``), then that of its dev data (if the run has any) in
    ``out_dir/dev``. Idempotent: a complete cache is left as it is; a partial one continues
    after its last committed chunk (so rerunning on a cache built before dev was cached adds
    the dev part). ``chunk_seconds``: audio per committed chunk (default 4 x
    ``data.batch_seconds``). Raises ConfigError with augmentation on and StaleCacheError when
    ``out_dir`` holds a cache built for another config. ``layers``: the teacher layers to store
    (None = those ``cfg``'s objective maps to); a superset lets runs with other layer maps
    share the cache (``colld experiment`` stores its grid's union)."""
    out = out_dir if out_dir is not None else cfg.data.target_cache
    if out is None:
        raise ConfigError("no cache directory: give --out DIR or set data.target_cache")
    out = Path(out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ConfigError(
            f"colld cache-teacher runs as one process, but WORLD_SIZE={world_size} (accelerate "
            "launch / torchrun): run it as plain `colld cache-teacher` (it uses one GPU), then "
            "train on all of them with `accelerate launch -m colld distill data.target_cache=DIR`"
        )
    if cfg.data.augment.enabled:
        raise ConfigError(
            "cannot cache teacher targets with data.augment.enabled: augmented audio changes "
            "every epoch (turn augmentation off to use the cache)"
        )
    if teacher is None:
        teacher = load_teacher(
            cfg.teacher.spec,
            trust_remote_code=cfg.teacher.trust_remote_code,
            revision=cfg.teacher.revision,
        )
    layers = sorted(set(layers)) if layers is not None else cache_teacher_layers(cfg, teacher)
    train, dev = resolve_sources(cfg.data, cfg.train.seed)
    part = _CachePart(cfg, teacher, layers, _device(cfg), chunk_seconds, progress)
    summary = part.build(out, *train, desc="teacher targets")
    if dev is not None:
        summary.dev = part.build(out / DEV_DIR, *dev, desc="dev targets")
    return summary


@dataclass
class _CachePart:
    """Builds the cache of one split (training or dev data) with one teacher and settings."""

    cfg: RunConfig
    teacher: LoadedModel
    layers: list[int]
    device: torch.device
    chunk_seconds: float | None
    progress: bool

    def build(self, out: Path, utterances: list[Utterance], root: Path, desc: str) -> CacheSummary:
        cfg, teacher = self.cfg, self.teacher
        frontend = FrontEnd(teacher.feature_extractor)
        fingerprint = run_fingerprint(cfg, teacher, self.layers, utterances, frontend)
        dtype = autocast_dtype(cfg.train.precision, self.device)
        fingerprint["teacher_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        segments = plan_segments(
            utterances, cfg.data.max_duration, frontend.sample_rate, frontend.min_samples
        )
        writer = CacheWriter(out, fingerprint, len(segments), teacher.encoder.hidden_dim)
        started, start_segment = time.perf_counter(), writer.num_segments
        try:
            if not writer.complete:
                self._fill(writer, segments, root, frontend, desc)
        finally:
            writer.close()
        return _summary(out, writer.num_segments - start_segment, time.perf_counter() - started)

    def _fill(
        self,
        writer: CacheWriter,
        segments: list[Segment],
        root: Path,
        frontend: FrontEnd,
        desc: str,
    ) -> None:
        """Compute and append the segments ``writer`` lacks, then mark the cache complete."""
        cfg, out, start_segment = self.cfg, writer.directory, writer.num_segments
        if out.name != DEV_DIR:  # a dev cache is completed through its parent's build
            dump_config(cfg, out / BUILD_CONFIG_FILE)
        if start_segment:
            log.info("completing %s from segment %d of %d", out, start_segment, len(segments))
        self.teacher.encoder.to(self.device).eval()
        chunk_seconds = self.chunk_seconds or 4 * cfg.data.batch_seconds
        loader = DataLoader(
            _ChunkDataset(_chunks(segments, start_segment, chunk_seconds), root, frontend),
            batch_size=None,
            num_workers=cfg.data.num_workers,
            collate_fn=_identity,
        )
        bar = tqdm(
            total=len(segments),
            initial=start_segment,
            unit="seg",
            desc=desc,
            disable=not self.progress,
        )
        for chunk in loader:
            _write_chunk(
                writer, chunk, self.teacher, self.layers, cfg, frontend.sample_rate, self.device
            )
            bar.update(len(chunk))
        bar.close()
        writer.finish()


def _write_chunk(
    writer: CacheWriter,
    chunk: list[tuple[Segment, torch.Tensor | None, int, str | None]],
    teacher: LoadedModel,
    layers: list[int],
    cfg: RunConfig,
    sample_rate: int,
    device: torch.device,
) -> None:
    usable = [(s, f, n) for s, f, n, reason in chunk if reason is None]
    target, batch_seconds = cfg.objective.target, cfg.data.batch_seconds
    with teacher_autocast(cfg.train.precision, device):
        computed = _teacher_chunk(
            teacher, usable, layers, target, batch_seconds, sample_rate, device
        )
    states = iter(computed)
    rows, targets = [], []
    for segment, _, num_samples, reason in chunk:
        row: dict[str, Any] = {
            "id": segment.id,
            "utterance_id": segment.utterance.id,
            "path": segment.utterance.path,
            "offset": segment.offset,
            "duration": segment.duration,
            "num_samples": num_samples,
        }
        if reason is None:
            target = next(states)
            row["num_frames"] = int(target[layers[0]].shape[0])
            targets.append(target)
        else:
            row.update(num_frames=0, skipped=reason)
            targets.append({})
        rows.append(row)
    writer.append(rows, targets, [None if f is None else f.numpy() for _, f, _, _ in chunk])


def _summary(directory: Path, built: int, seconds: float) -> CacheSummary:
    cache = open_cache(directory)
    return CacheSummary(
        directory=directory,
        num_segments=len(cache.rows),
        num_skipped=sum(1 for r in cache.rows if r.get("skipped")),
        audio_hours=cache.audio_seconds / 3600,
        num_bytes=directory_bytes(directory),
        built=built,
        build_seconds=seconds,
    )
