#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU machine that has torch, transformers, peft, accelerate,
# safetensors, tokenizers and pandas but no network: fetched here into bench/.wheels (git-ignored, ~58 MB).
# There: pip install --no-index --target /tmp/py bench/.wheels/*.whl; PYTHONPATH=/tmp/py:src python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p bench/.wheels
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  -d bench/.wheels \
  "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin xxhash)" bitsandbytes==0.50.2 \
  "$(pin pyyaml)" "$(pin filelock)" "$(pin gguf)"
du -sh bench/.wheels
