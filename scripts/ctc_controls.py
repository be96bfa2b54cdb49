"""The controls of docs/results/ctc.md: the demo student's architecture without distillation.

    .venv/bin/python scripts/ctc_controls.py --out runs/ctc-controls
    .venv/bin/python scripts/ctc_controls.py --fp16-copy runs/sel-hsel/student --out DIR

The first form exports two untrained students of the demo's config (``colld demo``: 6 x 288,
seed 0) exactly as ``colld experiment``'s floor cells are exported: ``floor``
(``student.init=teacher``: weight selection from Whisper base, the default when the page's runs
were made; pinned, since the default is now ``auto``) and ``random``
(``student.init=random``), then writes an fp16 copy of each (``floor16``, ``random16``) beside
them. The second form writes the fp16 copy of any exported model directory. fp16 copies exist
because a device call carries at most 64 MiB; colld loads them back into fp32 (relative
rounding error <= 2^-11 per weight). The distillation heads are left out (CTC does not use
them).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def fp16_copy(src: Path, dst: Path) -> Path:
    """``src``'s files in ``dst``, ``model.safetensors`` rounded to fp16, heads left out."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "distill_heads.safetensors"):
            shutil.copy2(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def export_controls(out: Path) -> list[Path]:
    from colld.demo import demo_config
    from colld.experiments.runner import export_untrained

    copies = []
    for name, extra in (("floor", ("student.init=teacher",)), ("random", ("student.init=random",))):
        overrides = (f"train.output_dir={out / name}", *extra)
        student = export_untrained(demo_config(quick=False, overrides=overrides))
        copies.append(fp16_copy(student, out / f"{name}16"))
    return copies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fp16-copy", type=Path, help="an exported model directory to copy")
    args = parser.parse_args()
    copies = [fp16_copy(args.fp16_copy, args.out)] if args.fp16_copy else export_controls(args.out)
    print("\n".join(map(str, copies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
