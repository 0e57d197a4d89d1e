# Two images from one file, each the package's wheel installed (not editable) with its entry point's extra:
#   docker build --target api    -t sepen-api .     gateway and sepen-admin: sepen[api], no torch
#   docker build --target worker -t sepen-worker .  Celery worker: sepen[worker], the CPU build of torch
#   docker build --target worker --build-arg TORCH_VARIANT=cuda -t sepen-worker .   ... PyPI's CUDA build
# The images hold no source tree: what runs is what the wheel ships (tests/test_packaging.py checks the same).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY sepen_core ./sepen_core
COPY sepen_store ./sepen_store
COPY service ./service
COPY worker ./worker
COPY toyworld ./toyworld
RUN pip wheel --no-deps -w /dist .

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 sepen && mkdir -p /var/lib/sepen && chown sepen /var/lib/sepen
# The working directory is the service's own (the embedded mode's var/ goes here), not a copy of the code.
WORKDIR /var/lib/sepen
COPY --from=build /dist /dist

FROM base AS api
RUN pip install "$(echo /dist/sepen-*.whl)[api]" \
    && python -c "import service.app, sys; assert 'torch' not in sys.modules" \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'the api image carries torch'"
USER sepen
EXPOSE 8000
# Gateway processes: --workers (compose passes SEPEN_GATEWAY_WORKERS).
CMD ["uvicorn", "--factory", "service.app:app_from_env", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--workers", "1"]

FROM base AS worker
# cpu: torch's CPU wheel from PyTorch's index, taken first so that the worker extra finds it installed;
# cuda: the worker extra resolves torch itself, and PyPI's Linux wheel bundles CUDA.
ARG TORCH_VARIANT=cpu
RUN case "$TORCH_VARIANT" in \
        cpu) pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" ;; \
        cuda) ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install "$(echo /dist/sepen-*.whl)[worker]"
USER sepen
CMD ["sepen-worker"]
