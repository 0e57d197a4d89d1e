#!/usr/bin/env bash
# World-v2 co-occurrence candidates on a borrowed GPU (toyworld/README.md, "Choosing the co-occurrence"), from the
# repo root:   BUDGET=330 bash toyworld/run_gpu_worlds.sh toyworld/world-v2-candidates/*.json
# Trains one base model per candidate world side by side on the one GPU (same seed, batch, learning rate and time
# budget), then measures each one's gates with measure_base.sh (never the test pairs). Beside them, a cProfile of
# 60 training steps says where a GPU step's time goes. Offline machines: wheels the GPU machine lacks in .whl/.
# Writes to $OUT: NAME-unet.safetensors and NAME-text_encoder.safetensors per candidate (the EMA weights), and
# results.tar (each run's model directory without weights, logs, gates, audit sheets; the profile). Rebuild a
# model directory here with toyworld/unpack_gpu_worlds.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-worlds}
mkdir -p "$OUT" && OUT=$(realpath "$OUT")
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-330}
BATCH=${BATCH:-128}
MEASURE_TIMEOUT=${MEASURE_TIMEOUT:-150}
work=/tmp/gpu-worlds
mkdir -p "$work"
source toyworld/gpu_env.sh
common=(--device "$DEVICE" --threads 3 --batch-size "$BATCH" --lr 1.5e-3 --warmup 300 --pair-fraction 0.25 --eval-samples 0
        --checkpoint-every 1000000)
timeout 150 "$PY" -m cProfile -o "$work/train.prof" -m toyworld.train --out "$work/profile" --world "$1" \
  "${common[@]}" --steps 60 --log-every 20 > "$work/profile.log" 2>&1 &
for world in "$@"; do
  name=$(basename "$world" .json)
  "$PY" -m toyworld.train --out "$work/$name" --world "$world" "${common[@]}" --steps 60000 --log-every 250 \
    --time-budget "$BUDGET" > "$work/$name.log" 2>&1 &
done
wait
"$PY" -c "import pstats, sys; p = pstats.Stats(sys.argv[1]); p.sort_stats('tottime').print_stats(40); \
p.print_callers('builtins.compile'); p.print_callers('typing.py')" "$work/train.prof" > "$work/train-profile.txt" 2>&1
for world in "$@"; do
  name=$(basename "$world" .json)
  cp "$work/$name/model/unet/diffusion_pytorch_model.safetensors" "$OUT/$name-unet.safetensors"
  cp "$work/$name/model/text_encoder/model.safetensors" "$OUT/$name-text_encoder.safetensors"
  grep "\"step\"" "$work/$name.log" | tail -n 1
  PYTHON="$PY" DEVICE="$DEVICE" timeout "$MEASURE_TIMEOUT" bash toyworld/measure_base.sh "$work/$name/model" \
    "$work/$name/measure" 3 > "$work/$name-measure.log" 2>&1 &
done
wait
cat "$work"/*-measure.log
cd "$work" && tar cf "$OUT/results.tar" --exclude='*.safetensors' --exclude='*.pt' --exclude=tokenizer.json \
  --exclude=profile/model ./*
ls -la "$OUT"
