"""The ``colld`` command line: subcommands only, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from colld.config import QUICK_OVERRIDES, ConfigError, load_config


def _distill(args: argparse.Namespace) -> int:
    from colld.train.recipe import distill

    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.teacher:
        overrides.append(f"teacher.spec={args.teacher}")
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    student_dir = distill(cfg, resume=args.resume)
    print(f"student written to {student_dir}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
