"""Tiny transcribed data for the fine-tuning tests: noisy tones with made-up transcripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from colld.testing import write_tones

WORDS = ("ab", "ba", "cab", "dab", "bad", "ca")


def write_manifest(
    out: Path,
    name: str,
    texts: Sequence[str | None],
    *,
    seed: int = 0,
    durations: Sequence[float] | None = None,
    language: str = "en",
) -> Path:
    """Tones under ``out/<name>/`` and ``out/<name>.jsonl`` with one row per text (a None text
    writes a row without the field); phonemes are the text's letters, space-separated."""
    rng = np.random.default_rng(seed)
    if durations is None:
        durations = rng.uniform(0.35, 0.55, size=len(texts)).round(3).tolist()
    audio = write_tones(out / name, durations, prefix=f"{name}-", seed=seed)
    manifest = out / f"{name}.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i, (text, seconds) in enumerate(zip(texts, durations, strict=True)):
            row = {
                "id": f"{name}-{i}",
                "path": str(audio / f"{name}-{i}.wav"),
                "duration": seconds,
                "language": language,
            }
            if text is not None:
                row["text"] = text
                row["phonemes"] = " ".join(c for c in text if c != " ")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return manifest


def random_texts(num: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=2)) for _ in range(num)]


@pytest.fixture
def transcribed(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Train (8 rows), dev (3) and test (3, one with the out-of-vocabulary 'z' and 'é')
    manifests under ``tmp_path/data``."""

    def make() -> dict[str, Path]:
        root = tmp_path / "data"
        if (root / "train.jsonl").is_file():
            return {s: root / f"{s}.jsonl" for s in ("train", "dev", "test")}
        return {
            "train": write_manifest(root, "train", random_texts(8, 1), seed=1),
            "dev": write_manifest(root, "dev", random_texts(3, 2), seed=2),
            "test": write_manifest(root, "test", ["ab zab", "béa", "cab"], seed=3),
        }

    return make


@pytest.fixture
def manifest_writer() -> Callable[..., Path]:
    """``write_manifest`` for tests that build their own rows."""
    return write_manifest
