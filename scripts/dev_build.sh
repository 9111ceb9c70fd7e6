#!/usr/bin/env bash
# In-place development build of apt_kernels._C (no pip install needed):
#   scripts/dev_build.sh            # CPU + CUDA (when nvcc is found)
#   APT_CUDA=OFF scripts/dev_build.sh
# then use PYTHONPATH="$PWD:$PWD/python".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD_DIR=${BUILD_DIR:-build/dev}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DAPT_CUDA="${APT_CUDA:-AUTO}" -DAPT_CUDA_ARCHS="${APT_CUDA_ARCHS:-80;90}"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
