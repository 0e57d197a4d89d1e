#!/usr/bin/env bash
# The full toy-world benchmark on a borrowed GPU, from the repo root:   bash toyworld/run_gpu_benchmark.sh
# Offline machines: put the wheels the GPU machine lacks in .whl/ (toyworld/gpu_env.sh).
# Writes $OUT/toyworld-benchmark/ (results.json, table.md, grid-*.png, methods.jsonl) and, after it, a
# cProfile of 200 toy-training steps ($OUT/train-profile.txt) to explain the slow GPU training step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
source toyworld/gpu_env.sh
time python3 -m toyworld.benchmark --out "$OUT/toyworld-benchmark" --device cuda --threads 8 "$@" 2>&1 | tee "$OUT/benchmark.log"
timeout "${PROFILE_TIMEOUT:-90}" python3 -m cProfile -s tottime -m toyworld.train --out /tmp/toy-profile --device cuda --threads 8 \
  --steps 200 --batch-size 128 --eval-samples 0 --log-every 100 --checkpoint-every 1000000 2>&1 | head -70 > "$OUT/train-profile.txt"
ls -la "$OUT" "$OUT/toyworld-benchmark"
