#!/usr/bin/env bash
# A world-v2 base model's gates (toyworld/README.md): single objects, base-training pairs and validation pairs
# with failure kinds and the per-step premise AUCs; a guidance sweep on validation pairs; a detector audit sheet.
# Never the test pairs. Usage: bash toyworld/measure_base.sh MODEL_DIR OUT_DIR [THREADS]
set -euo pipefail
model=${1:?model directory}
out=${2:?output directory}
threads=${3:-2}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m toyworld.evaluate --model "$model" --out "$out/gates.json" --groups single train_pairs validation \
    --samples 240 --threads "$threads"
for guidance in 1.5 2.0; do
  $py -m toyworld.evaluate --model "$model" --out "$out/validation-guidance-$guidance.json" --groups validation \
      --samples 96 --guidance "$guidance" --threads "$threads"
done
$py -m toyworld.audit --model "$model" --out "$out/audit.png" --images 64 --threads "$threads"
