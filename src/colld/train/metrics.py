"""Run logging: TensorBoard, a JSONL metrics file (read later by reports), a progress bar;
and the cross-process summaries they log (means over micro-batches and processes, a
fingerprint of the weights to check that data-parallel replicas agree)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from colld.objectives.objective import LossOutput

log = logging.getLogger(__name__)


def loss_scalars(out: LossOutput, prefix: str) -> dict[str, float]:
    """Flatten a LossOutput into named floats: total, every pair's part, health signals."""
    scalars = {f"{prefix}/loss": float(out.total.detach())}
    groups = {
        "loss": out.parts,
        "acc": out.accuracy,
        "cos": out.cosine,
        "student_std": out.student_std,
    }
    for group, values in groups.items():
        for name, value in values.items():
            scalars[f"{prefix}/{group}/{name}"] = float(value.detach())
    if out.accuracy:
        scalars[f"{prefix}/acc"] = sum(scalars[f"{prefix}/acc/{k}"] for k in out.accuracy) / len(
            out.accuracy
        )
    return scalars


def mean_losses(outs: Sequence[LossOutput]) -> LossOutput:
    """The detached mean of the micro-batches' losses of one optimizer update."""

    def mean(values: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v.detach().float() for v in values]).mean()

    first = outs[0]
    return LossOutput(
        total=mean(o.total for o in outs),
        parts={k: mean(o.parts[k] for o in outs) for k in first.parts},
        accuracy={k: mean(o.accuracy[k] for o in outs) for k in first.accuracy},
        cosine={k: mean(o.cosine[k] for o in outs) for k in first.cosine},
        student_std={k: mean(o.student_std[k] for o in outs) for k in first.student_std},
    )


def mean_over_processes(scalars: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each scalar averaged over the processes (one all-reduce; every process must call it
    with the same keys). With equal per-process batches this is the global batch's value."""
    if accelerator.num_processes == 1:
        return scalars
    keys = sorted(scalars)
    values = torch.tensor(
        [scalars[k] for k in keys], dtype=torch.float64, device=accelerator.device
    )
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def parameter_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of the exact bytes (and names, dtypes, shapes) of some tensors, e.g. a module's
    ``named_parameters()``: equal on two processes iff their weights are bit-identical."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named, key=lambda item: item[0]):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RunLogger:
    """Writes only on the main process; other ranks get a silent logger."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        desc: str = "distill",
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._writer = None
        self._jsonl = None
        self._bar = None
        self._t0 = time.perf_counter()
        self._audio0 = 0.0
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True
        )

    def start_window(self, audio_seconds: float) -> None:
        self._t0 = time.perf_counter()
        self._audio0 = audio_seconds

    def throughput(self, audio_seconds: float) -> float:
        """Audio seconds processed per wall second since the last window start."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        return (audio_seconds - self._audio0) / elapsed

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
