#!/usr/bin/env bash
# The full toy-world benchmark on a borrowed GPU, from the repo root:   bash toyworld/run_gpu_benchmark.sh
# Offline machines: put the wheels the GPU machine lacks in .whl/ (toyworld/gpu_env.sh).
# Writes $OUT/toyworld-benchmark/ (results.json, table.md, grid-*.png, methods.jsonl; 9.6 min on an H100)
# and, after it, a cProfile of 150 toy-training steps ($OUT/train.prof, $OUT/train-profile.txt: the top
# functions and who calls builtins.compile) to explain the slow GPU training step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
source toyworld/gpu_env.sh
time python3 -m toyworld.benchmark --out "$OUT/toyworld-benchmark" --device cuda --threads 8 "$@" 2>&1 | tee "$OUT/benchmark.log"
timeout "${PROFILE_TIMEOUT:-90}" python3 -m cProfile -o "$OUT/train.prof" -m toyworld.train --out /tmp/toy-profile --device cuda \
  --threads 8 --steps 150 --batch-size 128 --eval-samples 0 --log-every 50 --checkpoint-every 1000000
python3 -c "import pstats, sys; p = pstats.Stats(sys.argv[1]); p.sort_stats('tottime').print_stats(40); p.print_callers('builtins.compile')" \
  "$OUT/train.prof" > "$OUT/train-profile.txt" 2>&1
ls -la "$OUT" "$OUT/toyworld-benchmark"
