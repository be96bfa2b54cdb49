"""The distillation dataset: load, validate, crop, augment, featurise and collate one batch.

lhotse's split of roles: the sampler (``colld.data.sampler``) picks a batch by seconds of
audio, this dataset turns the batch request into tensors, and the DataLoader only runs it in
worker processes (``batch_size=None``). Teacher and student consume the same ``Batch``, so
they see exactly the same (augmented) audio.

Per utterance: load (``colld.data.utterance_audio``: a whole-file row is its file, a row with
an ``offset`` is exactly its region, e.g. a lhotse segment of a longer recording; only the
cropped part is decoded when the row is longer than ``max_duration``) -> random crop to
``max_duration``, inside the region, seeded by (seed, epoch, utterance id) -> augmentation
seeded the same way -> front end -> padding.

With a teacher-target cache (``targets``) the rows are the cache's fixed segments, used whole
(no crop, no augmentation), and the batch carries the cached targets (``Batch.targets``),
padded like the features. Their features are the cache's (``TargetCache.read_features``: no
audio decoding, no front end) when it stores them; an older cache without them has each
segment's audio read exactly and checked against the cache's sample count.
A file that cannot be used is skipped: one warning line per file and process, and its id and
reason in ``Batch.skipped`` / ``Batch.skip_reasons`` for the run summary.

Shape legend: B batch, S samples, F front-end frames, C feature channels.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from colld.audio import SAMPLE_RATE, AudioError, FrontEnd, audio_duration, load_audio
from colld.data.augment import AugmentConfig, Augmenter, clip_seed
from colld.data.batch import Batch, pad_features, pad_targets
from colld.data.manifest import Utterance
from colld.data.sampler import DurationBucketSampler, SampledBatch
from colld.data.target_cache import TargetCache
from colld.data.utterance_audio import load_region, load_utterance

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = ("probe-train", "probe-dev", "probe-test")


class DistillDataset(Dataset):
    """Map-style dataset whose "index" is a whole batch request from the sampler.

    root: directory that relative ``Utterance.path`` values are resolved against.
    frontend: the teacher/student family's front end (``colld.audio.FrontEnd``).
    max_duration: crop longer clips to a random segment of this many seconds; None = never.
    seed: seeds the crops, per (seed, epoch, utterance id).
    augment: waveform augmentation (``Augmenter`` or its config); None or disabled = off.
    targets: a teacher-target cache whose segments the requests hold (see module doc);
        needs ``max_duration`` None and no augmentation.
    """

    def __init__(
        self,
        root: str | Path,
        frontend: FrontEnd,
        *,
        max_duration: float | None,
        seed: int = 0,
        augment: Augmenter | AugmentConfig | None = None,
        targets: TargetCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.frontend = frontend
        self.max_duration = max_duration
        self.seed = int(seed)
        if isinstance(augment, AugmentConfig):
            augment = Augmenter(augment, frontend.sample_rate)
        self.augmenter = augment if augment is not None and augment.enabled else None
        self.targets = targets
        if targets is not None and (self.augmenter is not None or max_duration is not None):
            raise ValueError(
                "cached teacher targets need whole segments: max_duration=None and no "
                f"augmentation (found max_duration={max_duration}, augmentation "
                f"{'on' if self.augmenter is not None else 'off'})"
            )
        self._warned: set[str] = set()

    @property
    def max_samples(self) -> int | None:
        if self.max_duration is None:
            return None
        return round(self.max_duration * self.frontend.sample_rate)

    def __getitem__(self, request: SampledBatch | Sequence[Utterance]) -> Batch:
        """Load and collate one batch. A plain list of utterances counts as epoch 0."""
        if isinstance(request, SampledBatch):
            epoch, index, utterances = request.epoch, request.index, request.utterances
        else:
            epoch, index, utterances = 0, 0, list(request)
        ids: list[str] = []
        features: list[Tensor] = []
        targets: list[dict[int, np.ndarray]] = []
        durations: list[float] = []
        skip_reasons: dict[str, str] = {}
        for utt in utterances:
            try:
                if self.targets is not None and self.targets.has_features:
                    features.append(torch.from_numpy(self.targets.read_features(utt.id)))
                    num_samples = self.targets.row(utt.id)["num_samples"]
                else:
                    waveform = (
                        self.prepare_waveform(utt, epoch)
                        if self.targets is None
                        else self.prepare_segment(utt)
                    )
                    features.append(self.frontend(waveform))
                    num_samples = waveform.shape[0]
            except (AudioError, OSError) as err:
                reason = getattr(err, "reason", "unreadable")
                skip_reasons[utt.id] = reason
                self._warn_once(utt, reason, err)
                continue
            if self.targets is not None:
                targets.append(self.targets.read(utt.id))
            ids.append(utt.id)
            durations.append(num_samples / self.frontend.sample_rate)
        padded, lengths = pad_features(features, getattr(self.frontend, "feature_dim", None))
        batch_targets, target_lengths = None, None
        if self.targets is not None:
            batch_targets, target_lengths = pad_targets(targets, self.targets.layers)
        return Batch(
            ids=ids,
            features=padded,
            feature_lengths=lengths,
            durations=torch.tensor(durations, dtype=torch.float32),
            skipped=list(skip_reasons),
            skip_reasons=skip_reasons,
            epoch=epoch,
            batch_index=index,
            targets=batch_targets,
            target_lengths=target_lengths,
        )

    def prepare_segment(self, utt: Utterance) -> np.ndarray:
        """Read one cached segment exactly as the cache build read it. Shape: (S,) float32.

        Raises ValueError when the audio no longer has the sample count the cache recorded
        (the targets would belong to other audio).
        """
        path = utt.resolved_path(self.root)
        rate = self.frontend.sample_rate
        waveform = load_region(path, rate, utt.start, utt.duration, channel=utt.channel)
        expected = self.targets.row(utt.id)["num_samples"]
        if waveform.shape[0] != expected:
            raise ValueError(
                f"segment '{utt.id}' of {path} now reads as {waveform.shape[0]} samples but the "
                f"teacher-target cache {self.targets.directory} was built from {expected}: the "
                "audio changed; rebuild the cache"
            )
        return waveform

    def prepare_waveform(self, utt: Utterance, epoch: int) -> np.ndarray:
        """Load, crop and augment one clip. Shape: (S,) float32, S <= max_samples.

        Raises AudioError (with the path) for a file that cannot be used, a region that
        starts past the file's end, or a clip shorter than the front end's ``min_samples``.
        """
        path = utt.resolved_path(self.root)
        rate = self.frontend.sample_rate
        rng = np.random.default_rng(clip_seed(self.seed, epoch, utt.id, "crop"))
        waveform = self._load_cropped(utt, path, rng)
        max_samples = self.max_samples
        if max_samples is not None and waveform.shape[0] > max_samples:
            # The manifest under-stated the duration: crop in memory instead.
            start = int(rng.integers(0, waveform.shape[0] - max_samples + 1))
            waveform = waveform[start : start + max_samples]
        if self.augmenter is not None:
            waveform = self.augmenter(waveform, utterance_id=utt.id, epoch=epoch)
            if max_samples is not None:
                waveform = waveform[:max_samples]  # slowed-down speech grows past the budget
        if waveform.shape[0] < self.frontend.min_samples:
            raise AudioError(
                path,
                f"clip of {waveform.shape[0]} samples ({waveform.shape[0] / rate:.3f} s) is "
                f"shorter than the front end's minimum of {self.frontend.min_samples} samples",
                reason="too_short",
            )
        return waveform

    def _load_cropped(self, utt: Utterance, path: Path, rng: np.random.Generator) -> np.ndarray:
        """The row's audio, or a random ``max_duration`` part of it inside
        [start, start + duration). Shape: (S,) float32."""
        rate, duration = self.frontend.sample_rate, utt.duration
        if self.max_duration is None or duration <= self.max_duration:
            return load_utterance(utt, self.root, rate)
        offset_s = utt.start + float(rng.uniform(0.0, duration - self.max_duration))
        try:
            return load_region(path, rate, offset_s, self.max_duration, channel=utt.channel)
        except AudioError as err:
            if err.reason != "empty" or utt.is_region:
                raise
            # The file is shorter than the manifest says: read it whole, crop in memory.
            return load_audio(path, rate, channel=utt.channel)

    def _warn_once(self, utt: Utterance, reason: str, err: Exception) -> None:
        if utt.id in self._warned:
            return
        self._warned.add(utt.id)
        logger.warning("skipping utterance '%s' (%s): %s", utt.id, reason, err)


# ---------------------------------------------------------------- setup checks
class DataUnusableError(ValueError):
    """No utterance of the data can be loaded; the message names the data path."""


@dataclass
class UsabilityReport:
    """What ``check_usable`` found. ``problems``: id -> "reason: cause" for failed probes."""

    num_utterances: int
    num_header_checked: int
    num_decoded: int
    problems: dict[str, str]

    @property
    def num_failed(self) -> int:
        return len(self.problems)


def check_usable(
    utterances: Sequence[Utterance],
    root: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    min_samples: int = 1,
    max_header_checks: int = 5000,
    max_decodes: int = 16,
    seed: int = 0,
) -> UsabilityReport:
    """Probe the data once at setup and fail clearly when nothing is usable.

    Reads the header of every file (or of ``max_header_checks`` drawn at random) and decodes
    up to ``max_decodes`` of the rows that passed (the whole file, or a region row's region
    only; NaN samples and corrupt bodies only show when decoding); a decoded clip shorter
    than ``min_samples`` counts as unusable.
    Raises DataUnusableError naming ``root`` when no probed file is
    usable; logs one warning with counts and examples when some are not.
    """
    root = Path(root)
    if not utterances:
        raise DataUnusableError(f"no utterances to train on in {root}: the manifest is empty")
    chosen = list(utterances)
    if len(chosen) > max_header_checks:
        chosen = random.Random(seed).sample(chosen, max_header_checks)
    problems: dict[str, str] = {}
    passed: list[Utterance] = []
    for utt in chosen:
        try:
            audio_duration(utt.resolved_path(root))
            passed.append(utt)
        except AudioError as err:
            problems[utt.id] = f"{err.reason}: {err}"
    decoded = passed[:max_decodes]
    usable = 0
    for utt in decoded:
        path = utt.resolved_path(root)
        try:
            num_samples = load_utterance(utt, root, sample_rate).shape[0]
        except AudioError as err:
            problems[utt.id] = f"{err.reason}: {err}"
            continue
        if num_samples < min_samples:
            problems[utt.id] = f"too_short: {path}: {num_samples} samples < {min_samples}"
        else:
            usable += 1
    report = UsabilityReport(
        num_utterances=len(utterances),
        num_header_checked=len(chosen),
        num_decoded=len(decoded),
        problems=problems,
    )
    examples = "; ".join(list(problems.values())[:3])
    if usable == 0:
        raise DataUnusableError(
            f"no usable audio in {root}: {len(problems)} of {len(chosen)} probed files failed "
            f"({len(utterances)} utterances in the manifest). Examples: {examples}"
        )
    if problems:
        logger.warning(
            "%d of %d probed files in %s cannot be used and will be skipped; examples: %s",
            len(problems),
            len(chosen),
            root,
            examples,
        )
    return report


# ---------------------------------------------------------------- loader
def _identity(batch: Batch) -> Batch:
    return batch


def make_loader(
    utterances: Sequence[Utterance],
    root: str | Path,
    frontend: FrontEnd,
    *,
    batch_seconds: float,
    max_duration: float | None,
    num_workers: int,
    seed: int,
    augment: AugmentConfig | Augmenter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_buckets: int = 10,
    num_epochs: int | None = None,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    check_files: bool = True,
    targets: TargetCache | None = None,
) -> tuple[DataLoader, DurationBucketSampler]:
    """DataLoader of ``Batch`` over ``utterances`` and its (resumable) sampler.

    The loader is endless unless ``num_epochs`` is given; each ``Batch`` carries its epoch and
    index. Resume: ``sampler.load_state_dict(saved)`` before the first ``iter(loader)``; save
    ``sampler.state_dict()`` after calling ``sampler.note_consumed(b.epoch, b.batch_index)``
    for each trained batch ``b``. ``check_files`` runs ``check_usable`` first. ``targets``:
    the utterances are that teacher-target cache's segments (``TargetCache.segment_utterances``)
    and batches carry their cached targets; ``max_duration`` must then be None.
    """
    augmenter = _resolve_augment(augment, frontend)
    if augmenter is not None:
        evaluation = sorted({u.split for u in utterances if u.split in EVALUATION_SPLITS})
        if evaluation:
            raise ValueError(
                f"augmentation is for distillation data only, but the utterances include the "
                f"evaluation split(s) {evaluation}; turn augmentation off for them"
            )
    if check_files:
        check_usable(
            utterances,
            root,
            sample_rate=frontend.sample_rate,
            min_samples=frontend.min_samples,
            seed=seed,
        )
    sampler = DurationBucketSampler(
        utterances,
        batch_seconds=batch_seconds,
        max_duration=max_duration,
        num_buckets=num_buckets,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_epochs=num_epochs,
    )
    dataset = DistillDataset(
        root, frontend, max_duration=max_duration, seed=seed, augment=augmenter, targets=targets
    )
    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        loader_kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        **loader_kwargs,
    )
    return loader, sampler


def _resolve_augment(
    augment: AugmentConfig | Augmenter | None, frontend: FrontEnd
) -> Augmenter | None:
    if augment is None:
        return None
    if isinstance(augment, AugmentConfig):
        augment = Augmenter(augment, frontend.sample_rate)
    return augment if augment.enabled else None
