# Sourced by the toy-world GPU scripts (from the repo root): the Python path and the GPU machine's missing wheels.
# Offline machines: the wheels the GPU machine lacks (diffusers, importlib_metadata, zipp) go in .whl/.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/sepen-site .whl/*.whl
  export PYTHONPATH="/tmp/sepen-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
