"""Reading the audio of a manifest row: the whole file, or exactly its region.

The one place that turns ``Utterance.offset`` into a read (see ``colld.data.manifest``): a
row without an offset is its whole file; a row with one (0 included) is exactly
[offset, offset + duration). Training (``colld.data.dataset``), the teacher-target cache
build and the readers' ``verify`` all read through here, so they agree on what a row means.

Shape legend: S samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from colld.audio import AudioError, load_audio
from colld.data.manifest import Utterance


def load_utterance(utt: Utterance, root: str | Path, sample_rate: int) -> np.ndarray:
    """The audio of one row at ``sample_rate``: its whole file, or exactly its region; its
    channel when the row names one (else all channels averaged).

    root: the folder a relative ``utt.path`` is resolved against.
    Shape: (S,) float32. Raises AudioError naming the path (see ``load_region``).
    """
    path = utt.resolved_path(Path(root))
    if not utt.is_region:
        return load_audio(path, sample_rate, channel=utt.channel)
    return load_region(path, sample_rate, utt.start, utt.duration, channel=utt.channel)


def load_region(
    path: str | Path,
    sample_rate: int,
    offset_s: float,
    duration_s: float,
    *,
    channel: int | None = None,
) -> np.ndarray:
    """Exactly [offset_s, offset_s + duration_s) of ``path`` (seconds at the file's own rate;
    a region reaching past the end gives what is there, as ``load_audio``).

    Shape: (S,) float32. Raises AudioError naming the path: ``load_audio``'s reasons, and
    reason ``empty`` with the region and the file's length for a region that starts at or
    after the file's end (libsndfile's own message for that is a failed seek).
    """
    try:
        return load_audio(
            path, sample_rate, offset_s=offset_s, duration_s=duration_s, channel=channel
        )
    except AudioError as err:
        if err.reason not in ("empty", "unreadable"):
            raise
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, OSError):
            info = None  # the header is bad too: load_audio's error says more
        if info is None or round(offset_s * info.samplerate) < info.frames:
            raise
        raise AudioError(
            path,
            f"region [{offset_s:.3f}, {offset_s + duration_s:.3f}) s starts at or past the end "
            f"of the file ({info.frames / info.samplerate:.3f} s)",
            reason="empty",
        ) from err
