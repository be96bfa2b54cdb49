"""DistillDataset / make_loader: padding, crops, augmentation, bad files, workers, resume."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from colld.audio import AudioError, FrontEnd
from colld.data.augment import AugmentConfig
from colld.data.batch import Batch, collate_waveforms, pad_features
from colld.data.dataset import DataUnusableError, DistillDataset, check_usable, make_loader
from colld.data.manifest import Utterance
from colld.data.sampler import SampledBatch

RATE = 16000


def write_clip(path: Path, seconds: float, *, seed: int = 0, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.2 * np.sin(2 * np.pi * (150 + 50 * seed % 7) * t) + 0.02 * rng.standard_normal(t.shape)
    sf.write(path, wave.astype(np.float32), rate, subtype="FLOAT")
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def whisper_frontend() -> FrontEnd:
    return FrontEnd.for_family("whisper")


@pytest.fixture(scope="module")
def waveform_frontend() -> FrontEnd:
    return FrontEnd.for_family("wav2vec2")


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[Utterance]]:
    """24 short clips (0.3-1.5 s) with relative paths."""
    rng = np.random.default_rng(0)
    utts = []
    for i in range(24):
        seconds = float(rng.uniform(0.3, 1.5))
        write_clip(tmp_path / f"c{i}.wav", seconds, seed=i)
        utts.append(Utterance(id=f"c{i}", path=f"c{i}.wav", duration=seconds))
    return tmp_path, utts


def test_batch_is_padded_with_correct_lengths(corpus, whisper_frontend: FrontEnd) -> None:
    root, utts = corpus
    dataset = DistillDataset(root, whisper_frontend, max_duration=None)
    batch = dataset[utts[:5]]
    assert batch.ids == [u.id for u in utts[:5]] and batch.size == 5
    samples = [sf.info(root / u.path).frames for u in utts[:5]]
    assert batch.feature_lengths.tolist() == [s // 160 for s in samples]
    assert batch.feature_lengths.dtype == torch.int64
    assert batch.features.shape == (5, max(s // 160 for s in samples), 80)
    assert batch.durations.tolist() == pytest.approx([s / RATE for s in samples])
    mask = batch.padding_mask()
    assert mask.sum(dim=1).tolist() == batch.feature_lengths.tolist()
    assert torch.all(batch.features[~mask] == 0)
    # Each row equals the clip featurised alone.
    alone = whisper_frontend(np.asarray(sf.read(root / utts[2].path, dtype="float32")[0]))
    torch.testing.assert_close(batch.features[2, : alone.shape[0]], alone)


def test_waveform_family_collates_samples(corpus, waveform_frontend: FrontEnd) -> None:
    root, utts = corpus
    batch = DistillDataset(root, waveform_frontend, max_duration=None)[utts[:3]]
    samples = [sf.info(root / u.path).frames for u in utts[:3]]
    assert batch.features.shape == (3, max(samples))
    assert batch.feature_lengths.tolist() == samples
    assert torch.all(batch.features[~batch.padding_mask()] == 0)


def test_padding_helpers() -> None:
    padded, lengths = pad_features([torch.ones(3, 2), torch.ones(5, 2)])
    assert padded.shape == (2, 5, 2) and lengths.tolist() == [3, 5]
    assert padded[0, 3:].abs().sum() == 0 and padded[0, :3].min() == 1
    waves, lengths = collate_waveforms([np.ones(4, np.float32), np.ones(2, np.float32)])
    assert waves.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and lengths.tolist() == [4, 2]
    empty, lengths = pad_features([], feature_dim=80)
    assert empty.shape == (0, 0, 80) and lengths.shape == (0,)


def test_crop_is_a_reproducible_random_segment(tmp_path: Path, waveform_frontend: FrontEnd) -> None:
    full = write_clip(tmp_path / "long.wav", 6.0, seed=3)
    utt = Utterance(id="long", path="long.wav", duration=6.0)
    frontend = FrontEnd.for_family("wav2vec2", do_normalize=False)
    dataset = DistillDataset(tmp_path, frontend, max_duration=2.0, seed=1)
    first = dataset.prepare_waveform(utt, epoch=0)
    assert first.shape == (32000,)
    np.testing.assert_array_equal(first, dataset.prepare_waveform(utt, epoch=0))
    starts = []
    for epoch in range(4):
        crop = dataset.prepare_waveform(utt, epoch=epoch)
        matches = [s for s in range(0, full.shape[0] - 32000 + 1) if full[s] == crop[0] and np.array_equal(full[s : s + 32000], crop)]  # fmt: skip
        assert len(matches) == 1  # a contiguous segment of the original
        starts.append(matches[0])
    assert len(set(starts)) == 4
    other_seed = DistillDataset(tmp_path, frontend, max_duration=2.0, seed=2)
    assert not np.array_equal(other_seed.prepare_waveform(utt, epoch=0), first)
    # A manifest that under-states the length: the crop still holds.
    understated = Utterance(id="long", path="long.wav", duration=1.0)
    assert dataset.prepare_waveform(understated, epoch=0).shape == (32000,)
    # The batch through __getitem__ uses the request's epoch.
    batch = dataset[SampledBatch(epoch=3, index=0, utterances=[utt])]
    np.testing.assert_array_equal(batch.features[0].numpy(), dataset.prepare_waveform(utt, epoch=3))
    assert batch.durations.tolist() == [2.0]


def _position(full: np.ndarray, piece: np.ndarray) -> int:
    """The one start in ``full`` where ``piece`` lies (fails when it is not a single match)."""
    (start,) = [
        int(i)
        for i in np.flatnonzero(full == piece[0])
        if np.array_equal(full[i : i + piece.shape[0]], piece)
    ]
    return start


def test_region_rows_read_exactly_and_crops_stay_inside(tmp_path: Path) -> None:
    full = write_clip(tmp_path / "long.wav", 6.0, seed=5)
    frontend = FrontEnd.for_family("wav2vec2", do_normalize=False)
    exact = DistillDataset(tmp_path, frontend, max_duration=None)
    head = Utterance(id="head", path="long.wav", duration=2.0, offset=0.0)
    np.testing.assert_array_equal(exact.prepare_waveform(head, 0), full[: 2 * RATE])
    whole = Utterance(id="whole", path="long.wav", duration=2.0)  # under-stated whole file
    np.testing.assert_array_equal(exact.prepare_waveform(whole, 0), full)

    cropping = DistillDataset(tmp_path, frontend, max_duration=0.5, seed=7)
    middle = replace(head, id="middle", offset=3.0)
    for region, first, last in ((head, 0, 2 * RATE), (middle, 3 * RATE, 5 * RATE)):
        starts = set()
        for epoch in range(8):
            crop = cropping.prepare_waveform(region, epoch)
            assert crop.shape == (RATE // 2,)
            start = _position(full, crop)
            assert first <= start and start + RATE // 2 <= last  # inside the region
            starts.add(start)
        assert len(starts) == 8  # seeded per epoch, still random
        again = [cropping.prepare_waveform(region, epoch) for epoch in range(8)]
        assert {_position(full, c) for c in again} == starts  # and reproducible


def test_a_region_past_the_end_is_a_skip_naming_the_path(
    tmp_path: Path, whisper_frontend: FrontEnd, caplog: pytest.LogCaptureFixture
) -> None:
    write_clip(tmp_path / "a.wav", 2.0, seed=1)
    past = Utterance(id="past", path="a.wav", duration=1.0, offset=2.5)
    long_past = Utterance(id="long-past", path="a.wav", duration=3.0, offset=2.0)
    good = Utterance(id="good", path="a.wav", duration=1.0, offset=1.0)
    for max_duration in (None, 1.0):  # read exactly, and cropped
        dataset = DistillDataset(tmp_path, whisper_frontend, max_duration=max_duration)
        with pytest.raises(AudioError, match="past the end") as caught:
            dataset.prepare_waveform(past, 0)
        assert caught.value.path == str(tmp_path / "a.wav") and caught.value.reason == "empty"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="colld.data.dataset"):
            batch = dataset[[past, good, long_past]]
        assert batch.ids == ["good"]
        assert batch.skip_reasons == {"past": "empty", "long-past": "empty"}
        assert all(str(tmp_path / "a.wav") in r.getMessage() for r in caplog.records)
        assert len(caplog.records) == 2


def make_bad_files(root: Path) -> list[Utterance]:
    write_clip(root / "good1.wav", 1.0, seed=1)
    write_clip(root / "good2.wav", 0.8, seed=2)
    (root / "zero_bytes.wav").write_bytes(b"")
    sf.write(root / "no_frames.wav", np.zeros(0, np.float32), RATE)
    nan = np.full(RATE, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, RATE, subtype="FLOAT")
    sf.write(root / "short.wav", np.full(100, 0.1, np.float32), RATE)  # < 160 samples
    (root / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 10)
    names = ["good1", "zero_bytes", "no_frames", "nan", "missing", "short", "garbage", "good2"]
    return [Utterance(id=n, path=f"{n}.wav", duration=1.0) for n in names]


def test_bad_files_are_skipped_with_reasons_and_one_warning_each(
    tmp_path: Path, whisper_frontend: FrontEnd, caplog: pytest.LogCaptureFixture
) -> None:
    utts = make_bad_files(tmp_path)
    dataset = DistillDataset(tmp_path, whisper_frontend, max_duration=None)
    with caplog.at_level(logging.WARNING, logger="colld.data.dataset"):
        batch = dataset[utts]
        again = dataset[utts]
    assert batch.ids == again.ids == ["good1", "good2"]
    assert batch.features.shape[0] == batch.feature_lengths.shape[0] == 2
    assert batch.skipped == ["zero_bytes", "no_frames", "nan", "missing", "short", "garbage"]
    assert batch.skip_reasons["missing"] == "missing"
    assert batch.skip_reasons["nan"] == "non_finite"
    assert batch.skip_reasons["short"] == "too_short"
    assert batch.skip_reasons["zero_bytes"] == batch.skip_reasons["no_frames"] == "empty"
    assert batch.skip_reasons["garbage"] in ("unsupported", "unreadable")
    warned = Counter(r.getMessage().split("'")[1] for r in caplog.records)
    assert warned == Counter(batch.skipped)  # one line per bad file, not per batch
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_batch_where_everything_failed_is_empty(tmp_path: Path, whisper_frontend: FrontEnd) -> None:
    bad = [u for u in make_bad_files(tmp_path) if not u.id.startswith("good")]
    batch = DistillDataset(tmp_path, whisper_frontend, max_duration=None)[bad]
    assert batch.size == 0 and batch.features.shape == (0, 0, 80)
    assert batch.feature_lengths.shape == batch.durations.shape == (0,)
    assert len(batch.skipped) == len(bad)


def test_check_usable_names_the_data_path(tmp_path: Path) -> None:
    utts = make_bad_files(tmp_path)
    report = check_usable(utts, tmp_path, min_samples=160)
    assert report.num_utterances == 8 and report.num_decoded >= 2
    assert {"missing", "zero_bytes", "nan", "short"} <= set(report.problems)
    assert "good1" not in report.problems
    bad = [u for u in utts if not u.id.startswith("good")]
    with pytest.raises(DataUnusableError, match=str(tmp_path)):
        check_usable(bad, tmp_path, min_samples=160)
    with pytest.raises(DataUnusableError, match="empty"):
        check_usable([], tmp_path)


def test_loader_with_two_workers_covers_the_epoch(corpus, whisper_frontend: FrontEnd) -> None:
    root, utts = corpus
    loader, sampler = make_loader(
        utts, root, whisper_frontend, batch_seconds=4.0, max_duration=1.0,
        num_workers=2, seed=0, num_epochs=1,
    )  # fmt: skip
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.batch_index for b in batches] == list(range(len(batches)))
    ids = Counter(i for b in batches for i in b.ids)
    assert set(ids) == {u.id for u in utts} and max(ids.values()) == 1
    assert all(b.seconds <= 4.0 + 1e-3 for b in batches)
    assert max(b.durations.max().item() for b in batches) == pytest.approx(1.0)


def test_resume_through_the_loader_repeats_and_skips_nothing(
    corpus, whisper_frontend: FrontEnd
) -> None:
    root, utts = corpus
    kwargs = dict(batch_seconds=3.0, max_duration=1.0, seed=4, num_workers=2, num_epochs=1)
    uninterrupted = [b.ids for b in make_loader(utts, root, whisper_frontend, **kwargs)[0]]
    assert len(uninterrupted) >= 8

    loader, sampler = make_loader(utts, root, whisper_frontend, **kwargs)
    consumed = []
    for batch in loader:  # the workers prefetch ahead of this loop
        consumed.append(batch.ids)
        sampler.note_consumed(batch.epoch, batch.batch_index)
        if len(consumed) == 4:
            break
    state = sampler.state_dict()
    del loader
    assert state["batches_consumed_in_epoch"] == 4

    loader, sampler = make_loader(utts, root, whisper_frontend, **kwargs)
    sampler.load_state_dict(state)
    rest = [b.ids for b in loader]
    assert consumed + rest == uninterrupted
    flat = [i for ids in consumed + rest for i in ids]
    assert sorted(flat) == sorted(u.id for u in utts)


def test_augmentation_is_seeded_per_epoch_and_refused_for_evaluation(
    corpus, whisper_frontend: FrontEnd
) -> None:
    root, utts = corpus
    config = AugmentConfig(enabled=True, prob=1.0, noise_prob=1.0, gain_prob=1.0, speed_prob=0.0)
    plain = DistillDataset(root, whisper_frontend, max_duration=None)
    augmented = DistillDataset(root, whisper_frontend, max_duration=None, augment=config)
    request = SampledBatch(epoch=0, index=0, utterances=utts[:3])
    a, b = augmented[request], augmented[request]
    torch.testing.assert_close(a.features, b.features)
    assert a.feature_lengths.tolist() == plain[request].feature_lengths.tolist()
    assert not torch.allclose(a.features, plain[request].features)
    later = augmented[SampledBatch(epoch=1, index=0, utterances=utts[:3])]
    assert not torch.allclose(a.features, later.features)
    probe = [Utterance(id="p", path="c0.wav", duration=1.0, split="probe-test")]
    with pytest.raises(ValueError, match="probe-test"):
        make_loader(probe, root, whisper_frontend, batch_seconds=4.0, max_duration=2.0,
                    num_workers=0, seed=0, augment=config)  # fmt: skip


def test_batch_to_moves_tensors(corpus, whisper_frontend: FrontEnd) -> None:
    root, utts = corpus
    batch = DistillDataset(root, whisper_frontend, max_duration=None)[utts[:2]]
    moved = batch.to("cpu")
    assert moved.ids == batch.ids and moved.features.device.type == "cpu"
    assert moved.feature_lengths.dtype == torch.int64


def test_endless_loader_moves_on_to_the_next_epoch(corpus, whisper_frontend: FrontEnd) -> None:
    root, utts = corpus
    loader, sampler = make_loader(
        utts[:8], root, whisper_frontend, batch_seconds=4.0, max_duration=1.0,
        num_workers=0, seed=0, check_files=False,
    )  # fmt: skip
    per_epoch = sampler.num_batches(0)
    batches = list(itertools.islice(loader, per_epoch + 1))
    assert [b.epoch for b in batches] == [0] * per_epoch + [1]
    assert batches[-1].batch_index == 0
