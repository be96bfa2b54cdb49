"""Cost of a model at inference: parameters, FLOPs, real-time factor and peak memory (CPU).

One definition for every model ``colld evaluate`` accepts (``load_eval_model``: "fbank", a
teacher spec, an exported student directory, an ONNX export), so teacher and student numbers
compare:

    parameters               ``count_encoder_parameters`` (0 for fbank).
    flops_per_audio_second   ``torch.utils.flop_counter.FlopCounterMode`` over the encoder
                             forward of one clip (every layer returned, batch 1, no padding),
                             divided by the clip's seconds. FlopCounterMode counts 2 FLOPs per
                             multiply-add of matrix products and convolutions only: mm, addmm,
                             bmm, baddbmm, convolution and the fused attention kernels (here also
                             PyTorch's CPU flash-attention kernel, which it does not map itself).
                             Element-wise work (activations, softmax, layer norm, adds) and the
                             front end (numpy log-mel / fbank) are not counted, so fbank has 0.
    latency_batch1_s         median wall time over ``repeats`` (after ``warmup`` untimed runs)
                             of front end + encoder on one clip of ``clip_seconds``.
    rtf_batch1               latency_batch1_s / clip_seconds (< 1 is faster than real time).
    rtf_batched              median wall time of front end + padding + encoder on
                             ``batch_size`` clips of ``clip_seconds`` each (equal lengths, so no
                             padded frames), divided by the batch's total audio seconds.
    memory_*_mb              resident set size (RSS) of the measuring process, MiB:
                             ``memory_after_load_mb`` once the model and the clips are loaded,
                             ``peak_memory_mb`` the highest RSS during the batched runs, and
                             ``peak_memory_increase_mb`` their difference (what inference adds).
                             The peak is the kernel's high-water mark (VmHWM, reset through
                             /proc/self/clear_refs before the runs), exact; where that is not
                             available, RSS sampled every millisecond (``memory_method``).

ONNX exports (``colld export --onnx``, fp32 or int8) run through onnxruntime (CPU provider, as
many intra-op threads as torch uses): latency, real-time factors and memory are measured alike.
``parameters`` is the count recorded at export (``count_encoder_parameters`` of the exported
encoder: the same definition; int8 stores the same weights in one byte each, ``model_file_mb``
shows that); FLOPs are not counted (None, reason in ``skipped``): ``FlopCounterMode`` sees torch
ops only, and int8's integer products are no float FLOPs.

With ``isolated`` (the default) all of it runs in a fresh Python process (``python -c``) that loads only
this model, so the RSS figures are the model's own and not the caller's; timings are taken in
that same process. The clips are synthetic (noise plus tones): an encoder's cost does not depend
on what is said. Timings on a shared machine are noisy; compare models measured alike.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from colld.audio import SAMPLE_RATE, FrontEnd
from colld.data.batch import pad_features
from colld.encoders.base import SpeechEncoder
from colld.eval.models import load_eval_model
from colld.students.build import count_encoder_parameters

if TYPE_CHECKING:
    from colld.deploy.onnx import OnnxEncoder

logger = logging.getLogger(__name__)

MIB = 1 << 20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_SAMPLE_INTERVAL_S = 0.001
ONNX_FLOPS_SKIPPED = (
    "not counted for ONNX exports: torch's FlopCounterMode sees torch ops only, and onnxruntime "
    "runs the graph (int8: integer matrix products, no float FLOPs)"
)
ONNX_PARAMETERS_SKIPPED = (
    "the export records no parameter count (colld.parameters: exported before colld "
    "recorded it); re-export it"
)


@dataclass(kw_only=True)
class Efficiency:
    """Inference cost of one model (definitions in the module docstring)."""

    model: str
    parameters: int | None
    """None where unknown (an ONNX export without the count: see ``skipped``)."""
    flops_per_audio_second: float | None
    """None where not counted (ONNX exports: see ``skipped``)."""
    latency_batch1_s: float
    rtf_batch1: float
    rtf_batched: float
    memory_after_load_mb: float
    peak_memory_mb: float
    peak_memory_increase_mb: float
    memory_method: str
    """"vmhwm" (kernel high-water mark) or "sampled" (RSS polled every millisecond)."""
    threads: int
    """torch intra-op threads used (onnxruntime's, for ONNX exports: the same number)."""
    device: str
    """"cpu (<processor name>)"."""
    clip_seconds: float
    batch_size: int
    repeats: int
    warmup: int
    isolated: bool
    """Measured in a fresh process (see the module docstring)."""
    torch_version: str
    measurement_s: float
    """Wall time of the whole measurement (process start and model loading included)."""
    runtime: str = "torch"
    """What ran the encoder: "torch", or "onnxruntime <version> (<precision>)"."""
    model_file_mb: float | None = None
    """ONNX exports: size of the model's files on disk, MiB (None for torch models)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Field -> why it is None (ONNX exports: FLOPs, sometimes parameters)."""


@dataclass(frozen=True, kw_only=True)
class _Settings:
    clip_seconds: float
    batch_size: int
    repeats: int
    warmup: int
    threads: int | None


def measure_efficiency(
    spec: str,
    *,
    clip_seconds: float = 10.0,
    batch_size: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    isolated: bool = True,
) -> Efficiency:
    """Measure the inference cost of ``spec`` (anything ``load_eval_model`` accepts) on CPU.

    threads: torch intra-op threads (None = torch's default in the measuring process).
    isolated: run in a fresh Python process (honest memory figures); False measures in this
        process (faster to start; RSS then includes whatever this process already holds).
    """
    settings = _Settings(
        clip_seconds=clip_seconds,
        batch_size=batch_size,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
    )
    _check_settings(settings)
    start = time.perf_counter()
    result = _measure_isolated(spec, settings) if isolated else _measure(spec, settings, False)
    result.measurement_s = time.perf_counter() - start
    logger.info("efficiency of %s: %s", spec, result)
    return result


def _check_settings(settings: _Settings) -> None:
    if not settings.clip_seconds > 0:
        raise ValueError(f"clip_seconds must be > 0, found {settings.clip_seconds}")
    for name in ("batch_size", "repeats"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be >= 1, found {getattr(settings, name)}")
    if settings.warmup < 0:
        raise ValueError(f"warmup must be >= 0, found {settings.warmup}")
    if settings.threads is not None and settings.threads < 1:
        raise ValueError(f"threads must be >= 1 or None, found {settings.threads}")


def _measure_isolated(spec: str, settings: _Settings) -> Efficiency:
    """``_measure`` in a fresh ``python -c`` process (no re-import of the caller's __main__,
    unlike multiprocessing's spawn); the result comes back as JSON in a temporary file."""
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding colld/
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory(prefix="colld-efficiency-") as tmp:
        out = Path(tmp) / "efficiency.json"
        request = json.dumps({"spec": spec, "settings": asdict(settings), "out": str(out)})
        code = "import sys; from colld.eval.efficiency import _child_main; _child_main(sys.argv[1])"
        proc = subprocess.run(
            [sys.executable, "-c", code, request], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"efficiency measurement of {spec!r} failed in its subprocess (exit "
                f"{proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return Efficiency(**json.loads(out.read_text()))


def _child_main(request: str) -> None:
    """Entry point of the isolated process: measure, write the result as JSON."""
    args = json.loads(request)
    result = _measure(args["spec"], _Settings(**args["settings"]), True)
    Path(args["out"]).write_text(json.dumps(asdict(result)))


def _measure(spec: str, settings: _Settings, isolated: bool) -> Efficiency:
    """The whole measurement, in the calling process."""
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        loaded = load_eval_model(spec)
        encoder = None if loaded is None else loaded.encoder
        if isinstance(encoder, SpeechEncoder):
            encoder.eval()
        front_end = (
            FrontEnd.for_family("whisper") if loaded is None else FrontEnd(loaded.feature_extractor)
        )
        clips = [synthetic_clip(settings.clip_seconds, seed=n) for n in range(settings.batch_size)]
        after_load = _rss()
        with peak_rss() as peak:
            batched_s = _median_seconds(
                lambda: run_model(encoder, front_end, clips), settings.repeats, settings.warmup
            )
        latency_s = _median_seconds(
            lambda: run_model(encoder, front_end, clips[:1]), settings.repeats, settings.warmup
        )
        static = _static_cost(encoder, front_end, clips[0])
        flops = static.flops
        return Efficiency(
            model=spec,
            parameters=static.parameters,
            flops_per_audio_second=None if flops is None else flops / settings.clip_seconds,
            latency_batch1_s=latency_s,
            rtf_batch1=latency_s / settings.clip_seconds,
            rtf_batched=batched_s / (settings.clip_seconds * settings.batch_size),
            memory_after_load_mb=after_load / MIB,
            peak_memory_mb=peak.bytes / MIB,
            peak_memory_increase_mb=(peak.bytes - after_load) / MIB,
            memory_method=peak.method,
            threads=torch.get_num_threads(),
            device=f"cpu ({_processor_name()})",
            clip_seconds=settings.clip_seconds,
            batch_size=settings.batch_size,
            repeats=settings.repeats,
            warmup=settings.warmup,
            isolated=isolated,
            torch_version=torch.__version__,
            measurement_s=0.0,  # set by the caller, which sees the process start too
            runtime=static.runtime,
            model_file_mb=None if static.file_bytes is None else static.file_bytes / MIB,
            skipped=static.skipped,
        )
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(kw_only=True)
class _StaticCost:
    """What an encoder costs regardless of timing: parameters, FLOPs of one clip, runtime,
    file size; ``skipped``: field -> why it is None."""

    parameters: int | None
    flops: int | None
    runtime: str = "torch"
    file_bytes: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def _static_cost(
    encoder: SpeechEncoder | OnnxEncoder | None, front_end: FrontEnd, clip: np.ndarray
) -> _StaticCost:
    """Parameters and FLOPs of a torch encoder (0 for fbank), or what an ONNX export records
    (see the module docstring). Shape: clip (S,)."""
    if encoder is None:
        return _StaticCost(parameters=0, flops=0)
    if isinstance(encoder, SpeechEncoder):
        return _StaticCost(
            parameters=count_encoder_parameters(encoder),
            flops=count_flops(encoder, front_end, clip),
        )
    import onnxruntime

    skipped = {"flops_per_audio_second": ONNX_FLOPS_SKIPPED}
    if encoder.parameters is None:
        skipped["parameters"] = ONNX_PARAMETERS_SKIPPED
    for field_name, reason in skipped.items():
        logger.info("efficiency of %s: %s %s", encoder.path, field_name, reason)
    return _StaticCost(
        parameters=encoder.parameters,
        flops=None,
        runtime=f"onnxruntime {onnxruntime.__version__} ({encoder.precision})",
        file_bytes=encoder.file_bytes,
        skipped=skipped,
    )


def synthetic_clip(seconds: float, *, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like test audio: three harmonic tones gliding in pitch plus white noise, peak ~0.5.

    Shape: -> (S,), float32, S = round(seconds * sample_rate).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    pitch = 120.0 + 40.0 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    tones = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2  # syllable-rate amplitude
    clip = 0.25 * envelope * tones + 0.02 * rng.standard_normal(t.shape[0])
    return clip.astype(np.float32)


def run_model(
    encoder: SpeechEncoder | OnnxEncoder | None, front_end: FrontEnd, clips: Sequence[np.ndarray]
) -> Tensor:
    """Front end on each clip, zero-padding, then every layer of ``encoder`` (None = fbank; an
    ONNX export runs through onnxruntime).

    Shape: B x (S,) -> the last hidden state (B, T, D), or the padded features for fbank.
    """
    features, lengths = pad_features([front_end(clip) for clip in clips], front_end.feature_dim)
    if encoder is None:
        return features
    with torch.inference_mode():
        output = encoder(features, lengths)  # layers=None: all hidden states
    return output.hidden_states[encoder.num_layers]


def _cpu_sdpa_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs of PyTorch's CPU flash-attention kernel: the same two matrix products as SDPA."""
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


_EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


def count_flops(encoder: SpeechEncoder, front_end: FrontEnd, clip: np.ndarray) -> int:
    """FLOPs of the encoder forward (all layers, batch 1) on one clip; front end not counted.

    Shape: clip (S,) -> scalar (see the module docstring for which ops count).
    """
    features = front_end(clip)
    lengths = torch.tensor([features.shape[0]])
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.inference_mode(), counter:
        encoder(features[None], lengths)
    return int(counter.get_total_flops())


def _median_seconds(run: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(median(times))


# ---------------------------------------------------------------- memory
def _rss() -> int:
    """Resident set size of this process, bytes."""
    return int(psutil.Process().memory_info().rss)


@dataclass
class PeakRss:
    """Filled in by ``peak_rss`` when its block ends: ``bytes`` and the ``method`` used."""

    bytes: int = 0
    method: str = ""


@contextmanager
def peak_rss() -> Iterator[PeakRss]:
    """The highest RSS of this process inside the block.

    Linux: the kernel's high-water mark (VmHWM), reset on entry by writing 5 to
    /proc/self/clear_refs, read on exit (exact). Elsewhere: RSS polled every millisecond by a
    thread (may miss a spike shorter than that).
    """
    result = PeakRss()
    if _reset_high_water_mark():
        yield result
        result.bytes, result.method = _high_water_mark(), "vmhwm"
        return
    stop = threading.Event()
    samples = [_rss()]

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss())
            stop.wait(_SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.bytes, result.method = max(samples + [_rss()]), "sampled"


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return _high_water_mark() > 0
    except (OSError, ValueError):
        return False


def _high_water_mark() -> int:
    """VmHWM of /proc/self/status, bytes (0 when absent)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
