"""train.precision=auto: which mixed precision each device gets."""

from __future__ import annotations

import pytest
import torch

from colld.train import recipe


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_native_bf16(
    native: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: native)
    assert recipe.resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_precisions_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert recipe.resolve_precision("fp32", cpu) == "no"
    assert recipe.resolve_precision("bf16", cpu) == "bf16"
    assert recipe.resolve_precision("fp16", cpu) == "fp16"


def test_forced_bf16_on_a_cpu_without_it_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: False)
    recipe.warn_slow_cpu_bf16("bf16", torch.device("cpu"))
    assert "without native bf16" in caplog.text
