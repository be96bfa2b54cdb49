"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str, *, mode: int = 0o644) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 2) -> Path:
    """``data`` as JSON (UTF-8, non-ASCII kept), written atomically."""
    return write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then put it at ``out_dir`` in one rename (an
    existing ``out_dir`` is moved aside first, then removed). The caller writes into the
    yielded path; on any error the temporary directory is removed and ``out_dir`` is left as
    it was. The directory ends up 0o755 and its top-level files 0o644 (an exported model is meant to be
    shared; mkdtemp makes it private)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o644)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
