#!/usr/bin/env bash
# Train the toy-world base model on a borrowed GPU within a fixed time, from the repo root:
#   BUDGET=110 bash toyworld/run_gpu_train.sh
# Offline machines: put the wheels the GPU machine lacks in .whl/ (toyworld/gpu_env.sh).
# Writes to $OUT (default runs/gpu): unet.safetensors, text_encoder.safetensors, configs.tar (the rest of
# the model directory) and log.jsonl; assemble them here with toyworld/assemble_model.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
BUDGET="${BUDGET:-110}"
mkdir -p "$OUT"
source toyworld/gpu_env.sh
run=/tmp/toyworld-gpu
python3 -m toyworld.train --out "$run" --device cuda --threads 8 --steps 60000 --batch-size 128 --lr 1.5e-3 --warmup 300 \
  --time-budget "$BUDGET" --eval-samples 0 --log-every 1000 --checkpoint-every 1000000 2>&1 | tee "$OUT/train.log"
cp "$run/model/unet/diffusion_pytorch_model.safetensors" "$OUT/unet.safetensors"
cp "$run/model/text_encoder/model.safetensors" "$OUT/text_encoder.safetensors"
tar cf "$OUT/configs.tar" -C "$run/model" --exclude='*.safetensors' .
cp "$run/log.jsonl" "$OUT/log.jsonl"
ls -la "$OUT"
