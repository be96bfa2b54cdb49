#!/usr/bin/env bash
# One call on a lent GPU machine: several runs of scripts/ctc_results.sh, one after another (a
# pair sharing the 16 cores ran ~30% slower each), results (never weights) packed into
# $OUT/results.tgz (a call returns only a few files), per-run wall seconds in $OUT/times.txt.
#
#   scripts/ctc_device.sh MODEL_DIR@LR ...      e.g. .carry/floor16@5e-4 .carry/floor16@1e-3
#
# Expects cp312 wheels of colld's data dependencies in .whl/ (the machine has torch,
# transformers and accelerate, no network) and the probe splits in .carry/ctc/{manifests,audio}
# (paths in the manifests are relative to them). Runs write to /tmp/ctc/NAME, NAME =
# basename(MODEL_DIR)-lrLR; the archive holds every run under /tmp/ctc (earlier calls' on a
# warm machine too). Unpack and collect here with scripts/ctc_report.py --collect.
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 MODEL_DIR@LR ..." >&2; exit 2; }
[[ -d /tmp/site/lhotse ]] || pip install -q --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:src PYTHON=python3 MANIFESTS=.carry/ctc/manifests
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
mkdir -p /tmp/ctc/logs
for job in "$@"; do
    model=${job%@*}
    lr=${job#*@}
    name=$(basename "$model")-lr$lr
    start=$(date +%s)
    scripts/ctc_results.sh "$model" "/tmp/ctc/$name" train.lr="$lr" data.num_workers=14 \
        > "/tmp/ctc/logs/$name.log" 2>&1
    echo "$name rc=$? $(($(date +%s) - start)) s" >> "$OUT/times.txt"
done
(cd /tmp/ctc && tar czf "$OUT/results.tgz" logs */config.yaml */metrics.jsonl */model/ctc_scores.json)
cat "$OUT/times.txt"
