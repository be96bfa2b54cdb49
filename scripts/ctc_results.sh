#!/usr/bin/env bash
# The CTC recipe of docs/results/ctc.md: phoneme CTC fine-tuning of an encoder, end to end, on
# the embedded corpus' probe-train; the exported step is picked by PER on probe-dev and PER is
# reported on probe-test (voices and sentences no distillation run has seen).
#
#   scripts/ctc_results.sh MODEL OUT [KEY=VALUE ...]     e.g. train.lr=1e-4 data.num_workers=14
#   .venv/bin/python scripts/ctc_report.py --collect OUT --name NAME    # then: the page
#
# MANIFESTS=DIR reads probe-{train,dev,test}.jsonl from DIR (default: the embedded corpus');
# PYTHON picks the interpreter (default .venv/bin/python). A rerun continues a killed run.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 MODEL OUT [KEY=VALUE ...]" >&2; exit 2; }
model=$1
out=$2
shift 2
m=${MANIFESTS:-data/corpus/manifests}
resume=()
[[ -d $out/checkpoints ]] && resume=(--resume)
exec "${PYTHON:-.venv/bin/python}" -m colld finetune "$model" --task ctc --units phonemes \
    --data "$m/probe-train.jsonl" --out "$out" "${resume[@]}" \
    data.dev="$m/probe-dev.jsonl" data.test="$m/probe-test.jsonl" \
    train.max_steps=1500 train.lr=5e-4 train.warmup_steps=200 data.batch_seconds=120 \
    train.eval_every=100 train.ckpt_every=500 "$@"
