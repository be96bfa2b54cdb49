#!/usr/bin/env bash
# The teacher-target cache's speed-up on a lent GPU machine (bench/bench_cache.py), one call.
#
#   scripts/cache_device.sh prepare [HOURS]       # here: what to carry (default 0.5 h)
#   scripts/cache_device.sh run [BENCH ARGS...]   # on the device, two calls (~3-6 min each):
#     1. command "scripts/cache_device.sh run", carry [".whl", ".carry/cache-bench"]
#     2. at once, on the warm machine (.whl and the data stay there):
#        command "scripts/cache_device.sh run teacher.spec=.carry/whisper-base-fp16",
#        carry [".carry/whisper-base-fp16"]
#
# prepare: the first HOURS of the embedded corpus' train split (needs `colld data synth` done)
# copied to .carry/cache-bench/{train.jsonl,audio/} with paths relative to the manifest
# (0.5 h is ~34 MB of FLAC: with .whl/, ~10 MB, and the tracked tree it stays under a call's
# 64 MiB), and the embedded Whisper base encoder as an fp16 HF directory (41 MB, loaded back
# in fp32) in .carry/whisper-base-fp16 for the default recipe's measurement.
# run: whole epochs, online teacher vs cache, of a random-weight teacher with w2v-BERT 2.0's
# architecture (580M parameters, built on the device: nothing to carry), default student and
# recipe, on CUDA under train.precision=auto (bf16); its tables go to $OUT/cache_bench.log:
# epoch times, and each run's GPU memory (the data carry no dev split, so the cached run takes
# every target from the cache and keeps its teacher on the CPU).
# Extra BENCH ARGS replace the defaults (e.g. teacher.spec=.carry/whisper-base-fp16 to time
# another teacher). Expects cp312 wheels of colld's data dependencies in .whl/ (the machine has
# torch, transformers and accelerate, no network): see scripts/ctc_device.sh.
set -euo pipefail
mode=${1:-}
shift || true
case "$mode" in
prepare)
    hours=${1:-0.5}
    .venv/bin/python - "$hours" <<'EOF'
import dataclasses, shutil, sys
from pathlib import Path
from colld.config import load_config
from colld.data.manifest import write_manifest
from colld.train.data_setup import first_hours, resolve_sources

hours, out = float(sys.argv[1]), Path(".carry/cache-bench")
cfg = load_config(None, [])
(utterances, root), _ = resolve_sources(cfg.data, cfg.train.seed)
shutil.rmtree(out, ignore_errors=True)
(out / "audio").mkdir(parents=True)
kept = []
for u in first_hours(utterances, hours):
    src = u.resolved_path(root)
    shutil.copy2(src, out / "audio" / src.name)
    kept.append(dataclasses.replace(u, path=f"audio/{src.name}"))
write_manifest(kept, out / "train.jsonl")
print(f"{len(kept)} utterances, {sum(u.duration for u in kept) / 3600:.3f} h -> {out}")

import torch
from colld.teachers import load_teacher

teacher, out = load_teacher("whisper-base"), Path(".carry/whisper-base-fp16")
teacher.encoder.model.to(torch.float16).save_pretrained(out)
teacher.feature_extractor.save_pretrained(out)
EOF
    du -sh .carry/cache-bench .carry/whisper-base-fp16
    ;;
run)
    [[ -d /tmp/site/lhotse ]] || pip install -q --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site:src
    nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
    args=("$@")
    [[ ${#args[@]} -gt 0 ]] || args=(--random-teacher w2v-bert-2.0)
    python3 bench/bench_cache.py --epoch "${args[@]}" \
        train.device=cuda data.train=.carry/cache-bench/train.jsonl data.num_workers=14 \
        > "$OUT/cache_bench.log" 2>&1
    grep -v 'it/s\]\|step/s\]\|seg/s\]' "$OUT/cache_bench.log" | tail -20
    ;;
*)
    echo "usage: $0 prepare [HOURS] | run [BENCH ARGS...]" >&2
    exit 2
    ;;
esac
