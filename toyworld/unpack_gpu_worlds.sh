#!/usr/bin/env bash
# Rebuild the model directories of a run_gpu_worlds.sh run from the files it brought back, from the repo root:
#   bash toyworld/unpack_gpu_worlds.sh FILES_DIR runs/gpu-worlds
# -> runs/gpu-worlds/NAME/model (loadable by load_base_model and --init-from), logs, measure/ per candidate.
set -euo pipefail
files=${1:?the folder holding results.tar and the weights}
dest=${2:?where to unpack}
mkdir -p "$dest"
tar xf "$files/results.tar" -C "$dest"
for unet in "$files"/*-unet.safetensors; do
  name=$(basename "$unet" -unet.safetensors)
  model="$dest/$name/model"
  cp "$unet" "$model/unet/diffusion_pytorch_model.safetensors"
  cp "$files/$name-text_encoder.safetensors" "$model/text_encoder/model.safetensors"
  cp sepen_core/bundled/sepen-toy/tokenizer/tokenizer.json "$model/tokenizer/tokenizer.json"  # the same CLIP BPE
  echo "$model"
done
