"""The ``colld`` command line: subcommands only, each a thin call into the library."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from colld.config import QUICK_OVERRIDES, ConfigError, RunConfig, load_config
from colld.errors import RunStoppedError


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The run config of ``distill`` / ``cache-teacher``: --quick, then the flags, then the
    positional ``a.b=c`` overrides (last wins)."""
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.teacher:
        overrides.append(f"teacher.spec={args.teacher}")
    if args.data:
        overrides.append(f"data.train={args.data}")
    if getattr(args, "output", None):
        overrides.append(f"train.output_dir={args.output}")
    return load_config(args.config, overrides + list(args.overrides))


def _distill(args: argparse.Namespace) -> int:
    from colld.train.recipe import distill

    cfg = _run_config(args)
    student_dir = distill(cfg, resume=args.resume)
    print(f"student written to {student_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from colld.eval.evaluate import (
        ALL_TASKS,
        QUICK_EVAL,
        EvalSettings,
        evaluate_model,
        result_path,
    )
    from colld.eval.report import headline_table, load_comparison

    tasks = tuple(args.tasks.split(",")) if args.tasks else ALL_TASKS
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {', '.join(ALL_TASKS)}")
    settings = EvalSettings(
        corpus_dir=args.corpus,
        tasks=tasks,
        seeds=tuple(range(args.seeds)),
        mimicry=not args.no_mimicry,
        efficiency=not args.no_efficiency,
        device=args.device,
    )
    if args.quick:
        settings = dataclasses.replace(settings, **QUICK_EVAL)
    paths = []
    for spec in args.models:
        evaluate_model(spec, settings, args.out, reuse=not args.force)
        paths.append(result_path(args.out, spec))
        print(f"{spec}: {paths[-1]}")
    print(headline_table(load_comparison(paths)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from colld.eval.report import headline_table, load_comparison, write_report

    comparison = load_comparison(args.results, teacher=args.teacher, margin=args.margin)
    report = write_report(comparison, args.out)
    print(f"report written to {report}\n\n{headline_table(comparison)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from colld.demo import run_demo

    run_demo(
        quick=args.quick, config=args.config, overrides=tuple(args.overrides), output=args.output
    )
    return 0


def _int_list(option: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers") from None


def _experiment(args: argparse.Namespace) -> int:
    from colld.experiments.runner import Options, run_experiment

    cells = tuple(args.cells.split(",")) if args.cells else ()
    seeds = tuple(_int_list("--seeds", args.seeds)) if args.seeds else ()
    run_experiment(Options(args.name, args.quick, args.out, cells, args.runs, seeds))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from colld.data.synth import SynthConfig, synthesize_corpus

    info = synthesize_corpus(
        SynthConfig(out_dir=args.out, hours=args.hours, seed=args.seed, num_workers=args.workers)
    )
    print(f"corpus written to {args.out}: {info.summary()}")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from colld.data.readers import scan_directory

    out = scan_directory(args.dir, args.out or f"{args.dir}/manifest.jsonl", verify=args.verify)
    print(f"manifest written to {out}")
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    from colld.train.teacher_cache import build_cache

    cfg = _run_config(args)
    summary = build_cache(cfg, args.out)
    print("\n".join(summary.lines()))
    return 0


def _export(args: argparse.Namespace) -> int:
    if not args.onnx and not args.s3prl:
        raise ValueError("choose an export format: --onnx and/or --s3prl DIR")
    if args.s3prl:
        from colld.deploy.s3prl import write_s3prl_upstream

        print(write_s3prl_upstream(args.model, args.s3prl).summary())
    if not args.onnx:
        return 0
    from colld.deploy.check import REPORT_FILE, export_and_check
    from colld.eval.models import describe, file_slug

    out = args.out or f"runs/onnx/{file_slug(describe(args.model))}"
    report = export_and_check(
        args.model,
        out,
        int8=args.int8,
        opset=args.opset,
        audio=args.audio,
        corpus=args.corpus,
        tolerance=args.tolerance,
    )
    print(f"{', '.join(report.files.values())} and {REPORT_FILE} written to {out} "
          f"(opset {report.opset}; clips: {report.clips})\n\n{report.table()}")  # fmt: skip
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from colld.finetune.config import load_finetune_config

    overrides = [f"model.spec={args.model}"]
    if args.units:
        if args.task != "ctc":
            raise SystemExit("--units applies to --task ctc only")
        overrides.append(f"ctc.units={args.units}")
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.out:
        overrides.append(f"train.output_dir={args.out}")
    cfg = load_finetune_config(args.config, overrides + list(args.overrides), task=args.task)
    if args.task == "s2t":
        from colld.finetune.s2t import finetune_s2t, s2t_table

        s2t = finetune_s2t(cfg, resume=args.resume)
        print(f"speech-to-text model written to {s2t.model_dir}\n\n{s2t_table(s2t.scores)}")
        return 0
    from colld.finetune.recipe import finetune, score_table

    result = finetune(cfg, resume=args.resume)
    print(f"CTC model written to {result.model_dir}\n\n{score_table(result.scores)}")
    return 0


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder: end to end with a CTC head (--task ctc: characters or IPA "
        "phonemes, CER / PER), or under a frozen Whisper decoder through a linear adapter "
        "(--task s2t: transcription WER and X->En BLEU)",
    )
    p.add_argument("model", help="a student directory or a teacher spec")
    p.add_argument("--task", required=True, choices=["ctc", "s2t"],
                   help="the fine-tuning task")  # fmt: skip
    p.add_argument("--units", choices=["chars", "phonemes"], default=None,
                   help="CTC units (ctc.units; default chars)")  # fmt: skip
    p.add_argument("--config", help="YAML file of fine-tuning config overrides")
    p.add_argument("--data", help="transcribed training data (data.train; default: the "
                   "corpus' probe-train)")  # fmt: skip
    p.add_argument("--out", help="run directory (train.output_dir; default runs/finetune, "
                   "runs/finetune-s2t)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    # nargs="+" made optional by hand, not "*": before Python 3.12 argparse gives a "*"
    # positional an empty match right after MODEL, so `MODEL --task ctc a.b=c` would fail.
    overrides = p.add_argument("overrides", nargs="+", default=[], metavar="KEY=VALUE",
                               help="config overrides like train.lr=3e-5")  # fmt: skip
    overrides.required = False
    p.set_defaults(func=_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colld", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="distil a teacher encoder into a smaller student (CoLLD)")
    p.add_argument("--config", help="YAML file of config overrides (see configs/)")
    p.add_argument("--teacher", help="teacher spec (default: embedded whisper-base)")
    p.add_argument("--data", help="training data: manifest, CutSet, audio directory, HF dataset")
    p.add_argument("--output", help="run directory (train.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--quick", action="store_true", help="a tiny run that finishes in minutes")
    p.add_argument("overrides", nargs="*", help="config overrides like objective.tau=0.05")
    p.set_defaults(func=_distill)

    p = sub.add_parser("evaluate", help="probe, mimicry and efficiency evaluation of models")
    p.add_argument("models", nargs="+", help="fbank, a teacher spec, a student directory, or "
                   "an ONNX export (.onnx, fp32 or int8, or its folder)")  # fmt: skip
    p.add_argument("--corpus", default="data/corpus", help="corpus with probe-* manifests")
    p.add_argument("--out", default="runs/eval", help="folder for the result JSON files")
    p.add_argument("--tasks", default=None, help="comma-separated subset of lid,sid,pr,char")
    p.add_argument("--seeds", type=int, default=3, help="probe seeds (mean and spread)")
    p.add_argument("--no-mimicry", action="store_true", help="skip cosine / CKA vs the teacher")
    p.add_argument("--no-efficiency", action="store_true", help="skip speed and memory")
    p.add_argument("--device", default="cpu", help="device for feature extraction")
    p.add_argument("--force", action="store_true", help="recompute even if a result is current")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 probe epochs (smoke test)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("compare", help="gather evaluation results into a report with plots")
    p.add_argument("results", nargs="+", help="result JSON files from colld evaluate")
    p.add_argument("--out", default="runs/report", help="report folder")
    p.add_argument("--teacher", default=None, help="reference teacher (default: the students')")
    p.add_argument(
        "--margin",
        type=float,
        default=0.02,
        help="flag tasks where teacher and fbank differ by less (higher-is-better scale)",
    )
    p.set_defaults(func=_compare)

    p = sub.add_parser("demo", help="corpus -> distil -> evaluate -> report, in one command")
    p.add_argument("--quick", action="store_true", help="a few-minute variant (CI runs it)")
    p.add_argument("--config", help="YAML file of distillation config overrides")
    p.add_argument("--output", help="demo folder (default runs/demo, runs/demo-quick)")
    p.add_argument("overrides", nargs="*", help="distillation config overrides like a.b=c")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "experiment",
        help="run a grid of distillations (configs/experiments/NAME.yaml), evaluate every "
        "student and write docs/results/NAME.md; reruns skip finished cells",
    )
    p.add_argument("name", help="a grid of configs/experiments (ablation, ...) or a YAML path")
    p.add_argument("--quick", action="store_true", help="tiny runs, 1 seed, quick probes")
    p.add_argument("--out", default=None, help="results folder (default docs/results; quick: "
                   "runs/experiments-quick/results)")  # fmt: skip
    p.add_argument("--cells", default=None, help="comma-separated subset of the grid's cells")
    p.add_argument("--runs", default=None, help="runs folder (default runs/experiments; quick: "
                   "runs/experiments-quick)")  # fmt: skip
    p.add_argument("--seeds", default=None, help="comma-separated subset of the budget's "
                   "distillation seeds (e.g. 0: one run of every cell first)")  # fmt: skip
    p.set_defaults(func=_experiment)

    data = sub.add_parser("data", help="corpus tools").add_subparsers(
        dest="data_cmd", required=True
    )
    p = data.add_parser("synth", help="synthesise the embedded multilingual corpus (espeak-ng)")
    p.add_argument("--out", default="data/corpus", help="corpus directory")
    p.add_argument("--hours", type=float, default=1.0, help="hours of speech")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: cores)")
    p.set_defaults(func=_synth)
    p = data.add_parser("scan", help="write a JSONL manifest (with durations) for a directory")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="manifest path (default: DIR/manifest.jsonl)")
    p.add_argument("--verify", action="store_true", help="decode every file (slow, thorough)")
    p.set_defaults(func=_scan)

    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once over the training data and store its targets (fp16) for "
        "distill data.target_cache=DIR; reruns complete a partial cache",
    )
    p.add_argument("--config", help="YAML file of config overrides (the same as for distill)")
    p.add_argument("--out", help="cache directory (default: data.target_cache)")
    p.add_argument("--teacher", help="teacher spec (default: embedded whisper-base)")
    p.add_argument("--data", help="training data: manifest, CutSet, audio directory, HF dataset")
    p.add_argument("--quick", action="store_true", help="the data and sizes of distill --quick")
    p.add_argument("overrides", nargs="*", help="config overrides like data.max_duration=10")
    p.set_defaults(func=_cache_teacher)

    p = sub.add_parser(
        "export",
        help="export an encoder to ONNX (dynamic batch and time; every hidden state), "
        "optionally int8, checked against PyTorch; or as an s3prl upstream (SUPERB)",
    )
    p.add_argument("model", help="a student directory or a teacher spec")
    p.add_argument("--onnx", action="store_true", help="write model.onnx")
    p.add_argument("--s3prl", default=None, metavar="DIR", help="write expert.py and hubconf.py "
                   "of an s3prl upstream to DIR (<s3prl>/s3prl/upstream/<entry name>)")  # fmt: skip
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic)")
    p.add_argument("--out", default=None, help="output folder (default runs/onnx/<model>)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    p.add_argument("--audio", nargs="+", default=(), help="clips to check on (default: corpus)")
    p.add_argument("--corpus", default="data/corpus", help="corpus whose probe-test clips are "
                   "checked on when no --audio is given (else synthetic tones)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="fp32 bound: max abs diff <= tolerance * max(1, |torch| max)")  # fmt: skip
    p.set_defaults(func=_export)
    _add_finetune_parser(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # KEY=VALUE overrides may also follow the options (`colld finetune M --task ctc a.b=c`):
    # argparse leaves such a second run of positionals unparsed, so they are appended here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and getattr(args, "overrides", None) is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        if args.verbose:
            raise
        print(f"colld: error: {err}", file=sys.stderr)
        return 2
    except RunStoppedError as err:
        if args.verbose:
            raise
        print(f"colld: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
