#!/usr/bin/env bash
# One GPU session's checks (the device machine has torch, triton, cmake, ninja, pybind11 and scikit-build-core, no
# network): build with CUDA, run the GPU tests, `apt bench` on the device, optionally the Triton TVA tuning sweep.
# $OUT (default gpu_out/) gets at most a few files, since the device tool returns 8: the bench's result JSON (to
# commit under benchmarks/results/), gpu_tests.log (one line per test file, then every failure) and details.tar.gz
# (build log, per-file test logs and junit XML, bench.md/json/plots, tuning log). Each step is time-boxed so a hang
# in one still returns the others.
#   OUT=... STEPS="build test bench targets tune" BENCH=quick|full TEST_TIMEOUT=360 BENCH_TIMEOUT=240 \
#     scripts/gpu_check.sh
# One device command may run 10 minutes: split the steps over two calls when they do not fit (the build stays on a
# warm machine), e.g. STEPS="build test" then STEPS="targets bench tune" (the issues' targets first: they decide).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-build test bench}
BENCH=${BENCH:-quick}
mkdir -p "$OUT"
OUTF=$OUT
OUT="$OUTF/d"  # the details, packed into one file on exit
mkdir -p "$OUT"
pack() { tar czf "$OUTF/details.tar.gz" -C "$OUT" . 2>/dev/null; cp "$OUT"/results/*.json "$OUTF"/ 2>/dev/null
         cp "$OUT/gpu_tests.log" "$OUTF"/ 2>/dev/null; rm -rf "$OUT"; }
trap pack EXIT
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date +%T))"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

step nvidia-smi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
head -12 "$OUT/nvidia-smi.txt"

if has build; then
  step build
  # one architecture for the device at hand keeps the build to a minute or two
  ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  if ! APT_CUDA=ON APT_CUDA_ARCHS="${APT_CUDA_ARCHS:-$ARCH}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 900 \
      pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
fi
python -m apt info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

if has test; then
  step GPU tests
  # The CPU suite's Triton tests set TRITON_INTERPRET=1 at import, which would turn the compiled Triton path off for
  # the whole process: the files with GPU tests run with the interpreter off, each in its own process, so a kernel
  # fault that poisons one CUDA context cannot fail the other files. They run at the same time (the GPU has room for
  # all, and Triton's first compiles of each kernel variant are CPU-bound: 16 cores), each within TEST_TIMEOUT.
  FILES=$(grep -l -E "pytest.mark.cuda|device=\"cuda\"" tests/test_*.py | grep -v -E "_triton\.py$")
  : > "$OUT/gpu_tests.log"
  pids=()
  for f in $FILES; do
    name=$(basename "$f" .py)
    sel=""; [[ "$name" == *_cuda ]] || sel="-m cuda"  # elsewhere only the GPU tests (the CPU ones ran in CI)
    ( TRITON_INTERPRET=0 timeout "${TEST_TIMEOUT:-360}" python -m pytest -q -rfEs --maxfail=25 -p no:cacheprovider \
        $sel --junitxml="$OUT/$name.xml" "$f" > "$OUT/$name.log" 2>&1
      echo "$f: rc=$? $(tail -1 "$OUT/$name.log")" >> "$OUT/gpu_tests.log" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  cat "$OUT/gpu_tests.log"
  # the failures of every file, for the reply's tail
  grep -h -E "^(FAILED|ERROR) " "$OUT"/test_*.log | head -60 | tee -a "$OUT/gpu_tests.log"
fi

if has bench; then
  step "apt bench ($BENCH)"
  FLAG=""; [ "$BENCH" = quick ] && FLAG="--quick"
  timeout "${BENCH_TIMEOUT:-240}" python -m apt bench --device cuda $FLAG --out "$OUT/bench" --save \
    --results-dir "$OUT/results" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  tail -30 "$OUT/bench.log"
fi

if has targets; then
  step "apt bench --targets"
  timeout "${TARGETS_TIMEOUT:-240}" python -m apt bench --device cuda --targets --out "$OUT/targets" --save \
    --results-dir "$OUT/results" > "$OUT/targets.log" 2>&1
  echo "targets rc=$?"
  grep -E "^\| .*\*\*(MET|NOT MET|NOT MEASURABLE)\*\*" "$OUT/targets/bench.md" 2>/dev/null | head -40 \
    || tail -30 "$OUT/targets.log"
fi

if has tune && [ -f benchmarks/tune_tva_triton.py ]; then
  step "Triton TVA tuning sweep"
  timeout "${TUNE_TIMEOUT:-150}" python benchmarks/tune_tva_triton.py > "$OUT/tune_tva.log" 2>&1
  echo "tune rc=$?"
  tail -30 "$OUT/tune_tva.log"
fi
step done
