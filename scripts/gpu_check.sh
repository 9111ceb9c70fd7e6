#!/usr/bin/env bash
# One GPU session's checks in one call (the device machine has torch, triton, cmake, ninja, pybind11 and
# scikit-build-core, no network): build with CUDA, run the GPU tests, then `apt bench` on the device and save its
# JSON. Everything lands in $OUT (default gpu_out/): logs, junit XML, bench.md/json/plots, results/*.json to commit
# under benchmarks/results/. Each step is time-boxed so a hang in one still returns the others.
#   OUT=... BENCH=quick|full|none TEST_TIMEOUT=300 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
BENCH=${BENCH:-quick}
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }

step nvidia-smi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
head -15 "$OUT/nvidia-smi.txt"

step build
# one architecture for the device at hand keeps the build to a minute or two
ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
if ! APT_CUDA=ON APT_CUDA_ARCHS="${APT_CUDA_ARCHS:-$ARCH}" timeout 900 \
    pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
python -m apt info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

step GPU tests
# The CPU suite's Triton tests set TRITON_INTERPRET=1 at import, which would turn the compiled Triton path off for
# the whole process: run the files with GPU tests in their own process, interpreter off.
GPU_TESTS=$(grep -l -E "pytest.mark.cuda|device=\"cuda\"" tests/test_*.py | grep -v -E "_triton\.py$" | tr '\n' ' ')
echo "files: $GPU_TESTS"
TRITON_INTERPRET=0 timeout "${TEST_TIMEOUT:-420}" python -m pytest -q -rs -x --junitxml="$OUT/gpu_tests.xml" \
  $GPU_TESTS > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?"
tail -40 "$OUT/gpu_tests.log"

if [ "$BENCH" != "none" ]; then
  step "apt bench ($BENCH)"
  FLAG=""; [ "$BENCH" = quick ] && FLAG="--quick"
  timeout "${BENCH_TIMEOUT:-600}" python -m apt bench --device cuda $FLAG --out "$OUT/bench" --save \
    --results-dir "$OUT/results" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  tail -20 "$OUT/bench.log"
fi
step done
