"""Cost of the distillation losses: contrastive vs l1cos vs mse, alone and within a step.

Run:  .venv/bin/python bench/bench_loss.py            (CPU, 2 threads, fp32, B=8)
      .venv/bin/python bench/bench_loss.py --device cuda --lengths 250 500 750 1500
      add --bf16 to run tables 2 and 3 under bf16 autocast (the losses stay fp32 inside,
      except the contrastive cosine matmul; table 2 adds the all-fp32 contrastive loss)

Prints three tables:
1. loss only: forward + backward of the per-pair loss over 6 pairs, given projected
   predictions z (B, T, D_t) and targets y; B=8, D_t=512, K=100, masked frames at
   mask_prob 0.65 / span 10 (contrastive also with all frames counted);
2. objective: ``DistillObjective`` forward + backward (6 heads D_s -> D_t, layer-norm targets,
   masking, health metrics), ratio to l1cos;
3. step estimate: a Whisper-base-like teacher forward (no grad; 2 convs, 6 pre-LN layers,
   d 512, FFN 2048) + a deep-narrow student forward + backward (6 layers, d 384, FFN 1536)
   + the objective, i.e. everything in a step except the optimiser and data loading; the
   contrastive loss's extra time is reported as a share of the l1cos step (goal: <= 10%).
Timings are medians over ``--repeats`` runs after one warm-up; on a shared machine they vary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from colld.objectives import losses
from colld.objectives.losses import contrastive_loss, l1cos_loss, mse_loss
from colld.objectives.masking import span_mask, valid_frames
from colld.objectives.objective import DistillObjective, ObjectiveConfig

BATCH, TEACHER_DIM, STUDENT_DIM, NUM_LAYERS, NUM_NEGATIVES = 8, 512, 384, 6, 100
AUTOCAST: Callable[[], AbstractContextManager] = nullcontext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _lengths(num_frames: int, device: torch.device) -> Tensor:
    # A realistic spread of utterance lengths: 60% .. 100% of the padded length.
    fractions = torch.linspace(0.6, 1.0, BATCH)
    return (fractions * num_frames).long().to(device)


def _loss_only(num_frames: int, repeats: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = _lengths(num_frames, device)
    valid = valid_frames(lengths, num_frames)
    mask = span_mask(lengths, num_frames, mask_prob=0.65, span=10, min_spans=2, generator=generator)
    shape = (BATCH, num_frames, TEACHER_DIM)
    z = [torch.randn(shape, device=device, requires_grad=True) for _ in range(NUM_LAYERS)]
    y = [torch.randn(shape, device=device) for _ in range(NUM_LAYERS)]
    losses = {
        "contrastive (masked)": lambda a, b: contrastive_loss(
            a, b, mask, lengths, tau=0.1, num_negatives=NUM_NEGATIVES, generator=generator
        ),
        "contrastive (all)": lambda a, b: contrastive_loss(
            a, b, valid, lengths, tau=0.1, num_negatives=NUM_NEGATIVES, generator=generator
        ),
        "l1cos (masked)": lambda a, b: l1cos_loss(a, b, mask, lengths),
        "mse (masked)": lambda a, b: mse_loss(a, b, mask, lengths),
    }
    results = {}
    for name, loss_fn in losses.items():

        def run(loss_fn=loss_fn) -> None:
            total = sum(loss_fn(a, b).loss for a, b in zip(z, y, strict=True))
            total.backward()

        results[name] = _median_seconds(run, repeats, device)
    return results


def _objective(loss: str, device: torch.device) -> DistillObjective:
    config = ObjectiveConfig(loss=loss, num_negatives=NUM_NEGATIVES)
    return DistillObjective(config, STUDENT_DIM, TEACHER_DIM, NUM_LAYERS, NUM_LAYERS).to(device)


def _objective_only(num_frames: int, repeats: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = _lengths(num_frames, device)
    results = {}
    variants = ["contrastive", "l1cos", "mse"]
    if AUTOCAST is not nullcontext:
        variants.insert(1, FP32_COSINES)
    for variant in variants:
        loss = variant.split(" ")[0]
        objective = _objective(loss, device)
        student = {
            i: torch.randn(BATCH, num_frames, STUDENT_DIM, device=device, requires_grad=True)
            for i in objective.student_layers
        }
        teacher = {
            j: torch.randn(BATCH, num_frames, TEACHER_DIM, device=device)
            for j in objective.teacher_layers
        }

        def run(objective=objective, student=student, teacher=teacher) -> None:
            with AUTOCAST():
                mask = objective.make_mask(lengths, num_frames, generator)
                total = objective(student, teacher, lengths, mask, generator).total
            total.backward()

        fp32_cosines = variant == FP32_COSINES
        with _fp32_cosines() if fp32_cosines else nullcontext():
            results[variant] = _median_seconds(run, repeats, device)
    return results


FP32_COSINES = "contrastive (fp32 cosines)"


@contextmanager
def _fp32_cosines() -> Iterator[None]:
    """The contrastive loss' cosine matmul in float32 under autocast too (colld before
    2026-11-27 did all of the loss in float32): the comparison row of table 2."""
    saved = losses._autocast_matmul_dtype
    losses._autocast_matmul_dtype = lambda device_type: torch.float32
    try:
        yield
    finally:
        losses._autocast_matmul_dtype = saved


class _WhisperLikeEncoder(nn.Module):
    """Whisper's encoder shape (convs, sinusoid-free learned positions, pre-LN layers) for timing."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(80, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.zeros(1500, dim))
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                ffn_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, mel: Tensor, mask: Tensor | None = None) -> dict[int, Tensor]:
        x = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(mel)))).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positions[: x.shape[1]]
        states = {}
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x)
            states[index] = self.norm(x) if index == len(self.layers) else x
        return states


def _step(num_frames: int, repeats: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = _lengths(num_frames, device)
    teacher = _WhisperLikeEncoder(TEACHER_DIM, 2048, 8, NUM_LAYERS).to(device).eval()
    student = _WhisperLikeEncoder(STUDENT_DIM, 1536, 6, NUM_LAYERS).to(device)
    mel = torch.randn(BATCH, 80, 2 * num_frames, device=device)
    results = {}
    for loss in ("contrastive", "l1cos", "mse", "none"):
        objective = _objective("l1cos" if loss == "none" else loss, device)

        def run(objective=objective, loss=loss) -> None:
            with AUTOCAST():
                with torch.no_grad():
                    targets = teacher(mel)
                mask = objective.make_mask(lengths, num_frames, generator)
                states = student(mel, mask)
                if loss == "none":  # the step without any objective: a dummy scalar
                    total = sum(s.float().mean() for s in states.values())
                else:
                    total = objective(states, targets, lengths, mask, generator).total
            total.backward()

        results[loss] = _median_seconds(run, repeats, device)
    return results


def _print_table(title: str, rows: list[tuple[int, dict[str, float]]], reference: str) -> None:
    print(f"\n{title}")
    names = list(rows[0][1])
    header = f"{'T':>5} | " + " | ".join(f"{n:>22}" for n in names)
    print(header)
    print("-" * len(header))
    for num_frames, result in rows:
        cells = [
            f"{1000 * result[n]:8.1f} ms ({result[n] / result[reference]:4.2f}x)" for n in names
        ]
        print(f"{num_frames:>5} | " + " | ".join(f"{c:>22}" for c in cells))


def main() -> None:
    global AUTOCAST, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[250, 500, 750])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-lengths", type=int, nargs="*", default=[750])
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in tables 2 and 3")
    parser.add_argument("--batch", type=int, default=BATCH, help="utterances per batch (B)")
    args = parser.parse_args()
    device = torch.device(args.device)
    BATCH = args.batch
    if args.bf16:
        AUTOCAST = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{'bf16 autocast (contrastive cosine matmul bf16, the rest fp32)' if args.bf16 else 'fp32'}, "
        f"B={BATCH}, D_t={TEACHER_DIM}, D_s={STUDENT_DIM}, {NUM_LAYERS} pairs, K={NUM_NEGATIVES}, "
        f"1-min load average {load:.1f}"
    )
    loss_rows = [(t, _loss_only(t, args.repeats, device)) for t in args.lengths]
    _print_table("1. loss only, forward + backward over 6 pairs", loss_rows, "l1cos (masked)")
    objective_rows = [(t, _objective_only(t, args.repeats, device)) for t in args.lengths]
    _print_table("2. DistillObjective forward + backward", objective_rows, "l1cos")
    if args.step_lengths:
        step_rows = [(t, _step(t, args.step_repeats, device)) for t in args.step_lengths]
        _print_table(
            "3. step estimate: teacher fwd + student fwd/bwd + objective ('none' = no objective)",
            step_rows,
            "l1cos",
        )
        for num_frames, result in step_rows:
            extra = result["contrastive"] / result["l1cos"] - 1
            share = (result["contrastive"] - result["none"]) / result["contrastive"]
            print(
                f"T={num_frames}: contrastive step is {100 * extra:+.1f}% vs l1cos; the objective "
                f"is {100 * share:.1f}% of the contrastive step"
            )


if __name__ == "__main__":
    main()
