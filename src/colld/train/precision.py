"""Mixed precision: what ``train.precision`` means on each device, in one place for training
and for the teacher-target cache (which runs the teacher under the same autocast as an online
run, so that cached and online targets are computed alike)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """Accelerate's mixed_precision value. auto: bf16 on CUDA with bf16 (fp16 otherwise);
    on a CPU, bf16 where it has native bf16 (AVX512-BF16 or AMX) and fp32 elsewhere. Measured
    on a 2-core AVX512-BF16 EPYC (docs/benchmarks.md, docs/results/demo.md): a step 0.50x of
    fp32's, the first loss within 0.4%, and the demo student's probe score the same (779 vs
    779); on an AVX2 CPU bf16 is emulated and ~60x slower per matmul."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "no"


def cpu_has_native_bf16() -> bool:
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (False where it cannot be read)."""
    path = Path("/proc/cpuinfo")
    flags = path.read_text() if path.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_slow_cpu_bf16(mixed_precision: str, device: torch.device) -> None:
    """bf16 autocast on a CPU without native bf16 (AVX512-BF16 / AMX) is emulated: measured
    here (AVX2) a 512^3 bf16 matmul ran at 1.3 GFLOP/s against 80 in fp32."""
    if device.type != "cpu" or mixed_precision != "bf16":
        return
    if not cpu_has_native_bf16():
        log.warning(
            "train.precision=bf16 on a CPU without native bf16: expect it to be much "
            "slower than fp32 (train.precision=fp32 or auto)"
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.precision=precision`` means on ``device`` (None: fp32)."""
    return _AUTOCAST_DTYPES.get(resolve_precision(precision, device))


def teacher_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast a training run with ``train.precision=precision`` gives its teacher on
    ``device`` (Accelerate's ``autocast()`` for that mixed precision): bf16 / fp16 autocast,
    or a disabled one for fp32."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
