"""Training and dev data for a run: resolve the source, build loaders, stream batches.

``BatchStream`` turns the sampler's endless loader into what the loop needs: the next
non-empty batch, the position training has consumed (for checkpoints), and a resume point.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader

from colld.audio import FrontEnd
from colld.config import DataConfig
from colld.data.batch import Batch
from colld.data.dataset import DistillDataset, make_loader
from colld.data.manifest import Utterance, read_manifest
from colld.data.sampler import DurationBucketSampler
from colld.data.target_cache import TargetCache

log = logging.getLogger(__name__)


class BatchStream:
    """Endless non-empty batches from a loader whose sampler can seek."""

    def __init__(self, loader: DataLoader, sampler: DurationBucketSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self._iter: Iterator[Batch] | None = None
        self._skipped: dict[str, str] = {}

    def seek(self, epoch: int, batches_in_epoch: int) -> None:
        """Continue right after ``batches_in_epoch`` consumed batches of ``epoch``."""
        self.sampler.load_state_dict(self.sampler.state_at(epoch, batches_in_epoch))
        self._iter = None

    def next_batch(self) -> Batch:
        if self._iter is None:
            self._iter = iter(self.loader)
        while True:
            batch = next(self._iter)
            self.sampler.note_consumed(batch.epoch, batch.batch_index)
            self._skipped.update(batch.skip_reasons)
            if batch.ids:
                return batch

    def position(self) -> tuple[int, int]:
        """(epoch, batches consumed in it) as training has seen them."""
        state = self.sampler.state_dict()
        return state["epoch"], state["batches_consumed_in_epoch"]

    def one_pass(self, max_batches: int = 0) -> Iterator[Batch]:
        """The first ``max_batches`` (0 = all) non-empty batches of epoch 0, same every call."""
        count = 0
        for batch in self.loader:
            if batch.epoch > 0 or (max_batches and count >= max_batches):
                break
            if batch.ids:
                count += 1
                yield batch

    def skipped(self) -> dict[str, str]:
        return dict(self._skipped)

    def close(self) -> None:
        self._iter = None


# (train utterances, root) and optionally (dev utterances, root)
Sources = tuple[tuple[list[Utterance], Path], tuple[list[Utterance], Path] | None]


def resolve_sources(cfg: DataConfig, seed: int) -> Sources:
    """(train utterances, root) and optionally (dev utterances, root).

    With no ``data.train`` the embedded corpus is used, synthesised on first use."""
    if cfg.train is None:
        corpus = ensure_embedded_corpus(Path(cfg.corpus_dir), cfg.corpus_hours, seed)
        train = _read_jsonl(corpus / "manifests" / "train.jsonl")
        dev_path = corpus / "manifests" / "dev.jsonl"
        dev = _read_jsonl(dev_path) if cfg.dev is None and dev_path.is_file() else None
    else:
        train = _read_any(cfg.train)
        dev = None
    if cfg.dev is not None:
        dev = _read_any(cfg.dev)
    return train, dev


# The shuffle that ``data.train_hours`` takes its prefix of: fixed, independent of train.seed,
# so that a grid over hours compares nested subsets and the distillation seeds vary the rest.
SUBSET_SEED = 0


def take_hours(utterances: Sequence[Utterance], hours: float, source: str) -> list[Utterance]:
    """The shortest prefix of a fixed shuffle of ``utterances`` holding >= ``hours`` of audio,
    in manifest order. Raises ValueError when they hold less (naming ``source`` and both
    numbers)."""
    total = sum(u.duration for u in utterances) / 3600
    if hours > total + 1e-9:
        raise ValueError(
            f"data.train_hours = {hours:g} but the training data ({source}) holds only "
            f"{total:.3f} h in {len(utterances)} utterances; ask for at most that, or use more data"
        )
    shuffled = list(utterances)
    random.Random(SUBSET_SEED).shuffle(shuffled)
    kept = {id(u) for u in first_hours(shuffled, hours)}
    return [u for u in utterances if id(u) in kept]


def first_hours(utterances: Sequence[Utterance], hours: float) -> list[Utterance]:
    """The shortest prefix of ``utterances`` (in their order) holding >= ``hours`` of audio;
    all of them when they hold less."""
    kept, seconds = [], 0.0
    for utterance in utterances:
        if seconds >= hours * 3600:
            break
        kept.append(utterance)
        seconds += utterance.duration
    return kept


def calibration_batches(
    cfg: DataConfig, train: tuple[list[Utterance], Path], feature_extractor: Any, seconds: float
) -> list[Batch]:
    """The first training utterances (manifest order, within ``data.train_hours``) that reach
    ``seconds`` of audio, cropped to ``data.max_duration`` as training clips are (seeded by
    ``SUBSET_SEED``), in batches of at most ``data.batch_seconds``: the same every call, so a
    resumed run measures what the first attempt measured. For ``student.init=prune``."""
    utterances, root = train
    if cfg.train_hours is not None:
        utterances = take_hours(utterances, cfg.train_hours, cfg.train or str(root))
    dataset = DistillDataset(
        root, FrontEnd(feature_extractor), max_duration=cfg.max_duration, seed=SUBSET_SEED
    )
    requests: list[list[Utterance]] = [[]]
    batch_total = total = 0.0
    for utt in utterances:
        if total >= seconds:
            break
        duration = min(utt.duration, cfg.max_duration or utt.duration)
        if requests[-1] and batch_total + duration > cfg.batch_seconds:
            requests.append([])
            batch_total = 0.0
        requests[-1].append(utt)
        batch_total += duration
        total += duration
    batches = [dataset[request] for request in requests if request]
    log.info(
        "calibration audio: %.0f s of %d training utterances in %d batches (%d unreadable)",
        sum(batch.seconds for batch in batches),
        sum(len(request) for request in requests),
        len(batches),
        sum(len(batch.skipped) for batch in batches),
    )
    return [batch for batch in batches if batch.size]


def ensure_embedded_corpus(corpus_dir: Path, hours: float, seed: int) -> Path:
    """Build the espeak-ng corpus unless a complete one is there (resumable)."""
    from colld.data.synth import SynthConfig, corpus_is_complete, synthesize_corpus

    if not corpus_is_complete(corpus_dir):
        log.info("building the embedded corpus in %s (%.2f h of speech)", corpus_dir, hours)
        synthesize_corpus(SynthConfig(out_dir=str(corpus_dir), hours=hours, seed=seed))
    return corpus_dir


def _read_jsonl(path: Path) -> tuple[list[Utterance], Path]:
    utterances, problems = read_manifest(path)
    for problem in problems:
        log.warning("skipping manifest row: %s", problem)
    return utterances, path.parent  # manifest paths are relative to the manifest's folder


def _read_any(spec: str) -> tuple[list[Utterance], Path]:
    from colld.data.readers import read_any

    utterances, root, problems = read_any(spec)
    for problem in problems:
        log.warning("skipping: %s", problem)
    if problems:
        log.warning("%d entries of %s were skipped", len(problems), spec)
    return utterances, root


def build_data(
    cfg: DataConfig,
    feature_extractor: Any,
    seed: int,
    accelerator: Accelerator,
    *,
    sources: Sources | None = None,
    target_cache: TargetCache | None = None,
    dev_cache: TargetCache | None = None,
    crop: bool = True,
) -> tuple[BatchStream, BatchStream | None]:
    """Loaders for this process' share of the training data and for the dev data.

    sources: ``resolve_sources(cfg, seed)`` when already called (None = call it here).
    target_cache: an opened, verified cache of the training data; training batches are then
        its segments, whole, with their cached targets.
    dev_cache: the same for the dev data (``colld.train.teacher_cache.open_dev_cache``); None =
        dev batches are the dev utterances (cropped like training's) and need the teacher.
    crop: cut utterances longer than ``cfg.max_duration`` to random segments (distillation);
        False = always whole (fine-tuning on transcripts, whose caller drops long ones).
    """
    frontend = FrontEnd(feature_extractor)
    (train_utts, train_root), dev = sources if sources is not None else resolve_sources(cfg, seed)
    if cfg.train_hours is not None:
        train_utts = take_hours(train_utts, cfg.train_hours, cfg.train or str(train_root))
    common: dict[str, Any] = dict(
        batch_seconds=cfg.batch_seconds,
        max_duration=cfg.max_duration if crop else None,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        pin_memory=accelerator.device.type == "cuda",
    )
    if target_cache is None:
        loader, sampler = make_loader(
            train_utts,
            train_root,
            frontend,
            num_workers=cfg.num_workers,
            augment=cfg.augment,
            **common,
        )
        log.info(
            "training data: %d utterances, %.2f h (%s)",
            len(train_utts),
            sum(u.duration for u in train_utts) / 3600,
            train_root,
        )
    else:
        segments = target_cache.segment_utterances(train_utts)
        loader, sampler = make_loader(
            segments,
            train_root,
            frontend,
            num_workers=cfg.num_workers,
            augment=None,
            targets=target_cache,
            **{**common, "max_duration": None},  # segments are used whole
        )
        log.info(
            "training data: %d cached segments of %d utterances, %.2f h (%s); teacher targets "
            "from %s",
            len(segments),
            len(train_utts),
            sum(u.duration for u in segments) / 3600,
            train_root,
            target_cache.directory,
        )
    dev_stream = None
    if dev is not None:
        dev_utts, dev_root = dev
        cached: dict[str, Any] = {}
        if dev_cache is not None:  # its segments, whole
            dev_utts = dev_cache.segment_utterances(dev_utts)
            cached = {"targets": dev_cache, "max_duration": None}
        dev_loader, dev_sampler = make_loader(
            dev_utts,
            dev_root,
            frontend,
            num_workers=0,
            augment=None,
            num_epochs=1,
            **{**common, **cached},
        )
        dev_stream = BatchStream(dev_loader, dev_sampler)
    return BatchStream(loader, sampler), dev_stream
