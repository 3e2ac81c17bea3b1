#!/usr/bin/env bash
# The Python packages scripts/gpu_check.py needs beyond what a bare CUDA + PyTorch image holds (the GPU machine of
# docs/gpu_check.md: Python 3.12, torch, timm, lightning, onnx, onnxruntime, pandas, OpenCV, scikit-learn, pytest),
# downloaded here as wheels into .whl/ (about 9 MB), to be carried there and installed with --no-index.
# Versions: the ones this project is tested with (its venv). antlr4-python3-runtime 4.9.3 (omegaconf's parser) is
# published as a source archive only: it is built into a pure-Python wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 simsimd==6.5.16 stringzilla==5.3.2
"$PY" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
ls -la .whl
