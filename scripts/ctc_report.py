"""docs/results/ctc.md from the CTC runs of ``scripts/ctc_results.sh`` (issue 7, part 2).

    scripts/ctc_results.sh MODEL runs/ctc-NAME train.lr=LR          # one run, any machine
    .venv/bin/python scripts/ctc_report.py --collect runs/ctc-NAME --name NAME \\
        --label "Whisper base (teacher)" --params 19.82 --machine "..."
    .venv/bin/python scripts/ctc_report.py                           # the page, from the folder

``--collect`` copies a finished run's ``metrics.jsonl`` and ``model/ctc_scores.json`` into
``docs/results/ctc/`` and records its model, learning rate, label and machine in
``runs.json``; ``--stopped`` collects a run that was killed before its end (no test decode):
only its dev-PER curve is kept and it gets a table of its own. Without ``--collect`` the page
(tables, per-language PER, dev-PER curves) is rewritten from that folder alone. Per model,
the learning rate with the lowest dev PER is the one compared (probe-test is read only for
the table, never for a choice).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "ctc"
PAGE = ROOT / "docs" / "results" / "ctc.md"


def collect(
    run: Path, name: str, label: str, params: float, machine: str, stopped: bool = False
) -> None:
    scores = run / "model" / "ctc_scores.json"
    if not (stopped or scores.is_file()):
        raise SystemExit(f"{run}: no model/ctc_scores.json; is the run finished? (--stopped)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not stopped:
        shutil.copyfile(scores, RESULTS / f"{name}.scores.json")
    shutil.copyfile(run / "metrics.jsonl", RESULTS / f"{name}.metrics.jsonl")
    index = _index()
    index[name] = {
        "label": label,
        "model": cfg["model"]["spec"],
        "lr": cfg["train"]["lr"],
        "params_m": params,
        "machine": machine,
        "steps": cfg["train"]["max_steps"],
        "stopped": stopped,
    }
    (RESULTS / "runs.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def _index() -> dict[str, dict]:
    path = RESULTS / "runs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / f"{name}.metrics.jsonl").open()]


def _dev_curve(name: str) -> list[tuple[int, float]]:
    return [(r["step"], r["dev/per"]) for r in _metrics(name) if "dev/per" in r]


def _plot(index: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name, info in sorted(index.items()):
        steps, per = zip(*[(s, p) for s, p in _dev_curve(name) if s > 0], strict=True)
        style = "--" if info.get("stopped") else "-"  # stopped runs dashed
        ax.plot(steps, per, style, marker=".", label=f"{info['label']}, LR {info['lr']:g}")
    ax.set(xlabel="step", ylabel="dev PER (probe-dev)", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stopped_table(index: dict[str, dict]) -> list[str]:
    """Runs killed before their end: the best dev PER so far, no test decode."""
    stopped = sorted((n for n, info in index.items() if info.get("stopped")),
                     key=lambda n: (index[n]["label"], index[n]["lr"]))  # fmt: skip
    if not stopped:
        return []
    lines = [
        "",
        "Runs stopped before their last step (the device call's time limit; no test decode, so",
        "these rows compare dev PER only, by the same selection rule: the best dev PER so far):",
        "",
        "| model | params (M) | peak LR | last step run | best dev PER (step) | machine |",
        "|---|---|---|---|---|---|",
    ]
    for name in stopped:
        info = index[name]
        step, per = min(_dev_curve(name), key=lambda sp: sp[1])
        last = max(row["step"] for row in _metrics(name))
        lines.append(
            f"| {info['label']} | {info['params_m']:.2f} | {info['lr']:g} | "
            f"{last} / {info['steps']} | {per:.3f} ({step}) | {info['machine']} |"
        )
    return lines


def write_page(index: dict[str, dict]) -> str:
    finished = {n: info for n, info in index.items() if not info.get("stopped")}
    scores = {n: json.loads((RESULTS / f"{n}.scores.json").read_text()) for n in finished}
    by_model: dict[str, list[str]] = {}
    for name, info in finished.items():
        by_model.setdefault(info["label"], []).append(name)
    picked = {label: min(names, key=lambda n: scores[n]["best_dev"])
              for label, names in by_model.items()}  # fmt: skip
    lines = [
        "# CTC fine-tuning: teacher, distilled student and undistilled controls (issue 7, part 2)",
        "",
        "Generated by `scripts/ctc_report.py` from `docs/results/ctc/` (raw `ctc_scores.json` and",
        "`metrics.jsonl` of each run). Each run is `scripts/ctc_results.sh MODEL OUT train.lr=LR`:",
        "`colld finetune MODEL --task ctc --units phonemes`, end to end (whole encoder + linear",
        "head), on the embedded corpus' probe-train (0.305 h, 463 utterances), "
        "1500 steps of 120 s batches,",
        "peak LR as in the table with 200 warm-up steps then linear decay; every 100 steps the",
        "dev split (probe-dev) is decoded greedily and the best dev PER picks the exported step;",
        "PER is then reported on probe-test (176 utterances of 18 languages; voices and sentences",
        "that no distillation run heard). Per model, the learning rate with the lowest dev PER is",
        "the one compared (**bold**). The controls are the demo student's architecture as",
        "initialised, never distilled (`scripts/ctc_controls.py`): with the default weight",
        "selection from the teacher (the floor of `colld experiment` grids) and at random.",
        "",
        "| model | params (M) | peak LR | selected step | dev PER | test PER | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in sorted(finished.items(), key=lambda kv: (kv[1]["label"], kv[1]["lr"])):
        s = scores[name]
        bold = "**" if picked[info["label"]] == name else ""
        lines.append(
            f"| {info['label']} | {info['params_m']:.2f} | {info['lr']:g} | "
            f"{s['selected_step']} / {s['steps']} | {s['best_dev']:.3f} | "
            f"{bold}{s['test']['value']:.3f}{bold} | {info['machine']} |"
        )
    langs = sorted({lang for n in picked.values() for lang in scores[n]["test"]["per_language"]})
    labels = list(picked)
    lines += [
        "",
        "Test PER per language of the compared runs:",
        "",
        "| language | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for lang in langs:
        cells = [scores[picked[label]]["test"]["per_language"][lang]["value"] for label in labels]
        lines.append(f"| {lang} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    lines += _stopped_table(index)
    _plot(index, RESULTS / "dev_per.png")
    lines += ["", "![dev PER vs step](ctc/dev_per.png)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", type=Path, help="a finished run directory to add")
    parser.add_argument("--name", help="its name in docs/results/ctc (with --collect)")
    parser.add_argument("--label", help="the model's row label (with --collect)")
    parser.add_argument("--params", type=float, help="encoder parameters, millions")
    parser.add_argument("--machine", default="this CPU", help="where the run ran")
    parser.add_argument("--stopped", action="store_true",
                        help="the run was killed before its end: keep its dev curve only")  # fmt: skip
    parser.add_argument("--notes", type=Path, default=RESULTS / "notes.md",
                        help="hand-written reading appended to the page")  # fmt: skip
    args = parser.parse_args()
    if args.collect:
        if not (args.name and args.label and args.params):
            parser.error("--collect needs --name, --label and --params")
        collect(args.collect, args.name, args.label, args.params, args.machine, args.stopped)
    index = _index()
    if not index:
        raise SystemExit(f"{RESULTS / 'runs.json'}: no runs collected yet")
    page = write_page(index)
    if args.notes.is_file():
        page += "\n" + args.notes.read_text()
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
