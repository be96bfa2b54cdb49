"""Readers for real corpora: every layout becomes a list of ``Utterance`` plus a root.

Each reader returns ``ReadResult(utterances, root, problems)``: utterance paths are absolute or
relative to ``root``; ``problems`` holds one line per skipped entry (file:line or path, and
why), so callers can warn and count. Entries are skipped for: unreadable/empty/unsupported
audio, missing files, missing or wrong-typed fields, non-positive durations, duplicate ids
(the first is kept), and relative paths that lead outside the corpus root (``../../x``; see
``colld.data.manifest``: the manifest's folder, the TSV's audio root, fairseq's root line, the
dataset folder, or lhotse's working directory / manifest folder; absolute paths are allowed).
A reader raises ``ReaderError`` naming the input when nothing usable is left.
``verify=True`` also decodes every row (its whole file, or a region row's region), which
catches corrupt bodies, NaN/Inf samples and regions past the file's end that a header alone
does not show; it costs a full decode of the corpus.

Layouts: a directory of audio files, colld's JSONL manifest, TSV (header with a path/audio
column, or fairseq's root-line layout), lhotse CutSet/RecordingSet (.jsonl or .jsonl.gz), and a
Hugging Face ``datasets`` dataset saved with ``save_to_disk``. ``read_any`` picks the reader.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import soundfile as sf

from colld.audio import AUDIO_SUFFIXES, SAMPLE_RATE, AudioError, audio_duration
from colld.data.manifest import (
    CORPUS_SUBFOLDERS,
    Utterance,
    corpus_root,
    escapes_root,
    outside_root_problem,
    read_manifest,
    write_manifest,
)
from colld.data.utterance_audio import load_utterance

logger = logging.getLogger(__name__)

# TSV header names (lower case) mapped to Utterance fields; the first alias present wins.
TSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "audio", "audio_path", "audio_filepath", "file", "filename", "wav"),
    "id": ("id", "utt_id", "utterance_id", "key"),
    "duration": ("duration", "duration_s"),
    "text": ("text", "sentence", "transcript", "transcription"),
    "language": ("language", "lang", "locale"),
    "voice": ("voice", "speaker", "speaker_id", "client_id"),
    "text_en": ("text_en",),
    "phonemes": ("phonemes",),
    "split": ("split",),
    "sentence_id": ("sentence_id",),
}
# Hugging Face dataset columns mapped to Utterance fields (the audio column is an argument).
HF_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id", "utt_id", "audio_id", "key"),
    "text": ("text", "sentence", "transcription", "transcript", "normalized_text"),
    "language": ("language", "lang", "locale"),
    "voice": ("speaker", "speaker_id", "client_id", "voice"),
    "text_en": ("text_en",),
}
_MAX_PROBLEMS_IN_ERROR = 5


class ReaderError(ValueError):
    """An input that cannot be read as a corpus, or one where nothing usable remains."""


class ReadResult(NamedTuple):
    utterances: list[Utterance]
    root: Path
    problems: list[str]


# ---------------------------------------------------------------- shared checks
def _finish(
    source: Path,
    entries: Iterable[tuple[str, Utterance]],
    root: Path,
    problems: list[str],
    *,
    check_files: bool,
    verify: bool,
    top: Path | None = None,
) -> ReadResult:
    """Drop duplicates, paths outside the corpus root, bad durations, missing (and, with
    ``verify``, undecodable) files.

    entries: (where, utterance) pairs; ``where`` (file:line, or the audio path) starts each
    problem line.
    top: the folder relative paths (resolved against ``root``) may not leave; None = ``root``.
    """
    kept: list[Utterance] = []
    seen: set[str] = set()
    top = root if top is None else top
    for where, utt in entries:
        audio = utt.resolved_path(root)
        if escapes_root(utt.path, root, top):
            problems.append(outside_root_problem(where, utt.id, utt.path, top))
            continue
        if utt.id in seen:
            problems.append(f"{where}: duplicate id '{utt.id}' (first kept)")
            continue
        if not math.isfinite(utt.duration) or utt.duration <= 0:
            problems.append(f"{where}: id '{utt.id}' has duration {utt.duration}, expected > 0")
            continue
        if check_files and not audio.is_file():
            problems.append(f"{where}: id '{utt.id}': audio file {audio} not found")
            continue
        if verify:
            try:
                load_utterance(utt, root, SAMPLE_RATE)
            except AudioError as err:
                problems.append(f"{where}: id '{utt.id}': {err}")
                continue
        seen.add(utt.id)
        kept.append(utt)
    if problems:
        logger.warning("%s: skipped %d entries; first: %s", source, len(problems), problems[0])
        for line in problems:
            logger.debug("skipped: %s", line)
    if not kept:
        shown = "; ".join(problems[:_MAX_PROBLEMS_IN_ERROR]) or "no entries found"
        raise ReaderError(f"{source}: no usable utterances ({len(problems)} skipped: {shown})")
    return ReadResult(kept, root, problems)


def _id_from_path(relative: str) -> str:
    """An utterance id from a path relative to the root: the path without its suffix."""
    return Path(relative).with_suffix("").as_posix()


# ---------------------------------------------------------------- directory
def read_directory(directory: str | Path, *, verify: bool = False) -> ReadResult:
    """Every audio file (``AUDIO_SUFFIXES``) under ``directory``, recursively, following
    symlinks. ids and paths are relative to ``directory`` (ids without the suffix); durations
    come from the headers (soundfile)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReaderError(f"{directory}: not a directory")
    files = _audio_files(directory)
    if not files:
        raise ReaderError(
            f"{directory}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found, recursively"
        )
    entries: list[tuple[str, Utterance]] = []
    problems: list[str] = []
    for path in files:
        relative = path.relative_to(directory).as_posix()
        try:
            duration = audio_duration(path)
        except AudioError as err:
            problems.append(str(err))
            continue
        utt = Utterance(id=_id_from_path(relative), path=relative, duration=duration)
        entries.append((str(path), utt))
    return _finish(directory, entries, directory, problems, check_files=False, verify=verify)


def _audio_files(directory: Path) -> list[Path]:
    found: list[Path] = []
    visited: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        real = Path(dirpath).resolve()
        if real in visited:  # a symlink cycle
            dirnames.clear()
            continue
        visited.add(real)
        found.extend(
            Path(dirpath) / name
            for name in filenames
            if Path(name).suffix.lower() in AUDIO_SUFFIXES
        )
    return sorted(found)


def scan_directory(
    directory: str | Path, out_manifest: str | Path, *, verify: bool = False
) -> Path:
    """Write a colld JSONL manifest of every audio file under ``directory`` (``colld data
    scan DIR``). Paths are relative to the manifest's folder when the audio lies under it,
    absolute otherwise. Skipped files are logged. Returns the manifest path."""
    result = read_directory(directory, verify=verify)
    out_manifest = Path(out_manifest)
    manifest_dir = Path(os.path.abspath(out_manifest.parent))  # abspath keeps symlinked files
    rows = []
    for utt in result.utterances:
        audio = Path(os.path.abspath(utt.resolved_path(result.root)))
        path = audio.relative_to(manifest_dir) if audio.is_relative_to(manifest_dir) else audio
        rows.append(replace(utt, path=path.as_posix()))
    write_manifest(rows, out_manifest)
    logger.info(
        "wrote %s: %d utterances, %.1f h, %d files skipped",
        out_manifest,
        len(rows),
        sum(u.duration for u in rows) / 3600,
        len(result.problems),
    )
    return out_manifest


# ---------------------------------------------------------------- JSONL (colld)
def read_jsonl(path: str | Path, *, verify: bool = False) -> ReadResult:
    """colld's own JSONL manifest (``colld.data.manifest``); root = the manifest's folder."""
    path = Path(path)
    utterances, problems = read_manifest(path)
    entries = [(str(path), utt) for utt in utterances]
    return _finish(
        path, entries, path.parent, problems, check_files=True, verify=verify, top=corpus_root(path)
    )


# ---------------------------------------------------------------- TSV
def read_tsv(path: str | Path, *, verify: bool = False) -> ReadResult:
    """A tab-separated manifest, either

    - with a header row naming a path column (any of ``TSV_COLUMNS["path"]``, e.g. ``path``,
      ``audio``) and optional id, duration, text/sentence, language/locale,
      speaker/client_id (-> ``voice``), text_en, phonemes, split, sentence_id columns. Paths are
      relative to the TSV's folder; Common Voice's layout (paths relative to ``clips/`` beside
      the TSV) is recognised. Without a duration column durations are read from the files.
    - or fairseq's wav2vec manifest: a first line holding the root folder (relative to the
      TSV's folder if not absolute), then ``relative_path<TAB>num_samples`` rows at 16 kHz.

    Fields are split on tabs only (no quoting, as Common Voice and fairseq write them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV manifest {path} does not exist")
    with path.open(encoding="utf-8", newline="") as f:
        rows = [
            (line_no, row)
            for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1)
            if row and any(cell.strip() for cell in row)
        ]
    if not rows:
        raise ReaderError(f"{path}: empty TSV")
    first = [cell.strip() for cell in rows[0][1]]
    columns = _header_columns(first)
    if "path" in columns:
        return _read_header_tsv(path, columns, rows[1:], verify)
    if len(first) == 1:
        return _read_fairseq_tsv(path, first[0], rows[1:], verify)
    raise ReaderError(
        f"{path}: the first line is neither a header with a path column (one of "
        f"{', '.join(TSV_COLUMNS['path'])}) nor a fairseq root folder; found {first[:6]}"
    )


def _header_columns(header: list[str]) -> dict[str, int]:
    lowered = [name.lower() for name in header]
    columns: dict[str, int] = {}
    for field, aliases in TSV_COLUMNS.items():
        for alias in aliases:
            if alias in lowered:
                columns[field] = lowered.index(alias)
                break
    return columns


def _read_header_tsv(
    path: Path, columns: dict[str, int], rows: list[tuple[int, list[str]]], verify: bool
) -> ReadResult:
    num_columns = max(columns.values()) + 1
    root = _tsv_audio_root(path.parent, rows, columns["path"])
    entries: list[tuple[str, Utterance]] = []
    problems: list[str] = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        if len(row) < num_columns:
            problems.append(f"{where}: expected at least {num_columns} columns, found {len(row)}")
            continue
        cells = {field: row[index].strip() for field, index in columns.items()}
        if not cells["path"]:
            problems.append(f"{where}: empty path")
            continue
        if "duration" in cells:
            try:
                duration = float(cells["duration"])
            except ValueError:
                problems.append(f"{where}: duration {cells['duration']!r} is not a number")
                continue
        else:
            try:
                duration = audio_duration(root / cells["path"])
            except AudioError as err:
                problems.append(f"{where}: {err}")
                continue
        optional = {
            field: cells.get(field) or None
            for field in ("text", "language", "voice", "text_en", "phonemes", "split")
        }
        entries.append(
            (
                where,
                Utterance(
                    id=cells.get("id") or _id_from_path(cells["path"]),
                    path=cells["path"],
                    duration=duration,
                    sentence_id=cells.get("sentence_id") or None,
                    **optional,
                ),
            )
        )
    return _finish(path, entries, root, problems, check_files=True, verify=verify)


def _tsv_audio_root(folder: Path, rows: list[tuple[int, list[str]]], path_column: int) -> Path:
    """The TSV's folder, or its ``clips/`` subfolder when the paths live there (Common Voice)."""
    clips = folder / "clips"
    if not clips.is_dir():
        return folder
    for _, row in rows:
        if len(row) > path_column and row[path_column].strip():
            relative = row[path_column].strip()
            if not (folder / relative).exists() and (clips / relative).exists():
                logger.info(
                    "%s: audio paths are relative to %s (Common Voice layout)", folder, clips
                )
                return clips
            return folder
    return folder


def _read_fairseq_tsv(
    path: Path, root_line: str, rows: list[tuple[int, list[str]]], verify: bool
) -> ReadResult:
    root = Path(root_line)
    if not root.is_absolute():
        root = path.parent / root
    entries: list[tuple[str, Utterance]] = []
    problems: list[str] = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        if len(row) < 2 or not row[0].strip():
            problems.append(f"{where}: expected 'relative_path<TAB>num_samples', found {row}")
            continue
        relative, num_samples = row[0].strip(), row[1].strip()
        if not num_samples.isdigit():
            problems.append(f"{where}: num_samples {num_samples!r} is not a whole number")
            continue
        duration = int(num_samples) / SAMPLE_RATE
        entries.append(
            (where, Utterance(id=_id_from_path(relative), path=relative, duration=duration))
        )
    return _finish(path, entries, root, problems, check_files=True, verify=verify)


# ---------------------------------------------------------------- lhotse
def read_lhotse(path: str | Path, *, verify: bool = False) -> ReadResult:
    """A lhotse CutSet or RecordingSet manifest (.jsonl or .jsonl.gz), one Utterance per cut.

    A cut that covers its whole recording becomes a whole-file row (``offset`` None); a cut
    that is a segment of a longer recording becomes the region row ``offset=cut.start``,
    ``duration=cut.duration`` (a segment starting at 0 s included). A cut of one channel of a
    multi-channel recording reads that channel alone (``Utterance.channel``, the column of the
    source file that holds it; a recording with one file per channel reads that file); a cut
    of all channels averages them. Skipped with a problem line: a segment reaching past its
    recording's end, a cut of several but not all channels, audio behind a transform other
    than Resample (speed, volume...), sources that are not local files, and a recording of
    several files read whole (all channels). Text,
    language and speaker come from the cut's supervisions. Relative source paths follow
    lhotse (relative to the working directory), falling back to the manifest's folder; paths
    are returned absolute.
    """
    from lhotse import Recording  # lhotse is a core dependency; imported here to keep startup light
    from lhotse.cut import MonoCut, MultiCut
    from lhotse.serialization import deserialize_item, open_best

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lhotse manifest {path} does not exist")
    entries: list[tuple[str, Utterance]] = []
    problems: list[str] = []
    with open_best(path, "r") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = deserialize_item(json.loads(line))
            except Exception as err:  # noqa: BLE001 - lhotse raises many types for bad rows
                problems.append(
                    f"{where}: not a lhotse cut or recording ({type(err).__name__}: {err})"
                )
                continue
            if isinstance(item, Recording):
                utt = _recording_to_utterance(item, path.parent, where, problems)
            elif isinstance(item, MonoCut | MultiCut):
                utt = _cut_to_utterance(item, path.parent, where, problems)
            else:
                problems.append(
                    f"{where}: {type(item).__name__} is not supported (expected MonoCut, "
                    f"MultiCut or Recording)"
                )
                continue
            if utt is not None:
                entries.append((where, utt))
    return _finish(path, entries, path.parent, problems, check_files=True, verify=verify)


def _recording_to_utterance(
    recording: Any, manifest_dir: Path, where: str, problems: list[str]
) -> Utterance | None:
    found = _recording_file(recording, manifest_dir, where, problems)
    if found is None:
        return None
    return Utterance(id=recording.id, path=str(found[0]), duration=float(recording.duration))


def _recording_file(
    recording: Any, manifest_dir: Path, where: str, problems: list[str], channel: int | None = None
) -> tuple[Path, int | None] | None:
    """The local file that holds ``channel`` of ``recording`` (None: all channels, which must
    be one file) and the column to read in it (None: the file's only channel, or all)."""
    if channel is None and len(recording.sources) != 1:
        problems.append(
            f"{where}: recording '{recording.id}' has {len(recording.sources)} sources read as "
            f"one (all channels); colld reads one file per utterance, or one channel"
        )
        return None
    sources = [s for s in recording.sources if channel is None or channel in s.channels]
    if not sources:
        problems.append(
            f"{where}: recording '{recording.id}' has no source for channel {channel} (its "
            f"channels: {recording.channel_ids})"
        )
        return None
    source = sources[0]
    column = (
        None if channel is None or len(source.channels) == 1 else source.channels.index(channel)
    )
    if source.type != "file":
        problems.append(
            f"{where}: recording '{recording.id}' has a '{source.type}' source; colld reads "
            f"local files only"
        )
        return None
    transforms = [
        t["name"] if isinstance(t, dict) else type(t).__name__ for t in recording.transforms or ()
    ]
    if any(name != "Resample" for name in transforms):
        problems.append(
            f"{where}: recording '{recording.id}' applies transforms {transforms}; colld reads "
            f"the file as it is"
        )
        return None
    audio = Path(source.source)
    if not audio.is_absolute():
        base = Path.cwd() if audio.exists() else manifest_dir
        top = base.parent if base == manifest_dir and base.name in CORPUS_SUBFOLDERS else base
        if escapes_root(source.source, base, top):
            problems.append(outside_root_problem(where, recording.id, source.source, top))
            return None
        audio = (base / audio).absolute()
    return audio, column


def _cut_to_utterance(
    cut: Any, manifest_dir: Path, where: str, problems: list[str]
) -> Utterance | None:
    recording = cut.recording
    if recording is None:
        problems.append(f"{where}: cut '{cut.id}' has no recording")
        return None
    tolerance = 1.5 / recording.sampling_rate
    if cut.start + cut.duration > recording.duration + tolerance:
        problems.append(
            f"{where}: cut '{cut.id}' ({cut.start:.3f} s + {cut.duration:.3f} s) reaches past "
            f"the end of recording '{recording.id}' ({recording.duration:.3f} s)"
        )
        return None
    whole = cut.start <= tolerance and abs(cut.duration - recording.duration) <= tolerance
    channels = cut.channel if isinstance(cut.channel, list) else [cut.channel]
    every = recording.num_channels == 1 or sorted(channels) == sorted(recording.channel_ids)
    if not every and len(channels) != 1:
        problems.append(
            f"{where}: cut '{cut.id}' uses channels {channels} of a {recording.num_channels}-"
            f"channel recording; colld reads one channel, or all channels averaged"
        )
        return None
    found = _recording_file(
        recording, manifest_dir, where, problems, channel=None if every else channels[0]
    )
    if found is None:
        return None
    audio, column = found
    supervisions = cut.supervisions or []
    texts = [s.text for s in supervisions if s.text]
    return Utterance(
        id=cut.id,
        path=str(audio),
        duration=float(cut.duration),
        offset=None if whole else float(cut.start),
        channel=column,
        text=" ".join(texts) or None,
        language=_single({s.language for s in supervisions}),
        voice=_single({s.speaker for s in supervisions}),
    )


def _single(values: set[Any]) -> str | None:
    values.discard(None)
    return str(next(iter(values))) if len(values) == 1 else None


# ---------------------------------------------------------------- Hugging Face datasets
def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading a Hugging Face dataset saved with save_to_disk needs the `datasets` "
            "package: pip install datasets"
        ) from err
    return datasets


def read_hf_dataset(
    path: str | Path,
    *,
    audio_column: str = "audio",
    split: str | None = None,
    export_dir: str | Path | None = None,
    verify: bool = False,
) -> ReadResult:
    """A ``datasets`` Dataset or DatasetDict saved with ``save_to_disk``.

    The audio column is read without decoding (``Audio(decode=False)``: ``{"bytes", "path"}``
    per row, or a plain path string). Audio stored inside the dataset (what ``save_to_disk``
    does with an ``Audio`` column) is written once to ``export_dir`` (default: a folder
    ``<dataset>-audio`` beside the dataset) as the file it was, which becomes the root;
    rows that point to existing files keep their absolute paths. For a DatasetDict all
    splits are read unless ``split`` names one; the split name goes to ``Utterance.split``.
    ids come from an id column, else the audio file's stem, else ``<split>-<row>``.
    """
    datasets = _import_datasets()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face dataset folder {path} does not exist")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys()) if split is None else [split]
        missing = [name for name in names if name not in loaded]
        if missing:
            raise ReaderError(f"{path}: no split {missing[0]!r}; found {list(loaded.keys())}")
        parts = [(name, loaded[name]) for name in names]
    else:
        parts = [(split, loaded)]
    root = Path(export_dir) if export_dir is not None else path.with_name(f"{path.name}-audio")
    entries: list[tuple[str, Utterance]] = []
    problems: list[str] = []
    for split_name, dataset in parts:
        if audio_column not in dataset.column_names:
            raise ReaderError(
                f"{path}: no audio column {audio_column!r}; columns are {dataset.column_names}"
            )
        if isinstance(dataset.features[audio_column], datasets.Audio):
            dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
        for index, row in enumerate(dataset):
            where = f"{path}[{split_name or 'data'}][{index}]"
            utt = _hf_row_to_utterance(row, audio_column, split_name, index, path, root, where)
            if isinstance(utt, str):
                problems.append(utt)
            else:
                entries.append((where, utt))
    return _finish(path, entries, root, problems, check_files=True, verify=verify)


def _hf_row_to_utterance(
    row: dict[str, Any],
    audio_column: str,
    split: str | None,
    index: int,
    dataset_dir: Path,
    root: Path,
    where: str,
) -> Utterance | str:
    """One dataset row as an Utterance, or a problem line."""
    value = row[audio_column]
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        return f"{where}: column '{audio_column}' holds no audio path or bytes ({type(value).__name__})"
    fields: dict[str, str | None] = {}
    for field, aliases in HF_COLUMNS.items():
        found = next((row[a] for a in aliases if a in row and row[a] is not None), None)
        if found is not None and not isinstance(found, str | int):
            return f"{where}: column for '{field}' should be a string, found {type(found).__name__}"
        fields[field] = None if found is None else str(found)
    source_name = value.get("path") or ""
    utt_id = fields.pop("id") or (Path(source_name).stem if source_name else None)
    utt_id = utt_id or f"{split or 'row'}-{index:08d}"
    try:
        if value.get("bytes"):
            audio = _export_bytes(value["bytes"], source_name, utt_id, split, root)
            relative: str = audio.relative_to(root).as_posix()
        else:
            if escapes_root(source_name, dataset_dir, dataset_dir):
                return outside_root_problem(where, utt_id, source_name, dataset_dir)
            audio = Path(source_name)
            audio = audio if audio.is_absolute() else (dataset_dir / audio).absolute()
            relative = str(audio)
        duration = audio_duration(audio)
    except AudioError as err:
        return f"{where}: {err}"
    return Utterance(id=utt_id, path=relative, duration=duration, split=split, **fields)


_SOUNDFILE_SUFFIX = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}


def _export_bytes(
    data: bytes, source_name: str, utt_id: str, split: str | None, root: Path
) -> Path:
    """Write encoded audio bytes to ``root`` once (same size on disk = already written)."""
    suffix = Path(source_name).suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        try:
            suffix = _SOUNDFILE_SUFFIX.get(sf.info(io.BytesIO(data)).format, ".wav")
        except sf.SoundFileError as err:
            raise AudioError(
                source_name or utt_id, f"embedded audio not readable ({err})", reason="unsupported"
            ) from err
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", utt_id)
    target = root / (split or "data") / f"{safe_id}{suffix}"
    if not (target.is_file() and target.stat().st_size == len(data)):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- dispatch
def read_any(path: str | Path, *, verify: bool = False) -> ReadResult:
    """Read whatever ``path`` is: a ``save_to_disk`` dataset folder (state.json or
    dataset_dict.json inside), a folder of audio files, a .tsv, a colld .jsonl manifest, or
    a lhotse manifest (.jsonl whose rows are cuts/recordings, .jsonl.gz)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    reader = _pick_reader(path)
    logger.info("reading %s with %s", path, reader.__name__)
    return reader(path, verify=verify)


def _pick_reader(path: Path) -> Callable[..., ReadResult]:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return read_hf_dataset
        return read_directory
    name = path.name.lower()
    if name.endswith(".tsv"):
        return read_tsv
    if name.endswith((".jsonl.gz", ".json.gz")):
        return read_lhotse
    if name.endswith(".jsonl"):
        return read_lhotse if _looks_like_lhotse(path) else read_jsonl
    raise ReaderError(
        f"{path}: cannot tell what this is; expected a folder (audio files or a save_to_disk "
        f"dataset), .tsv, .jsonl (colld or lhotse) or .jsonl.gz (lhotse)"
    )


def _looks_like_lhotse(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                cut_types = ("MonoCut", "MultiCut", "MixedCut", "PaddingCut", "Cut")
                return isinstance(row, dict) and (
                    "sources" in row or "recording" in row or row.get("type") in cut_types
                )
    return False
