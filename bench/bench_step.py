"""Step-time breakdown of the default distillation recipe, and the contrastive loss' overhead.

Prints, per (precision, loss): teacher forward, student forward, loss, backward, optimizer and
data time per step; audio seconds per second; the step's FLOPs against this device's measured
matmul peak (the FLOP bound); the first-step loss (bf16 vs fp32 agreement) and the
contrastive-vs-l1cos step-time ratio, all measured in one run; and each configuration's peak
memory: the process' peak resident set (Linux VmHWM, reset before each configuration through
/proc/self/clear_refs; ru_maxrss where that is unavailable) and, on CUDA, the peak allocated.

    python bench/bench_step.py                                  # CPU, embedded teacher + corpus
    python bench/bench_step.py --save-features .carry/feats.pt  # one batch, for another machine
    python bench/bench_step.py --device cuda --teacher DIR --features .carry/feats.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from colld.data.batch import Batch, pad_features
from colld.objectives.objective import DistillObjective, ObjectiveConfig
from colld.students.build import (
    StudentSpec,
    build_student,
    count_encoder_parameters,
    resolve_student_sizes,
)
from colld.teachers import load_teacher
from colld.train.step import teacher_targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_clips(args: argparse.Namespace, feature_extractor) -> tuple[list[torch.Tensor], float]:
    """Per-clip features (F, C) of about ``batch_seconds`` of real speech, and data time/clip."""
    if args.features:
        saved = torch.load(args.features, weights_only=True)
        return [c.float() for c in saved["clips"]], float(saved["data_seconds_per_batch"])
    from colld.audio import FrontEnd, load_audio
    from colld.data.manifest import read_manifest

    rows, _ = read_manifest(Path(args.corpus) / "manifests" / "train.jsonl")
    frontend = FrontEnd(feature_extractor)
    # A bucketed batch, as the duration sampler makes: neighbours in duration from the median.
    rows = sorted(rows, key=lambda r: (r.duration, r.id))
    window, total = [], 0.0
    for row in rows[len(rows) // 2 :]:
        if total + row.duration > args.batch_seconds:
            break
        window.append(row)
        total += row.duration
    t0 = time.perf_counter()
    clips = [frontend(load_audio(r.resolved_path(Path(args.corpus) / "manifests"))) for r in window]
    return clips, time.perf_counter() - t0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmHWM") -> int:
    """VmHWM (peak resident set) or VmRSS (current) of this process in bytes."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024) -> float:
    """FLOP/s of a square matmul on this device (the practical peak): the fastest of several
    timed rounds, so that one slow round (another process, a cold cache) cannot lower the peak
    and push a step's "% of peak" past 100 (seen here with a single 3-matmul round)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, best = 3 if device.type == "cpu" else 50, math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 * reps / best


def run_config(teacher, batch: Batch, loss: str, precision: str, args, device) -> dict:
    # The default student's sizes; its weights do not change the step's cost, so weight
    # selection stands in for the default's pruning (which needs calibration audio).
    sizes = resolve_student_sizes(teacher, StudentSpec())
    spec = StudentSpec(init="teacher", **dataclasses.asdict(sizes))
    student = build_student(teacher, spec, seed=0).to(device).train()
    objective = DistillObjective.for_encoders(ObjectiveConfig(loss=loss), student, teacher).to(
        device
    )
    params = list(student.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    parts = {k: 0.0 for k in ("teacher", "student_fwd", "loss", "backward", "optimizer")}
    first_loss = None
    rss_before = rss_bytes("VmRSS")
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        g = torch.Generator(device=device).manual_seed(step)
        marks = [time.perf_counter()]
        with autocast:
            targets = teacher_targets(teacher, batch, objective)
            sync(device)
            marks.append(time.perf_counter())
            num_frames = next(iter(targets.states.values())).shape[1]
            mask = objective.make_mask(targets.lengths, num_frames, g)
            out = student(
                batch.features, batch.feature_lengths, layers=objective.student_layers, mask=mask
            )
            sync(device)
            marks.append(time.perf_counter())
            result = objective(out.hidden_states, targets.states, out.lengths, mask, g)
            sync(device)
            marks.append(time.perf_counter())
        result.total.backward()
        sync(device)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        if step == 0:
            first_loss = float(result.total.detach())
        if step >= args.warmup:
            for key, a, b in zip(parts, marks[:-1], marks[1:], strict=True):
                parts[key] += (b - a) / args.steps
    memory = {
        "rss_before_mb": rss_before / 2**20,
        "peak_rss_mb": rss_bytes("VmHWM") / 2**20,
        "peak_reset": peak_reset,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
    }
    flops = count_step_flops(teacher, student, objective, batch, autocast)
    return {
        "memory": memory,
        "parts_s": parts,
        "step_s": sum(parts.values()),
        "first_loss": first_loss,
        "flops": flops,
        "student_params": count_encoder_parameters(student),
    }


def count_step_flops(teacher, student, objective, batch: Batch, autocast) -> float:
    counter = FlopCounterMode(display=False)
    g = torch.Generator(device=batch.features.device).manual_seed(0)
    with counter, autocast:
        targets = teacher_targets(teacher, batch, objective)
        num_frames = next(iter(targets.states.values())).shape[1]
        mask = objective.make_mask(targets.lengths, num_frames, g)
        out = student(
            batch.features, batch.feature_lengths, layers=objective.student_layers, mask=mask
        )
        objective(out.hidden_states, targets.states, out.lengths, mask, g).total.backward()
    student.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="whisper-base")
    parser.add_argument("--corpus", default="data/corpus-quick")
    parser.add_argument("--features", help="clips saved with --save-features")
    parser.add_argument("--save-features", help="write one batch of clips and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--losses", default="contrastive,l1cos")
    parser.add_argument("--batch-seconds", type=float, default=64.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="tile the batch N times")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = load_teacher(args.teacher)
    clips, data_s = load_clips(args, loaded.feature_extractor)
    if args.save_features:
        torch.save(
            {"clips": [c.half() for c in clips], "data_seconds_per_batch": data_s},
            args.save_features,
        )
        print(f"saved {len(clips)} clips to {args.save_features}")
        return
    teacher = loaded.encoder.to(device).eval()
    features, lengths = pad_features(clips * args.repeat)
    seconds = lengths.float() / 100.0  # log-mel frames at 100 per second
    batch = Batch(
        ids=[str(i) for i in range(len(lengths))],
        features=features,
        feature_lengths=lengths,
        durations=seconds,
    ).to(device)
    audio_s = float(seconds.sum())
    rows = {}
    for precision in args.precisions.split(","):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_peak(device, dtype)
        for loss in args.losses.split(","):
            r = run_config(teacher, batch, loss, precision, args, device)
            r["peak_flops"] = peak
            rows[(precision, loss)] = r
    print_table(rows, audio_s, data_s * args.repeat, device, len(lengths))
    peaks = {
        str(dt): matmul_peak(device, dt, size=512) / 1e9 for dt in (torch.float32, torch.bfloat16)
    }
    print("512^3 matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {f"{prec}/{loss}": r for (prec, loss), r in rows.items()} | {"audio_s": audio_s},
                indent=1,
            )
        )


def print_table(rows: dict, audio_s: float, data_s: float, device, num_clips: int) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"\ndevice: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"batch: {num_clips} clips, {audio_s:.1f} s of audio; data+front end (0 workers): "
        f"{data_s * 1000:.0f} ms/batch"
    )
    header = (
        "precision",
        "loss",
        "teacher ms",
        "student fwd ms",
        "loss ms",
        "backward ms",
        "optim ms",
        "step ms",
        "audio s/s",
        "GFLOP/step",
        "% of peak",
        "first loss",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (precision, loss), r in rows.items():
        p, step = r["parts_s"], r["step_s"]
        print(
            f"| {precision} | {loss} | {p['teacher'] * 1e3:.0f} | {p['student_fwd'] * 1e3:.0f} | "
            f"{p['loss'] * 1e3:.0f} | {p['backward'] * 1e3:.0f} | {p['optimizer'] * 1e3:.0f} | "
            f"{step * 1e3:.0f} | {audio_s / step:.0f} | {r['flops'] / 1e9:.0f} | "
            f"{100 * r['flops'] / step / r['peak_flops']:.0f} | {r['first_loss']:.4f} |"
        )
    for precision in {p for p, _ in rows}:
        c, l1 = rows.get((precision, "contrastive")), rows.get((precision, "l1cos"))
        if c and l1:
            print(f"{precision}: contrastive step / l1cos step = {c['step_s'] / l1['step_s']:.3f}")
    if ("fp32", "contrastive") in rows and ("bf16", "contrastive") in rows:
        a, b = rows[("fp32", "contrastive")], rows[("bf16", "contrastive")]
        print(
            f"bf16 vs fp32: first-step loss {b['first_loss']:.4f} vs {a['first_loss']:.4f}, "
            f"step time ratio {b['step_s'] / a['step_s']:.2f}"
        )
    for (precision, loss), r in rows.items():
        m = r["memory"]
        cuda = (
            ""
            if m["cuda_peak_mb"] is None
            else f", CUDA peak allocated {m['cuda_peak_mb']:.0f} MiB"
        )
        scope = "this configuration" if m["peak_reset"] else "the process so far (no reset)"
        print(
            f"peak memory {precision}/{loss}: RSS peak {m['peak_rss_mb']:.0f} MiB over "
            f"{scope} ({m['rss_before_mb']:.0f} MiB before its first step: libraries, teacher, "
            f"batch){cuda}"
        )
    print(
        f"data share of a fp32 contrastive step (0 workers, upper bound): "
        f"{100 * data_s / (data_s + rows.get(('fp32', 'contrastive'), next(iter(rows.values())))['step_s']):.1f}%"
    )


if __name__ == "__main__":
    main()
