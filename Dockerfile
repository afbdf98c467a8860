# syntax=docker/dockerfile:1
# Escort Serve images. Two targets:
#   gpu (the default, last stage): CUDA runtime base, torch with CUDA, CuPy for the Escort kernel
#       docker build -t escort-serve:gpu .
#   cpu: python:3.11-slim with the CPU build of torch; serves with the sparse reference
#       docker build --target cpu -t escort-serve:cpu .
# Model weights are fetched and pruned at build time (`escort fetch-models`), so a container
# starts without the network and its first request does not pay for them. The list of models
# baked in is the ESCORT_MODELS build argument.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# Kept equal to the pins in pyproject.toml (tests/ops checks it); installed in their own layer
# so that changing the service's code does not download torch again.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG ESCORT_MODELS=efficientnet-lite0,resnet50-skimcaffe,resnet50-uniform90,vgg16-deepcompression,alexnet-deepcompression

# ---------------------------------------------------------------- CPU: build
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG ESCORT_MODELS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# The CPU wheels of torch are a tenth the size of the CUDA ones.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
# Versions come from pyproject.toml's pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    && ESCORT_MODELS="${ESCORT_MODELS}" ESCORT_CACHE_DIR=/app/cache escort fetch-models

# ---------------------------------------------------------------- CPU: runtime
FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ESCORT_HOST=0.0.0.0 \
    ESCORT_PORT=8000 \
    ESCORT_DEVICE=cpu \
    ESCORT_MODELS_DIR=/app/models \
    ESCORT_CACHE_DIR=/app/cache
RUN groupadd --system --gid 10001 escort \
    && useradd --system --uid 10001 --gid escort --home-dir /app --shell /usr/sbin/nologin escort
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build --chown=escort:escort /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('ESCORT_PORT', '8000'), timeout=4)"]
# exec form: the server is PID 1 and gets SIGTERM directly, which starts its drain.
CMD ["escort", "serve"]

# ---------------------------------------------------------------- GPU: build
FROM ${CUDA_IMAGE} AS gpu-build
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG ESCORT_MODELS
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
# No GPU is needed here: fetching and pruning weights runs on the CPU; the per-device kernel
# tuning happens when the service starts on its GPU. Versions come from pyproject.toml's pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]" \
    && ESCORT_MODELS="${ESCORT_MODELS}" ESCORT_CACHE_DIR=/app/cache escort fetch-models

# ---------------------------------------------------------------- GPU: runtime (default)
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ESCORT_HOST=0.0.0.0 \
    ESCORT_PORT=8000 \
    ESCORT_DEVICE=cuda \
    ESCORT_MODELS_DIR=/app/models \
    ESCORT_CACHE_DIR=/app/cache
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 escort \
    && useradd --system --uid 10001 --gid escort --home-dir /app --shell /usr/sbin/nologin escort
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build --chown=escort:escort /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('ESCORT_PORT', '8000'), timeout=4)"]
CMD ["escort", "serve"]
