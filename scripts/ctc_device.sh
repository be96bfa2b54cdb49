#!/usr/bin/env bash
# One call on a lent GPU machine: several runs of scripts/ctc_results.sh, results (never
# weights) packed into $OUT/results.tgz (a call returns only a few files), per-run wall seconds
# in $OUT/times.txt.
#
#   [PARALLEL=N] scripts/ctc_device.sh MODEL_DIR@LR ...   e.g. .carry/floor16@5e-4 .carry/floor16@1e-3
#
# PARALLEL (default 1) runs N jobs at once, sharing 14 data workers. Measured: a pair with 7
# workers each ran ~1570 audio-s/s each (one alone ~2100-2400); three with 4 workers each
# needed ~10 min for 1400 steps, because each dev decode (every 100 steps) took ~35 s with so
# few workers: one at a time with 14 workers (78-114 s per run) is the faster default.
# Expects cp312 wheels of colld's data dependencies in .whl/ (the machine has torch,
# transformers and accelerate, no network) and the probe splits in .carry/ctc/{manifests,audio}
# (paths in the manifests are relative to them). Runs write to /tmp/ctc/NAME, NAME =
# basename(MODEL_DIR)-lrLR; the archive holds every run under /tmp/ctc (earlier calls' on a
# warm machine too) and is rewritten after each batch of jobs, so a call stopped by its time
# limit still returns the finished runs. Unpack and collect here with scripts/ctc_report.py
# --collect.
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 MODEL_DIR@LR ..." >&2; exit 2; }
parallel=${PARALLEL:-1}
workers=$((14 / parallel))
[[ -d /tmp/site/lhotse ]] || pip install -q --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:src PYTHON=python3 MANIFESTS=.carry/ctc/manifests
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
mkdir -p /tmp/ctc/logs

run_one() {  # MODEL_DIR@LR: one run, its wall seconds appended to times.txt
    local model=${1%@*} lr=${1#*@}
    local name start
    name=$(basename "$model")-lr$lr
    start=$(date +%s)
    scripts/ctc_results.sh "$model" "/tmp/ctc/$name" train.lr="$lr" data.num_workers="$workers" \
        > "/tmp/ctc/logs/$name.log" 2>&1
    echo "$name rc=$? $(($(date +%s) - start)) s (parallel $parallel)" >> "$OUT/times.txt"
}

jobs=("$@")
for ((i = 0; i < ${#jobs[@]}; i += parallel)); do
    for job in "${jobs[@]:i:parallel}"; do run_one "$job" & done
    wait
    (cd /tmp/ctc && tar czf "$OUT/results.tgz" logs */config.yaml */metrics.jsonl \
        $(ls -d */model/ctc_scores.json 2>/dev/null))
done
cat "$OUT/times.txt"
