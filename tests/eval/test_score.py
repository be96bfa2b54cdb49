import pytest

from colld.eval.score import TaskValue, aggregate_score, task_values


def _acc(mean: float, std: float = 0.0) -> TaskValue:
    return TaskValue("accuracy", mean, std)


def _per(mean: float, std: float = 0.0) -> TaskValue:
    return TaskValue("per", mean, std)


def test_known_numbers() -> None:
    teacher = {"lid": _acc(0.9), "pr": _per(0.3)}
    fbank = {"lid": _acc(0.5), "pr": _per(0.8)}
    model = {"lid": _acc(0.7), "pr": _per(0.4)}
    score = aggregate_score(model, teacher, fbank)
    # lid: (0.7-0.5)/(0.9-0.5) = 0.5; pr: (0.6-0.2)/(0.7-0.2) = 0.8
    assert score.per_task == pytest.approx({"lid": 500.0, "pr": 800.0})
    assert score.value == pytest.approx(650.0)
    assert score.flagged == {}


def test_teacher_scores_1000_and_fbank_0() -> None:
    teacher = {"lid": _acc(0.9), "pr": _per(0.3)}
    fbank = {"lid": _acc(0.5), "pr": _per(0.8)}
    assert aggregate_score(teacher, teacher, fbank).value == pytest.approx(1000.0)
    assert aggregate_score(fbank, teacher, fbank).value == pytest.approx(0.0)


def test_student_worse_than_fbank_is_negative() -> None:
    score = aggregate_score({"lid": _acc(0.4)}, {"lid": _acc(0.9)}, {"lid": _acc(0.5)})
    assert score.value == pytest.approx(-250.0)  # (0.4 - 0.5) / (0.9 - 0.5)


def test_task_within_margin_is_flagged_and_left_out() -> None:
    teacher = {"lid": _acc(0.9), "sid": _acc(0.51)}
    fbank = {"lid": _acc(0.5), "sid": _acc(0.50)}
    model = {"lid": _acc(0.7), "sid": _acc(0.99)}
    score = aggregate_score(model, teacher, fbank)
    assert "sid" in score.flagged and "0.0100" in score.flagged["sid"]
    assert score.value == pytest.approx(500.0)  # sid's 49000 would have dominated


def test_seed_spread_widens_the_margin() -> None:
    teacher = {"lid": _acc(0.60, std=0.03)}
    fbank = {"lid": _acc(0.50, std=0.04)}  # gap 0.10 < 2 * 0.05
    score = aggregate_score({"lid": _acc(0.55)}, teacher, fbank)
    assert score.value is None and "lid" in score.flagged


def test_missing_and_mismatched_tasks_are_flagged() -> None:
    teacher = {"lid": _acc(0.9), "pr": _per(0.3)}
    fbank = {"lid": _acc(0.5), "pr": _acc(0.8)}
    model = {"lid": _acc(0.7)}
    score = aggregate_score(model, teacher, fbank)
    assert "model" in score.flagged["pr"]
    assert set(score.per_task) == {"lid"}
    score = aggregate_score({"lid": _acc(0.7), "pr": _per(0.5)}, teacher, fbank)
    assert "metrics differ" in score.flagged["pr"]


def test_task_values_reads_probe_summaries() -> None:
    probes = {
        "lid": {"metric": "accuracy", "mean": 0.8, "std": 0.01},
        "char": {"metric": "cer", "mean": None, "skipped": "no text"},
    }
    assert task_values(probes) == {"lid": TaskValue("accuracy", 0.8, 0.01)}


def test_task_values_dev_split_reads_dev_values() -> None:
    probes = {
        "lid": {"metric": "accuracy", "mean": 0.8, "std": 0.01, "dev_values": [0.6, 0.7, 0.8]},
        "pr": {"metric": "per", "mean": 0.4, "std": 0.02},  # a result without dev values
    }
    dev = task_values(probes, split="dev")
    assert set(dev) == {"lid"}
    assert (dev["lid"].mean, dev["lid"].std) == pytest.approx((0.7, 0.1))
    with pytest.raises(ValueError, match="split"):
        task_values(probes, split="train")
