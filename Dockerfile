# Two images from one file:
#   docker build --target api    -t sepen-api .     gateway and sepen-admin, no torch
#   docker build --target worker -t sepen-worker .  Celery worker with torch (CUDA wheels from PyPI)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 1000 sepen && mkdir -p /var/lib/sepen && chown sepen /var/lib/sepen
COPY pyproject.toml README.md LICENSE alembic.ini ./
COPY migrations ./migrations
COPY sepen_core ./sepen_core
COPY sepen_store ./sepen_store
COPY service ./service
COPY worker ./worker

FROM base AS api
# The service extra's packages plus the project without its torch dependencies.
RUN pip install "fastapi>=0.115" "uvicorn[standard]>=0.30" "sqlalchemy>=2.0.30,<2.2" "alembic>=1.13" \
        "psycopg[binary]>=3.2" "celery[redis]>=5.4,<6" "httpx>=0.27" \
    && pip install --no-deps . \
    && python -c "import service.app, sys; assert 'torch' not in sys.modules"
USER sepen
EXPOSE 8000
CMD ["uvicorn", "--factory", "service.app:app_from_env", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM base AS worker
RUN pip install ".[service]"
USER sepen
CMD ["sepen-worker"]
