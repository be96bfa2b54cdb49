"""Real-time factor of teacher and student in PyTorch fp32, onnxruntime fp32 and onnxruntime
int8 (CPU, batch 1, one clip), all measured in one run.

Each model is exported with ``colld.deploy.onnx`` (fp32 and dynamic int8, as ``colld export
--onnx --int8`` does) into a temporary folder; then every (model, backend) pair encodes the same
clip once per round, pairs taking turns round by round so that load from other processes hits
all of them alike. RTF = median encoder seconds / clip seconds (< 1 is faster than real time);
the front end (numpy log-mel / waveform normalisation, the same for every backend) is timed
once and printed beside the table, not included. The last column is the speed-up over the
teacher in PyTorch fp32; the int8 rows' max abs difference to PyTorch on the last hidden state
says what the speed costs (probe scores: ``colld evaluate``).

    python bench/bench_onnx.py --student runs/NAME/student        # whisper-base teacher
    python bench/bench_onnx.py --student A/student --student B/student   # several, one run
    python bench/bench_onnx.py --tiny                             # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from colld.audio import FrontEnd
from colld.deploy.onnx import OnnxEncoder, export_onnx, quantize_int8
from colld.eval.efficiency import synthetic_clip
from colld.eval.models import describe, load_model_spec
from colld.students.build import StudentSpec, build_student
from colld.students.export import export_student
from colld.teachers import load_teacher
from colld.testing import tiny_teacher_dir

BACKENDS = ("pytorch fp32", "onnxruntime fp32", "onnxruntime int8")


@dataclass
class Case:
    model: str
    backend: str
    run: Callable[[], torch.Tensor]
    """Encodes the clip; returns the last hidden state. Shape: (1, T, D)."""
    times: list[float]


def model_cases(
    spec: str, label: str, clip_seconds: float, work: Path, threads: int
) -> tuple[list, float]:
    """The three backends of one model (rows named ``label``), and its front end's seconds."""
    loaded = load_model_spec(spec)
    if loaded is None:
        raise SystemExit(f"{spec}: no encoder to benchmark")
    encoder = loaded.encoder.float().eval()
    front_end = FrontEnd(loaded.feature_extractor)
    clip = synthetic_clip(clip_seconds)
    start = time.perf_counter()
    features = front_end(clip)[None]  # (1, F, C) or (1, S)
    front_end_s = time.perf_counter() - start
    lengths = torch.tensor([features.shape[1]])
    folder = work / label.replace(":", "_").replace("/", "_")
    fp32 = export_onnx(encoder, front_end, folder / "model.onnx", source=spec)
    int8 = quantize_int8(fp32, folder / "model.int8.onnx")
    last = encoder.num_layers

    def torch_run() -> torch.Tensor:
        with torch.inference_mode():
            return encoder(features, lengths, layers=[last]).hidden_states[last]

    def onnx_run(runner: OnnxEncoder) -> Callable[[], torch.Tensor]:
        return lambda: runner(features, lengths, layers=[last]).hidden_states[last]

    runs = [
        torch_run,
        onnx_run(OnnxEncoder(fp32, threads=threads)),
        onnx_run(OnnxEncoder(int8, threads=threads)),
    ]
    cases = [Case(label, backend, run, []) for backend, run in zip(BACKENDS, runs, strict=True)]
    return cases, front_end_s


def unique_label(spec: str, taken: dict[str, float]) -> str:
    """``describe(spec)``, or the spec itself where that name is taken (two students both
    exported as ``.../seed-0/student`` describe alike)."""
    label = describe(spec)
    return spec if label in taken else label


def tiny_models(work: Path) -> tuple[str, str]:
    """A tiny random Whisper teacher dir and a student weight-selected from it, never trained."""
    teacher_dir = tiny_teacher_dir("whisper", work / "tiny-teacher")
    teacher = load_teacher(str(teacher_dir))
    student = build_student(
        teacher.encoder, StudentSpec(num_layers=2, hidden_dim=16, init="teacher"), seed=0
    )
    student_dir = export_student(
        student.eval(), teacher.feature_extractor, work / "tiny-student" / "student", metadata={}
    )
    return str(teacher_dir), str(student_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="whisper-base", help="teacher spec")
    parser.add_argument("--student", action="append", default=[],
                        help="exported student directory (repeat for several)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny random teacher and student")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--rounds", type=int, default=10, help="timed runs per pair")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per pair")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    specs = tiny_models(work) if args.tiny else (args.teacher, *args.student)
    cases, front_end_s = [], {}
    for spec in filter(None, specs):
        label = unique_label(spec, taken=front_end_s)
        model_case, front_end_s[label] = model_cases(spec, label, args.seconds, work, threads)
        cases += model_case
    last_states = {(c.model, c.backend): c.run() for c in cases}
    for _ in range(args.warmup):
        for case in cases:
            case.run()
    for _ in range(args.rounds):
        for case in cases:
            start = time.perf_counter()
            case.run()
            case.times.append(time.perf_counter() - start)

    baseline = statistics.median(cases[0].times)
    print(
        f"\nbatch 1, one {args.seconds:g} s clip, {threads} thread(s), {args.rounds} rounds "
        f"(median), {platform.processor() or platform.machine()}, torch {torch.__version__}\n"
    )
    print("| model | backend | RTF | ms / clip | speed-up vs teacher pytorch fp32 | "
          "last state max abs diff vs pytorch |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for case in cases:
        seconds = statistics.median(case.times)
        reference = last_states[(case.model, BACKENDS[0])]
        diff = float((last_states[(case.model, case.backend)] - reference).abs().max())
        print(
            f"| {case.model} | {case.backend} | {seconds / args.seconds:.4f} | "
            f"{seconds * 1e3:.1f} | {baseline / seconds:.2f}x | {diff:.3g} |"
        )
    for model, seconds in front_end_s.items():
        print(f"\nfront end of {model}: {seconds * 1e3:.1f} ms per clip (not in the RTF)")


if __name__ == "__main__":
    main()
