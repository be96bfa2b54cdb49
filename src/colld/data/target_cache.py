"""The teacher-target cache on disk: fixed segments of a corpus and the teacher's targets.

The teacher always sees exactly the segment the student sees, so targets can only be cached
for segments fixed in advance: every utterance (the first ``duration`` seconds of a whole-file
row, the region [offset, offset + duration) of a region row) is cut into consecutive segments
of ``segment_seconds`` (``data.max_duration``), counted in samples at the front end's rate;
the remainder becomes a last, shorter segment when it holds at least the front end's shortest
clip (``FrontEnd.min_samples``: 10 ms for Whisper's log-mel, 25 ms for waveform families,
35 ms for w2v-BERT), and is dropped otherwise. Cached training uses these segments whole (no
random crops); each is a region row (``Utterance.offset`` set, 0 included), read exactly by
the build and by training (``colld.data.utterance_audio.load_region``).

A cache directory holds
    fingerprint.json   what the targets depend on (``COMPARED_KEYS``) plus provenance
    build_config.yaml  the run config it was built with (``colld cache-teacher --config`` it
                       to complete a partial cache)
    index.jsonl        one row per segment in build order: id, utterance_id, path, offset,
                       duration (seconds read), num_samples, num_frames, frame_offset, and
                       ``skipped`` (the reason) for audio that could not be used
    layer_XX.f16       one per cached teacher layer XX: raw little-endian float16,
                       Shape: (N, D_t), N = all frames of all segments; segment rows are
                       [frame_offset, frame_offset + num_frames)
    features.f32       the front end's output for each segment (what the student sees):
                       raw little-endian float32, Shape: (M, C), M = all front-end frames
                       (samples for waveform families, C = 1 there); segment rows are
                       [feature_offset, feature_offset + num_feature_frames). Cached training
                       reads them instead of decoding audio and running the front end, which
                       is what limits a GPU run's data loading. Caches built before this file
                       existed (no ``features`` in fingerprint.json) read the audio instead.
    progress.json      committed segments and frames, replaced atomically after each chunk
    complete           written last (the summary); its absence means partial
    dev/               the dev split's cache, the same layout (its own fingerprint and
                       segments, no build_config.yaml): ``colld cache-teacher`` builds it after
                       the training data's, so that a cached run computes its dev loss without
                       the teacher too (``colld.train.teacher_cache``)

Writing is append-only in index order: a chunk's target bytes are appended and fsynced, then
its index rows, then ``progress.json`` is replaced; a rerun truncates everything to the last
committed progress and continues there, so an interrupted build never leaves a torn segment.

Shape legend: N cached frames, D_t teacher width, M front-end frames (or samples), C feature
channels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked
    fcntl = None  # type: ignore[assignment]

from colld.data.manifest import Utterance
from colld.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
BUILD_CONFIG_FILE = "build_config.yaml"
INDEX_FILE = "index.jsonl"
PROGRESS_FILE = "progress.json"
COMPLETE_FILE = "complete"
DEV_DIR = "dev"
DTYPE = np.dtype("<f2")
FEATURES_FILE = "features.f32"
FEATURE_DTYPE = np.dtype("<f4")
# Keys of fingerprint.json that must match the run; the rest is provenance (teacher spec,
# colld version, dtypes, widths) and is recorded only.
COMPARED_KEYS = (
    "format",
    "teacher_fingerprint",
    "target",
    "teacher_layers",
    "front_end",
    "segment_seconds",
    "data",
    "augmentation",
)


class StaleCacheError(ValueError):
    """The cache was built for other teacher, layers, front end, segments, data or augmentation."""


class PartialCacheError(ValueError):
    """The cache build was interrupted; the message says how far it got and how to finish it."""


class CacheBusyError(RuntimeError):
    """Another process holds the cache directory's build lock."""


# ---------------------------------------------------------------- segments
@dataclass(frozen=True)
class Segment:
    """The ``index``-th fixed segment of ``utterance``: [offset, offset + duration) seconds."""

    utterance: Utterance
    index: int
    offset: float
    duration: float

    @property
    def id(self) -> str:
        return f"{self.utterance.id}#{self.index}"

    def as_utterance(self) -> Utterance:
        """The segment as a manifest row (the utterance's metadata, the segment's region)."""
        return replace(self.utterance, id=self.id, offset=self.offset, duration=self.duration)


def plan_segments(
    utterances: Sequence[Utterance], segment_seconds: float, sample_rate: int, min_samples: int
) -> list[Segment]:
    """Cut each utterance into consecutive segments of ``segment_seconds`` (module doc)."""
    segment_samples = round(segment_seconds * sample_rate)
    if segment_samples < min_samples:
        raise ValueError(
            f"segments of {segment_seconds} s are shorter than the front end's minimum clip "
            f"({min_samples} samples at {sample_rate} Hz)"
        )
    segments: list[Segment] = []
    seen: set[str] = set()
    for utt in utterances:
        total = round(utt.duration * sample_rate)
        starts = list(range(0, total, segment_samples))
        if starts and total - starts[-1] < min_samples:
            starts.pop()  # a remainder too short for the front end
        for index, start in enumerate(starts):
            length = min(segment_samples, total - start)
            segment = Segment(
                utterance=utt,
                index=index,
                offset=utt.start + start / sample_rate,
                duration=length / sample_rate,
            )
            if segment.id in seen:
                raise ValueError(f"segment id '{segment.id}' occurs twice; rename the utterance")
            seen.add(segment.id)
            segments.append(segment)
    return segments


def data_record(utterances: Sequence[Utterance]) -> dict[str, Any]:
    """Count and hash of the utterances (id, path, start, duration[, channel], in order).

    A whole-file row hashes as a region from 0 (its ``start``): both plan the same segments,
    and caches built before regions existed (when every row had a number here) stay valid.
    A row's channel enters the hash only when it names one, for the same reason.
    """
    digest = hashlib.blake2b(digest_size=12)
    for utt in utterances:
        channel = "" if utt.channel is None else f"\tchannel={utt.channel}"
        line = f"{utt.id}\t{utt.path}\t{utt.start:.6f}\t{utt.duration:.6f}{channel}\n"
        digest.update(line.encode())
    return {"num_utterances": len(utterances), "hash": digest.hexdigest()}


# ---------------------------------------------------------------- fingerprints
def fingerprint_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per compared key that differs. A cache holding more teacher layers than
    ``expected`` needs is fine; one missing any of them is not."""
    lines = []
    for key in COMPARED_KEYS:
        have, want = found.get(key), expected.get(key)
        if key == "teacher_layers" and isinstance(have, list) and isinstance(want, list):
            missing = sorted(set(want) - set(have))
            if missing:
                lines.append(f"teacher_layers: the cache holds {have}, the run needs {want}")
            continue
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            detail = ", ".join(f"{k}={have.get(k)!r} vs {want.get(k)!r}" for k in keys)
            lines.append(f"{key}: cache vs run: {detail}")
        else:
            lines.append(f"{key}: the cache has {have!r}, the run has {want!r}")
    return lines


def complete_command(directory: Path) -> str:
    """The command that completes the partial cache in ``directory``: the build of its parent
    for a nested dev cache (``DEV_DIR``), which is built with the training data's."""
    if directory.name == DEV_DIR and (directory.parent / BUILD_CONFIG_FILE).is_file():
        directory = directory.parent
    return f"colld cache-teacher --config {directory / BUILD_CONFIG_FILE} --out {directory}"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def layer_file(directory: Path, layer: int) -> Path:
    return directory / f"layer_{layer:02d}.f16"


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


# ---------------------------------------------------------------- writing
def _lock_directory(directory: Path) -> int | None:
    """An exclusive, non-blocking lock on ``directory`` (an open descriptor; closing it, or the
    process ending, releases it), so that two builds never append to one cache. Raises
    CacheBusyError when another process holds it. None where ``fcntl`` is missing (Windows)."""
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheBusyError(
            f"another process is building the teacher-target cache in {directory}; wait for "
            "it to end (rerunning then completes or reuses its work) or choose another directory"
        ) from None
    return fd


class CacheWriter:
    """Appends committed chunks of segments to a cache directory (new or partial).

    fingerprint: the full fingerprint (``COMPARED_KEYS`` and provenance); an existing
        directory must have been started with the same compared values, layers included. Its
        ``features`` entry ({"dtype", "dim"}: C, None for 1-D waveforms) asks for front-end
        features to be stored too; a partial cache started without them is completed without.
    num_planned: segments the finished cache will hold (for progress and messages).
    dim: D_t, the width of every cached layer.
    """

    def __init__(
        self, directory: str | Path, fingerprint: dict[str, Any], num_planned: int, dim: int
    ) -> None:
        self.directory = Path(directory)
        self.layers: list[int] = list(fingerprint["teacher_layers"])
        self.dim = int(dim)
        self.num_planned = int(num_planned)
        self.features: dict[str, Any] | None = fingerprint.get("features")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = _lock_directory(self.directory)
        try:
            self._open(fingerprint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's build lock (also released when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _open(self, fingerprint: dict[str, Any]) -> None:
        """Check or write the fingerprint, then truncate to the last commit."""
        path = self.directory / FINGERPRINT_FILE
        if path.is_file():
            found = _read_json(path)
            self.features = found.get("features")  # what the directory was started with
            differences = fingerprint_differences(found, fingerprint)
            if found.get("teacher_layers") != self.layers:
                if self.complete and not differences:  # it holds more layers: fine
                    self.layers = list(found["teacher_layers"])
                else:
                    differences.append(
                        f"teacher_layers: the cache holds {found.get('teacher_layers')}, "
                        f"this build writes {self.layers}"
                    )
            if differences:
                raise StaleCacheError(
                    f"{self.directory} holds a teacher-target cache built for another config ("
                    + "; ".join(dict.fromkeys(differences))
                    + "); delete it or choose another output directory"
                )
        elif any(self.directory.iterdir()):
            raise FileExistsError(
                f"{self.directory} is not empty and holds no {FINGERPRINT_FILE}: not a "
                "teacher-target cache; choose another output directory"
            )
        else:
            write_text_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
        progress = self._read_progress()
        self.num_segments, self.num_frames = progress["segments"], progress["frames"]
        self.num_feature_frames = progress.get("feature_frames", 0)
        self._truncate_to_progress()
        if not self.complete:
            self._write_progress()

    @property
    def complete(self) -> bool:
        return (self.directory / COMPLETE_FILE).is_file()

    def _read_progress(self) -> dict[str, int]:
        path = self.directory / PROGRESS_FILE
        if not path.is_file():
            return {"segments": 0, "frames": 0, "planned": self.num_planned}
        return _read_json(path)

    def _truncate_to_progress(self) -> None:
        """Drop whatever an interrupted chunk left past the last commit."""
        if self.complete:
            return
        row_bytes = self.dim * DTYPE.itemsize
        for layer in self.layers:
            path = layer_file(self.directory, layer)
            with path.open("ab") as f:
                f.truncate(self.num_frames * row_bytes)
        if self.features is not None:
            with (self.directory / FEATURES_FILE).open("ab") as f:
                f.truncate(self.num_feature_frames * feature_row_bytes(self.features))
        index = self.directory / INDEX_FILE
        lines = index.read_text(encoding="utf-8").splitlines(True) if index.is_file() else []
        if len(lines) != self.num_segments:
            if len(lines) < self.num_segments:
                raise StaleCacheError(
                    f"{index} has {len(lines)} rows but {PROGRESS_FILE} commits "
                    f"{self.num_segments}: the cache is damaged; delete it and rebuild"
                )
            write_text_atomic(index, "".join(lines[: self.num_segments]))

    def append(
        self,
        rows: Sequence[dict[str, Any]],
        targets: Sequence[dict[int, np.ndarray]],
        features: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        """Commit one chunk: ``rows`` (index fields without frame_offset) in index order and,
        per row, layer -> targets, Shape: (num_frames, D_t) float, and (when the cache stores
        them) its front-end features, Shape: (F, C) or (S,). A skipped row has neither."""
        if self.features is not None and features is None:
            raise ValueError(f"{self.directory} stores front-end features: pass them")
        per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        feature_parts: list[np.ndarray] = []
        out_rows = []
        frames, feature_frames = self.num_frames, self.num_feature_frames
        for i, (row, states) in enumerate(zip(rows, targets, strict=True)):
            row = dict(row, frame_offset=frames)
            if self.features is not None and not row.get("skipped"):
                values = _feature_rows(features[i], self.features, row["id"])
                row.update(feature_offset=feature_frames, num_feature_frames=values.shape[0])
                feature_parts.append(values)
                feature_frames += values.shape[0]
            if not row.get("skipped"):
                for layer in self.layers:
                    values = np.asarray(states[layer], dtype=np.float32)
                    if values.shape != (row["num_frames"], self.dim):
                        raise ValueError(
                            f"segment {row['id']} layer {layer}: expected targets of Shape "
                            f"({row['num_frames']}, {self.dim}), found {values.shape}"
                        )
                    half = values.astype(DTYPE)
                    if not np.isfinite(half).all():
                        raise ValueError(
                            f"segment {row['id']} layer {layer}: targets up to "
                            f"{np.abs(values).max():.4g} do not fit float16 (max 65504)"
                        )
                    per_layer[layer].append(half)
                frames += row["num_frames"]
            out_rows.append(row)
        files = [(layer_file(self.directory, layer), parts) for layer, parts in per_layer.items()]
        if self.features is not None:
            files.append((self.directory / FEATURES_FILE, feature_parts))
        for path, parts in files:
            with path.open("ab") as f:
                for part in parts:
                    f.write(part.tobytes())
                f.flush()
                os.fsync(f.fileno())
        with (self.directory / INDEX_FILE).open("a", encoding="utf-8") as f:
            for row in out_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.num_segments += len(out_rows)
        self.num_frames, self.num_feature_frames = frames, feature_frames
        self._write_progress()

    def _write_progress(self) -> None:
        progress = {
            "segments": self.num_segments,
            "frames": self.num_frames,
            "feature_frames": self.num_feature_frames,
            "planned": self.num_planned,
        }
        write_text_atomic(self.directory / PROGRESS_FILE, json.dumps(progress) + "\n")

    def finish(self) -> dict[str, Any]:
        """Write the ``complete`` marker (all planned segments must be committed)."""
        if self.num_segments != self.num_planned:
            raise RuntimeError(f"finish() after {self.num_segments} of {self.num_planned} segments")
        summary = {"segments": self.num_segments, "frames": self.num_frames}
        write_text_atomic(self.directory / COMPLETE_FILE, json.dumps(summary) + "\n")
        return summary


def feature_row_bytes(features: dict[str, Any]) -> int:
    """Bytes per stored front-end frame (per sample for 1-D waveforms)."""
    return (features["dim"] or 1) * FEATURE_DTYPE.itemsize


def _feature_rows(values: Any, features: dict[str, Any], segment_id: str) -> np.ndarray:
    """One segment's front-end output as stored rows. Shape: (F, C) or (S,) -> (M, C or 1)."""
    array = np.asarray(values, dtype=FEATURE_DTYPE)
    dim = features["dim"]
    expected = f"(frames, {dim})" if dim else "(samples,)"
    if array.ndim != (2 if dim else 1) or (dim and array.shape[1] != dim):
        raise ValueError(
            f"segment {segment_id}: expected front-end features of Shape {expected}, found "
            f"{array.shape}"
        )
    return array.reshape(array.shape[0], dim or 1)


# ---------------------------------------------------------------- reading
class TargetCache:
    """A complete cache, opened read-only. Memory maps open lazily in each process (a
    DataLoader worker pickles the object without them)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.fingerprint: dict[str, Any] = _read_json(self.directory / FINGERPRINT_FILE)
        self.layers: list[int] = list(self.fingerprint["teacher_layers"])
        self.dim = int(self.fingerprint["teacher_dim"])
        self.sample_rate = int(self.fingerprint["front_end"]["sample_rate"])
        progress = _read_json(self.directory / PROGRESS_FILE)
        self.num_frames = int(progress["frames"])
        self.features: dict[str, Any] | None = self.fingerprint.get("features")
        self.num_feature_frames = int(progress.get("feature_frames", 0))
        lines = (self.directory / INDEX_FILE).read_text(encoding="utf-8").splitlines()
        self.rows: list[dict[str, Any]] = [json.loads(line) for line in lines]
        self._by_id = {row["id"]: row for row in self.rows}
        self._maps: dict[int, np.memmap] | None = None
        self._feature_map: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_feature_map": None}

    @property
    def has_features(self) -> bool:
        """Whether the cache stores the segments' front-end features (newer caches do)."""
        return self.features is not None

    @property
    def audio_seconds(self) -> float:
        return sum(r["num_samples"] for r in self.rows if not r.get("skipped")) / self.sample_rate

    @property
    def num_bytes(self) -> int:
        return directory_bytes(self.directory)

    def row(self, segment_id: str) -> dict[str, Any]:
        try:
            return self._by_id[segment_id]
        except KeyError:
            raise KeyError(f"segment '{segment_id}' is not in the cache {self.directory}") from None

    def _open_maps(self) -> dict[int, np.memmap]:
        if self._maps is None:
            shape = (self.num_frames, self.dim)
            self._maps = {
                layer: _memmap(layer_file(self.directory, layer), DTYPE, shape)
                for layer in self.layers
            }
        return self._maps

    def read(self, segment_id: str, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Targets of one segment (copies). Shape: layer -> (num_frames, D_t) float16."""
        row = self._usable_row(segment_id)
        maps = self._open_maps()
        start, stop = row["frame_offset"], row["frame_offset"] + row["num_frames"]
        return {layer: np.array(maps[layer][start:stop]) for layer in layers or self.layers}

    def read_features(self, segment_id: str) -> np.ndarray:
        """Front-end features of one segment (a copy), exactly what the build's front end gave.
        Shape: (F, C) float32, or (S,) for waveform families."""
        if self.features is None:
            raise KeyError(f"the cache {self.directory} stores no front-end features")
        row = self._usable_row(segment_id)
        if self._feature_map is None:
            width = feature_row_bytes(self.features) // FEATURE_DTYPE.itemsize
            shape = (self.num_feature_frames, width)
            self._feature_map = _memmap(self.directory / FEATURES_FILE, FEATURE_DTYPE, shape)
        start = row["feature_offset"]
        values = np.array(self._feature_map[start : start + row["num_feature_frames"]])
        return values if self.features["dim"] else values[:, 0]

    def _usable_row(self, segment_id: str) -> dict[str, Any]:
        row = self.row(segment_id)
        if row.get("skipped"):
            raise KeyError(f"segment '{segment_id}' was skipped when the cache was built")
        return row

    def segment_utterances(self, utterances: Sequence[Utterance]) -> list[Utterance]:
        """The cached, usable segments of ``utterances`` as manifest rows (metadata from
        ``utterances``). They may be a subset of the cached data (``data.train_hours``): the
        other utterances' segments are left out; the fingerprint check has made sure that
        the cache was built from the data they come from."""
        by_id = {utt.id: utt for utt in utterances}
        out = []
        for row in self.rows:
            if row.get("skipped") or row["utterance_id"] not in by_id:
                continue
            base = by_id[row["utterance_id"]]
            out.append(replace(base, id=row["id"], offset=row["offset"], duration=row["duration"]))
        return out


def _memmap(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.memmap:
    """A read-only map of a raw cache file of ``shape`` rows; a file of another size is
    refused as damaged. An empty file maps as an empty array (np.memmap refuses size 0)."""
    expected = shape[0] * shape[1] * dtype.itemsize
    if path.stat().st_size != expected:
        raise StaleCacheError(
            f"{path} holds {path.stat().st_size} bytes, expected {expected}: the cache is "
            "damaged; delete it and rebuild"
        )
    if not expected:
        return np.zeros(shape, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def cache_progress(directory: str | Path) -> dict[str, int]:
    """{"segments", "frames", "planned"} committed so far (zeros when nothing is)."""
    path = Path(directory) / PROGRESS_FILE
    return _read_json(path) if path.is_file() else {"segments": 0, "frames": 0, "planned": 0}


def open_cache(directory: str | Path, expected: dict[str, Any] | None = None) -> TargetCache:
    """Open a complete cache whose fingerprint matches ``expected`` (None = skip the check).

    Raises FileNotFoundError (no cache there), StaleCacheError (naming each differing key with
    both values), PartialCacheError (how far the build got and the command that completes it).
    """
    directory = Path(directory)
    path = directory / FINGERPRINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no teacher-target cache in {directory} ({FINGERPRINT_FILE} is missing); build it "
            f"with: colld cache-teacher --out {directory} (same config as the run)"
        )
    found = _read_json(path)
    if expected is not None:
        differences = fingerprint_differences(found, expected)
        if differences:
            raise StaleCacheError(
                f"the teacher-target cache {directory} does not match this run: "
                + "; ".join(differences)
                + ". Build one for this run (colld cache-teacher --out NEW_DIR with the run's "
                "config) or remove data.target_cache"
            )
    if not (directory / COMPLETE_FILE).is_file():
        progress = cache_progress(directory)
        raise PartialCacheError(
            f"the teacher-target cache {directory} is partial: its build stopped after "
            f"{progress['segments']} of {progress.get('planned', '?')} segments. Complete it "
            f"with: {complete_command(directory)}"
        )
    return TargetCache(directory)
