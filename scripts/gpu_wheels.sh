#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the lent GPU machine, fetched here (it reaches no registry) into .whl/ (gitignored),
# for its Python 3.12. Its image already holds torch, transformers, safetensors, huggingface-hub, numpy and pillow
# (../.library/device/KINDS.md); diffusers is the one missing, at the version the tests run (requirements/runtime.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^diffusers==//p' requirements/runtime.txt)
mkdir -p .whl
"${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==${version}"
ls -l .whl
