"""Probes on synthetic features: they learn what is there, not what is not."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from colld.data.manifest import Utterance
from colld.eval.features import FeatureSet
from colld.eval.probes import (
    ProbeConfig,
    WeightedLayerSum,
    greedy_ctc,
    run_probes,
    train_probe,
)

LANGS = ("en", "de", "fr")
FAST = ProbeConfig(utterance_max_epochs=40, utterance_patience=10, sequence_lr=3e-2,
                   sequence_max_epochs=30, sequence_patience=5, sequence_batch_size=8,
                   projection_dim=16)  # fmt: skip


def _class_set(num: int, *, informative: int, num_states: int = 3, dim: int = 8, seed: int,
               shuffle_labels: bool = False) -> FeatureSet:  # fmt: skip
    """``num`` utterances of 3 languages; only hidden state ``informative`` carries the language
    (a class direction on top of noise), the others are noise. Shuffled labels: none does."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % len(LANGS)
    directions = 3.0 * torch.eye(dim)[: len(LANGS)]
    utterances, states = [], []
    for n in range(num):
        frames = int(torch.randint(5, 12, (1,), generator=gen))
        x = torch.randn(num_states, frames, dim, generator=gen)
        x[informative] += directions[labels[n]]
        label = (
            LANGS[int(torch.randint(len(LANGS), (1,), generator=gen))]
            if shuffle_labels
            else LANGS[labels[n]]
        )
        utterances.append(Utterance(id=f"s{seed}-{n}", path="x.wav", duration=1.0, language=label))
        states.append(x.half())
    return FeatureSet(
        utterances=utterances, states=states, frame_rate=50.0, model="toy", fingerprint="toy"
    )


def test_weighted_sum_starts_equal_and_sums_to_one() -> None:
    layer_sum = WeightedLayerSum(4)
    assert torch.allclose(layer_sum.weights(), torch.full((4,), 0.25))
    states = torch.arange(4.0)[:, None, None].expand(4, 2, 3)  # state j holds the value j
    assert torch.allclose(layer_sum(states), torch.full((2, 3), 1.5))


def test_utterance_probe_learns_and_weights_the_informative_layer() -> None:
    sets = [_class_set(n, informative=1, seed=s) for n, s in ((90, 0), (45, 1), (45, 2))]
    result = train_probe("lid", *sets, seed=0, config=FAST)
    assert result.test_value >= 0.95 and result.dev_value >= 0.95
    assert sum(result.layer_weights) == pytest.approx(1.0, abs=1e-5)
    assert max(range(3), key=lambda j: result.layer_weights[j]) == 1
    assert result.layer_weights[1] > 0.4
    assert set(result.per_language) == set(LANGS)


def test_utterance_probe_stays_near_chance_on_shuffled_labels() -> None:
    sets = [_class_set(n, informative=1, seed=s, shuffle_labels=True)
            for n, s in ((90, 3), (60, 4), (90, 5))]  # fmt: skip
    result = train_probe("lid", *sets, seed=0, config=FAST)
    assert result.test_value < 0.55  # chance is 1/3


def _sequence_set(num: int, *, seed: int, dim: int = 12, task: str = "pr") -> FeatureSet:
    """Phoneme strings (pr) or words (char) over 4 tokens; every token is 3 frames of its own
    direction, tokens separated by 2 frames of silence; noise on top. Two states, the first
    pure noise."""
    gen = torch.Generator().manual_seed(seed)
    tokens = ["a", "b", "ts", "ʃ"] if task == "pr" else ["a", "b", "c", "d"]
    directions = 4.0 * torch.eye(dim)[: len(tokens) + 1]  # the last one is silence
    utterances, states = [], []
    for n in range(num):
        ids = torch.randint(
            len(tokens), (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen
        )
        frames = [directions[-1]] * 2
        for i in ids.tolist():
            frames += [directions[i]] * 3 + [directions[-1]] * 2
        signal = torch.stack(frames)  # (T, D)
        x = torch.randn(2, signal.shape[0], dim, generator=gen)
        x[1] += signal
        label = [tokens[i] for i in ids.tolist()]
        utterances.append(Utterance(id=f"q{seed}-{n}", path="x.wav", duration=1.0, language="en",
                                    phonemes=" ".join(label), text="".join(label)))  # fmt: skip
        states.append(x.half())
    return FeatureSet(
        utterances=utterances, states=states, frame_rate=50.0, model="toy", fingerprint="toy"
    )


@pytest.mark.parametrize(("task", "metric"), [("pr", "per"), ("char", "cer")])
def test_ctc_probe_learns_a_toy_sequence_task(task: str, metric: str) -> None:
    sets = [_sequence_set(n, seed=s, task=task) for n, s in ((96, 10), (24, 11), (40, 12))]
    result = train_probe(task, *sets, seed=0, config=FAST)  # pr: linear head, char: lowrank
    assert result.metric == metric and not result.higher_is_better
    assert result.test_value < 0.1
    assert result.layer_weights[1] > result.layer_weights[0]


def test_greedy_ctc_collapses_repeats_then_drops_blanks() -> None:
    assert greedy_ctc(torch.tensor([0, 2, 2, 0, 2, 3, 3, 0, 0])) == [2, 2, 3]
    assert greedy_ctc(torch.tensor([0, 0])) == []


def test_same_seed_same_result() -> None:
    sets = [_class_set(n, informative=2, seed=s) for n, s in ((60, 20), (30, 21), (30, 22))]
    config = ProbeConfig(utterance_max_epochs=5, utterance_patience=5)
    threads = torch.get_num_threads()
    first = train_probe("lid", *sets, seed=7, config=config)
    assert torch.get_num_threads() == threads  # the probe's thread count is restored
    again = train_probe("lid", *sets, seed=7, config=config)
    other = train_probe("lid", *sets, seed=8, config=config)
    assert first.layer_weights == again.layer_weights and first.test_value == again.test_value
    assert first.layer_weights != other.layer_weights


def test_run_probes_summarises_seeds_and_skips_tasks_without_labels() -> None:
    sets = [_class_set(n, informative=0, seed=s) for n, s in ((60, 30), (30, 31), (30, 32))]
    config = ProbeConfig(utterance_max_epochs=10, utterance_patience=5)
    summaries = run_probes(["lid", "pr"], *sets, seeds=(0, 1), config=config)
    lid, pr = summaries["lid"], summaries["pr"]
    assert pr.skipped is not None and "phonemes" in pr.skipped and pr.mean is None
    assert lid.skipped is None and len(lid.values) == 2 and len(lid.results) == 2
    assert lid.mean == pytest.approx(sum(lid.values) / 2)
    assert lid.std is not None and lid.std >= 0.0
    assert sum(lid.layer_weights) == pytest.approx(1.0, abs=1e-5)
    assert set(lid.per_language) == set(LANGS)
    json.loads(json.dumps({name: asdict(s) for name, s in summaries.items()}))


def test_splits_of_different_models_are_refused() -> None:
    train = _class_set(30, informative=0, seed=40)
    dev = _class_set(30, informative=0, seed=41, num_states=2)
    with pytest.raises(ValueError, match="different models"):
        train_probe("lid", train, dev, dev, seed=0, config=FAST)
    with pytest.raises(ValueError, match="must be >= 1"):
        ProbeConfig(sequence_patience=0)
