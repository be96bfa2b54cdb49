"""Duration-bucketed sampler: budgets, coverage, determinism, distributed split, resume."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from colld.data.manifest import Utterance
from colld.data.sampler import (
    DurationBucketSampler,
    SampledBatch,
    effective_duration,
    resolve_distributed,
)


def make_utterances(
    num: int, *, low: float = 0.5, high: float = 20.0, seed: int = 0
) -> list[Utterance]:
    rng = random.Random(seed)
    return [
        Utterance(id=f"utt{i:05d}", path=f"{i}.wav", duration=rng.uniform(low, high))
        for i in range(num)
    ]


def epoch_ids(sampler: DurationBucketSampler, epoch: int) -> list[list[str]]:
    return [[u.id for u in batch] for batch in sampler.epoch_batches(epoch)]


def test_batches_stay_under_the_budget_after_cropping() -> None:
    utts = make_utterances(600)
    sampler = DurationBucketSampler(
        utts, batch_seconds=40.0, max_duration=8.0, seed=1, rank=0, world_size=1
    )
    batches = list(sampler.epoch_batches(0))
    assert len(batches) > 20
    for batch in batches:
        seconds = [effective_duration(u, 8.0) for u in batch]
        assert sum(seconds) <= 40.0 + 1e-6
        assert len(seconds) * max(seconds) <= 40.0 + 1e-6  # padded size too
    # Buckets: a batch holds clips of similar duration (the spread is far below the 0.5-8 s range).
    spreads = [max(effective_duration(u, 8.0) for u in b) - min(effective_duration(u, 8.0) for u in b) for b in batches if len(b) > 1]  # fmt: skip
    assert sorted(spreads)[len(spreads) // 2] < 2.0
    # The budget is used: most batches are more than half full.
    fill = [sum(effective_duration(u, 8.0) for u in b) / 40.0 for b in batches]
    assert sorted(fill)[len(fill) // 2] > 0.75


def test_single_overlong_clip_forms_its_own_batch_without_cropping() -> None:
    utts = make_utterances(30, low=1.0, high=4.0) + [
        Utterance(id="long", path="l.wav", duration=55.0)
    ]
    sampler = DurationBucketSampler(
        utts, batch_seconds=20.0, max_duration=None, seed=0, world_size=1, rank=0
    )
    batches = list(sampler.epoch_batches(0))
    with_long = [b for b in batches if any(u.id == "long" for u in b)]
    assert [[u.id for u in b] for b in with_long] == [["long"]]
    for batch in batches:
        if batch != with_long[0]:
            assert sum(u.duration for u in batch) <= 20.0


def test_one_epoch_yields_every_utterance_exactly_once() -> None:
    utts = make_utterances(500)
    sampler = DurationBucketSampler(
        utts, batch_seconds=60.0, max_duration=10.0, seed=3, world_size=1, rank=0
    )
    for epoch in (0, 1):
        counts = Counter(i for batch in epoch_ids(sampler, epoch) for i in batch)
        assert set(counts) == {u.id for u in utts}
        assert max(counts.values()) == 1


def test_order_is_deterministic_per_seed_and_epoch() -> None:
    utts = make_utterances(300)

    def build(seed: int) -> DurationBucketSampler:
        return DurationBucketSampler(
            utts, batch_seconds=60.0, max_duration=10.0, seed=seed, world_size=1, rank=0
        )

    assert epoch_ids(build(5), 0) == epoch_ids(build(5), 0)
    assert epoch_ids(build(5), 0) != epoch_ids(build(5), 1)
    assert epoch_ids(build(5), 0) != epoch_ids(build(6), 0)


@pytest.mark.parametrize("num_utterances", [9, 57, 203, 1000])
def test_distributed_ranks_are_disjoint_with_equal_batch_counts(num_utterances: int) -> None:
    utts = make_utterances(num_utterances, seed=num_utterances)
    ranks = [
        DurationBucketSampler(
            utts, batch_seconds=50.0, max_duration=10.0, seed=2, rank=r, world_size=2
        )
        for r in (0, 1)
    ]
    for epoch in (0, 1):
        per_rank = [epoch_ids(s, epoch) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        ids = [Counter(i for batch in batches for i in batch) for batches in per_rank]
        assert not set(ids[0]) & set(ids[1])
        assert set(ids[0]) | set(ids[1]) == {u.id for u in utts}
        assert max(ids[0].values()) == max(ids[1].values()) == 1


def test_rank_and_world_size_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert resolve_distributed(None, None) == (3, 4)
    assert resolve_distributed(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="rank=5"):
        resolve_distributed(5, 2)


def test_iteration_is_endless_and_counts_epochs() -> None:
    utts = make_utterances(80)
    sampler = DurationBucketSampler(
        utts, batch_seconds=60.0, max_duration=10.0, seed=0, world_size=1, rank=0
    )
    per_epoch = sampler.num_batches(0)
    taken = list(itertools.islice(iter(sampler), 3 * per_epoch + 2))
    assert all(isinstance(b, SampledBatch) for b in taken)
    epochs = Counter(b.epoch for b in taken)
    assert epochs[0] == per_epoch and epochs[3] == 2
    assert [b.index for b in taken if b.epoch == 1] == list(range(epochs[1]))
    ids_epoch_1 = [u.id for b in taken if b.epoch == 1 for u in b.utterances]
    assert sorted(ids_epoch_1) == sorted(u.id for u in utts)


def test_num_epochs_stops_iteration() -> None:
    utts = make_utterances(40)
    sampler = DurationBucketSampler(
        utts, batch_seconds=60.0, max_duration=10.0, world_size=1, rank=0, num_epochs=2
    )
    assert {b.epoch for b in sampler} == {0, 1}


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_the_epoch_without_repeats_or_gaps(world_size: int) -> None:
    utts = make_utterances(400)
    kwargs = dict(batch_seconds=60.0, max_duration=10.0, seed=7, world_size=world_size, rank=0)
    uninterrupted = DurationBucketSampler(utts, **kwargs)
    uninterrupted.set_epoch(2)
    full = [
        [u.id for u in b.utterances]
        for b in itertools.takewhile(lambda b: b.epoch == 2, uninterrupted)
    ]

    first = DurationBucketSampler(utts, **kwargs)
    first.set_epoch(2)
    stream = iter(first)
    consumed = [next(stream) for _ in range(5)]
    next(stream)  # a prefetched batch that training never consumed
    first.note_consumed(consumed[-1].epoch, consumed[-1].index)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed_in_epoch"] == 5

    resumed = DurationBucketSampler(utts, **kwargs)
    resumed.load_state_dict(state)
    rest = list(itertools.takewhile(lambda b: b.epoch == 2, iter(resumed)))
    assert rest[0].index == 5
    ids = [[u.id for u in b.utterances] for b in consumed] + [
        [u.id for u in b.utterances] for b in rest
    ]
    assert ids == full
    flat = [i for batch in ids for i in batch]
    assert len(flat) == len(set(flat))


def test_resume_after_the_last_batch_starts_the_next_epoch() -> None:
    utts = make_utterances(60)
    kwargs = dict(batch_seconds=60.0, max_duration=10.0, seed=1, world_size=1, rank=0)
    sampler = DurationBucketSampler(utts, **kwargs)
    last = sampler.num_batches(0) - 1
    resumed = DurationBucketSampler(utts, **kwargs)
    resumed.load_state_dict(sampler.state_at(0, last + 1))
    first = next(iter(resumed))
    assert (first.epoch, first.index) == (1, 0)


def test_load_state_dict_refuses_different_data_or_settings() -> None:
    utts = make_utterances(60)
    sampler = DurationBucketSampler(
        utts, batch_seconds=60.0, max_duration=10.0, world_size=1, rank=0
    )
    state = sampler.state_at(0, 3)
    other = DurationBucketSampler(
        utts[:-1], batch_seconds=60.0, max_duration=10.0, world_size=1, rank=0
    )
    with pytest.raises(ValueError, match="num_utterances"):
        other.load_state_dict(state)
    bigger = DurationBucketSampler(
        utts, batch_seconds=90.0, max_duration=10.0, world_size=1, rank=0
    )
    with pytest.raises(ValueError, match="batch_seconds"):
        bigger.load_state_dict(state)


def test_arguments_are_validated() -> None:
    utts = make_utterances(5)
    with pytest.raises(ValueError, match="max_duration"):
        DurationBucketSampler(utts, batch_seconds=10.0, max_duration=20.0)
    with pytest.raises(ValueError, match="duplicate utterance id"):
        DurationBucketSampler(utts + utts[:1], batch_seconds=10.0)
    with pytest.raises(ValueError, match="at least one utterance"):
        DurationBucketSampler([], batch_seconds=10.0)


def test_a_new_iteration_continues_from_the_consumed_position() -> None:
    utts = make_utterances(120)
    sampler = DurationBucketSampler(
        utts, batch_seconds=60.0, max_duration=10.0, seed=2, world_size=1, rank=0
    )
    stream = iter(sampler)
    first = [next(stream) for _ in range(3)]
    sampler.note_consumed(first[-1].epoch, first[-1].index)
    again = next(iter(sampler))
    assert (again.epoch, again.index) == (0, 3)
    sampler.set_epoch(4)
    assert (next(iter(sampler)).epoch, sampler.epoch) == (4, 4)
