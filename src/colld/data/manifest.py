"""The utterance manifest: one JSONL row per utterance, the corpus' single source of truth.

Row fields (JSON types):
    id (str, unique), path (str: absolute, or relative to the manifest's directory),
    duration (float, seconds), language (str, espeak-ng / ISO code, e.g. "de"),
    voice (str), text (str), text_en (str | null: English reference for parallel sentences),
    phonemes (str | null: IPA phonemes from espeak-ng, space-separated),
    split (str: "train", "dev", "probe-train", "probe-dev", "probe-test"),
    sentence_id (str | null: the same id across languages for a parallel sentence),
    offset (float >= 0, optional: seconds into the file where the utterance starts),
    channel (int >= 0, optional: read this channel of a multi-channel file alone; absent =
    all channels averaged).
A row with an ``offset`` (0 included) is exactly the region [offset, offset + duration) of its
file, e.g. a segment of a longer recording. A row without one (or with ``null``) is the whole
file: readers decode it from its start and tolerate a duration that under-states the file
(training then crops in memory). ``offset`` and ``channel`` are written only when set, so
manifests without them stay byte for byte as they were before these fields existed.

Path safety: a relative ``path`` must stay inside the corpus root, the manifest's folder or,
for colld's corpus layout (``<corpus>/manifests/*.jsonl`` and ``<corpus>/lhotse/`` beside
``<corpus>/audio/``), that folder's parent. A row whose relative path leads outside it
(``../../etc/passwd``) is skipped with a problem line naming the row. The check is lexical
(``..`` components; symlinks inside the corpus are followed, as for any file). Absolute paths
are allowed: they are explicit, and the person who wrote the manifest chose them.
Readers for foreign layouts (TSV, lhotse, HF datasets) live in ``colld.data.readers``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

_REQUIRED = {"id": str, "path": str, "duration": (int, float)}
_OPTIONAL_STR = ("language", "voice", "text", "text_en", "phonemes", "split", "sentence_id")


@dataclass
class Utterance:
    """One manifest row (fields in the module docstring).

    offset: None = the whole file; a number of seconds (0 included) = exactly the region
        [offset, offset + duration) of the file.
    channel: None = all channels averaged (mono files: their one channel); an int = that
        channel alone (0-based column of the file), e.g. one microphone of an array recording.
    """

    id: str
    path: str
    duration: float
    language: str | None = None
    voice: str | None = None
    text: str | None = None
    text_en: str | None = None
    phonemes: str | None = None
    split: str | None = None
    sentence_id: str | None = None
    offset: float | None = None
    channel: int | None = None

    @property
    def is_region(self) -> bool:
        """True when the row is exactly [offset, offset + duration), not the whole file."""
        return self.offset is not None

    @property
    def start(self) -> float:
        """Seconds into the file where the audio starts: the offset, 0 for a whole file."""
        return 0.0 if self.offset is None else self.offset

    def resolved_path(self, root: Path) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else root / path


CORPUS_SUBFOLDERS = ("manifests", "lhotse")


def corpus_root(manifest: str | Path) -> Path:
    """The folder a manifest's relative paths may not leave (see the module docstring)."""
    folder = Path(manifest).parent
    return folder.parent if folder.name in CORPUS_SUBFOLDERS else folder


def escapes_root(path: str, base: str | Path, root: str | Path) -> bool:
    """True when relative ``path``, resolved against ``base``, leads outside ``root``
    (lexically: ``..`` components are resolved, symlinks are not). Absolute paths: False."""
    if os.path.isabs(path):
        return False
    target = os.path.normpath(os.path.join(os.path.abspath(base), path))
    top = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([target, top]) != top


def outside_root_problem(where: str, utt_id: str, path: str, root: str | Path) -> str:
    """The problem line of a row whose relative path leaves the corpus root."""
    return (
        f"{where}: id '{utt_id}': relative path '{path}' leads outside the corpus root {root}; "
        "relative paths must stay inside it (write an absolute path if the audio really "
        "lives elsewhere)"
    )


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message names file, line and field."""


def row_to_utterance(row: object, where: str) -> Utterance:
    """Validate one decoded JSON row. ``where`` names the file and line for messages."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(row).__name__}")
    for key, types in _REQUIRED.items():
        if key not in row:
            raise ManifestError(f"{where}: missing required field '{key}'")
        if not isinstance(row[key], types) or isinstance(row[key], bool):
            raise ManifestError(
                f"{where}: field '{key}' should be {_type_name(types)}, "
                f"found {type(row[key]).__name__} {row[key]!r}"
            )
    for key in _OPTIONAL_STR:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ManifestError(
                f"{where}: field '{key}' should be a string or null, found {type(value).__name__}"
            )
    offset = row.get("offset")
    number = isinstance(offset, int | float) and not isinstance(offset, bool)
    if offset is not None and (not number or not math.isfinite(offset) or offset < 0):
        raise ManifestError(
            f"{where}: field 'offset' should be a number of seconds >= 0 (a region) or absent "
            f"(the whole file), found {offset!r}"
        )
    channel = row.get("channel")
    if channel is not None and (type(channel) is not int or channel < 0):
        raise ManifestError(
            f"{where}: field 'channel' should be an integer >= 0 (one channel of the file) or "
            f"absent (all channels averaged), found {channel!r}"
        )
    known = {f.name for f in fields(Utterance)}
    values = {k: v for k, v in row.items() if k in known}
    values["offset"] = None if offset is None else float(offset)
    return Utterance(**values)


def _type_name(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return "a number"
    return "a string" if types is str else types.__name__


def read_manifest(path: str | Path) -> tuple[list[Utterance], list[str]]:
    """Read a JSONL manifest. Returns (utterances, problems).

    Rows that cannot be used (bad JSON, missing or wrong-typed fields, duplicate ids, a
    relative path that leaves the corpus root) are skipped and described in ``problems`` (one
    line each) so the caller can warn and count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    root = corpus_root(path)
    utterances: list[Utterance] = []
    problems: list[str] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                utt = row_to_utterance(json.loads(line), where)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: not valid JSON ({err.msg})")
                continue
            except ManifestError as err:
                problems.append(str(err))
                continue
            if utt.id in seen:
                problems.append(f"{where}: duplicate id '{utt.id}' (first row kept)")
                continue
            if escapes_root(utt.path, path.parent, root):
                problems.append(outside_root_problem(where, utt.id, utt.path, root))
                continue
            seen.add(utt.id)
            utterances.append(utt)
    return utterances, problems


def iter_rows(utterances: Iterable[Utterance]) -> Iterator[str]:
    for utt in utterances:
        row = asdict(utt)
        for key in ("offset", "channel"):
            if row[key] is None:
                del row[key]  # rows without them keep the original layout
        yield json.dumps(row, ensure_ascii=False)


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    """Write a JSONL manifest atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in iter_rows(utterances):
                f.write(row + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
