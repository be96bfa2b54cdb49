"""train.precision=auto: which mixed precision each device gets."""

from __future__ import annotations

import pytest
import torch

from colld.train import precision


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_native_bf16(
    native: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_precisions_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert precision.resolve_precision("fp32", cpu) == "no"
    assert precision.resolve_precision("bf16", cpu) == "bf16"
    assert precision.resolve_precision("fp16", cpu) == "fp16"


def test_forced_bf16_on_a_cpu_without_it_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    precision.warn_slow_cpu_bf16("bf16", torch.device("cpu"))
    assert "without native bf16" in caplog.text


@pytest.mark.parametrize(("setting", "dtype"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_teacher_autocast_matches_the_training_precision(
    setting: str, dtype: torch.dtype | None
) -> None:
    layer = torch.nn.Linear(4, 4)
    with precision.teacher_autocast(setting, torch.device("cpu")):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (dtype or torch.float32)
