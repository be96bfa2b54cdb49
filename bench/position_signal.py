"""Print how much absolute position dominates each hidden state of some models (probe-test).

    python bench/position_signal.py fbank whisper-base runs/demo/run/student whisper-tiny.en \
        --corpus data/corpus --cache runs/demo/features

Per model and hidden state: the share of frames whose most similar frame in another utterance
is the frame at the same index (``colld.eval.mimicry.position_retrieval``; chance ~ 1 / T).
Features come from the evaluation cache when present (``colld demo`` writes one).
"""

from __future__ import annotations

import argparse
import logging

from colld.eval.evaluate import load_probe_data
from colld.eval.features import extract_features
from colld.eval.mimicry import position_retrieval
from colld.eval.models import describe, load_model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--cache", default="runs/demo/features")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = load_probe_data(args.corpus)
    rows = []
    for spec in args.models:
        features = extract_features(
            load_model_spec(spec),
            data.splits["probe-test"],
            data.root,
            cache_dir=args.cache,
            show_progress=False,
            model_name=spec,
        )
        rows.append((describe(spec), position_retrieval(features)))
    width = max(len(values) for _, values in rows)
    print("| model | " + " | ".join(f"h{j}" for j in range(width)) + " |")
    print("|---|" + "---|" * width)
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
