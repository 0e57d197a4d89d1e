#!/usr/bin/env bash
# The GPU benchmark in one command, from the repo root:   bash bench/run_gpu.sh
# Writes gpu.json, gpu.md, batch.json, batch.md, compile.json and gpu.log to $OUT (default bench/out). Measured on an H100: ~95 s for the
# benchmark, ~2.5 min wall with the install (budget: ~6 minutes in all).
#
# Dependencies: `pip install -e ".[ml]"` installs the package and the library's deps (its ml extra). Where a
# CUDA torch is already installed, the package goes in with --no-deps (so pip does not swap that torch for the
# pinned CPU build) and only the missing non-torch deps are installed. Offline machines: set WHEELS to a folder
# of wheels (e.g. diffusers + importlib_metadata) and they are installed from there, no index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PIP="$PY -m pip"
export PYTHONUNBUFFERED=1

{
  echo "== $(date -u +%FT%TZ) $(uname -m) $($PY -V 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

  if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PIP install -q --no-index --no-deps --no-compile --target /tmp/sepen-site "$WHEELS"/*.whl \
      && export PYTHONPATH="/tmp/sepen-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if $PY -c "import torch" 2>/dev/null; then
    echo "torch already installed: $($PY -c 'import torch; print(torch.__version__, torch.cuda.is_available())')"
    $PIP install -q --no-deps --no-build-isolation --ignore-requires-python -e . \
      || echo "(pip install -e . failed: using the source tree through PYTHONPATH)"
    if ! $PY -c "import diffusers, transformers, safetensors, PIL, numpy" 2>/dev/null; then
      $PIP install -q --retries 1 --timeout 20 "diffusers>=0.42,<0.43" "transformers>=5.0,<6" "safetensors>=0.5" numpy pillow tqdm \
        || echo "(could not install the non-torch deps: offline? set WHEELS)"
    fi
  else
    $PIP install -e ".[ml]"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

  $PY bench/gpu_bench.py --json "$OUT/gpu.json" --md "$OUT/gpu.md"
  # Mixed-adapter batches (issue 12): 8 adapters in one batch vs one adapter vs one job at a time, 512 px, 20 steps.
  $PY bench/batch_bench.py --device cuda --models toy sd15 --sd15-size 512 --steps 20 --runs 5 \
    --json "$OUT/batch.json" --md "$OUT/batch.md"
  # torch.compile on the exact SepEn step (issue 12): compiled vs not, SD 1.5 architecture at 512 px, bf16.
  $PY bench/compile_bench.py --device cuda --dtype bf16 --json "$OUT/compile.json"
} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
