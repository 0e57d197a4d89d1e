#!/usr/bin/env bash
# A world-v2 base model's gates (toyworld/README.md): single objects, base-training pairs and validation pairs
# with failure kinds and the per-step premise AUCs; a guidance sweep on validation pairs; a detector audit sheet.
# Never the test pairs. Usage: bash toyworld/measure_base.sh MODEL_DIR OUT_DIR [THREADS]
# DEVICE=cuda measures on a GPU; PYTHON names the interpreter (default: the project's .venv).
set -euo pipefail
model=${1:?model directory}
out=${2:?output directory}
threads=${3:-2}
device=${DEVICE:-cpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
$py -m toyworld.evaluate --model "$model" --out "$out/gates.json" --groups single train_pairs validation \
    --samples 240 --threads "$threads" --device "$device"
for guidance in 1.5 2.0; do
  $py -m toyworld.evaluate --model "$model" --out "$out/validation-guidance-$guidance.json" --groups validation \
      --samples 96 --guidance "$guidance" --threads "$threads" --device "$device"
done
$py -m toyworld.audit --model "$model" --out "$out/audit.png" --images 64 --threads "$threads" --device "$device"
