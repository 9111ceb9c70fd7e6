#!/usr/bin/env bash
# One GPU session's checks (the device machine has torch, triton, cmake, ninja, pybind11 and scikit-build-core, no
# network): build with CUDA, run the GPU tests, `apt bench` on the device, optionally the Triton TVA tuning sweep.
# $OUT (default gpu_out/) gets at most a few files, since the device tool returns 8: the bench's result JSON (to
# commit under benchmarks/results/), gpu_tests.log (one line per test shard, then every failure) and details.tar.gz
# (build log, per-file test logs and junit XML, bench.md/json/plots, tuning log). Each step is time-boxed so a hang
# in one still returns the others.
#   OUT=... STEPS="build test bench targets tune" BENCH=quick|full TEST_TIMEOUT=360 BENCH_TIMEOUT=240 \
#     CALL_BUDGET=570 scripts/gpu_check.sh
# Every step's time limit is also cut to what is left of CALL_BUDGET seconds since the script started, so that the
# call returns (with its files) before the device tool's 600 s limit kills it.
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
T0=$(date +%s)
# seconds a step may still take so that the whole call ends by CALL_BUDGET (a device command stops at 600 s)
left() { local l=$(( ${CALL_BUDGET:-570} - ($(date +%s) - T0) )); echo $(( l < 30 ? 30 : l )); }
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }
step() { echo "== $* ($(date +%T))"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

step nvidia-smi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
head -12 "$OUT/nvidia-smi.txt"

if has build; then
  step build
  # one architecture for the device at hand keeps the build to a minute or two
  ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  if ! APT_CUDA=ON APT_CUDA_ARCHS="${APT_CUDA_ARCHS:-$ARCH}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "$(cap 900)" \
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
  # the whole process: the GPU tests run with the interpreter off, in TEST_SHARDS processes at the same time (their
  # tests dealt round-robin, so each process compiles its share of the Triton kernel variants: the first compile of
  # each is CPU-bound and the device machine has 16 cores; a kernel fault that poisons one CUDA context fails only
  # its shard), each within TEST_TIMEOUT. In files not named *_cuda.py only the tests marked cuda run (the CPU ones
  # ran in CI).
  : > "$OUT/ids.txt"
  for f in $(grep -l -E "pytest.mark.cuda|device=\"cuda\"" tests/test_*.py | grep -v -E "_triton\.py$"); do
    sel=""; [[ "$(basename "$f" .py)" == *_cuda ]] || sel="-m cuda"
    TRITON_INTERPRET=0 python -m pytest --collect-only -q -p no:cacheprovider $sel "$f" 2>/dev/null \
      | grep "::" >> "$OUT/ids.txt"
  done
  SHARDS=${TEST_SHARDS:-8}
  TT=$(cap "${TEST_TIMEOUT:-360}")
  echo "$(wc -l < "$OUT/ids.txt") GPU tests in $SHARDS shards, at most ${TT} s"
  : > "$OUT/gpu_tests.log"
  pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    awk -v s="$SHARDS" -v i="$i" 'NR % s == i' "$OUT/ids.txt" > "$OUT/shard$i.txt"
    [ -s "$OUT/shard$i.txt" ] || continue
    ( TRITON_INTERPRET=0 timeout "$TT" python -m pytest -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/shard$i.xml" $(cat "$OUT/shard$i.txt") > "$OUT/shard$i.log" 2>&1
      echo "shard $i: rc=$? $(tail -1 "$OUT/shard$i.log")" >> "$OUT/gpu_tests.log" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  cat "$OUT/gpu_tests.log"
  # the failures of every shard, for the reply's tail
  grep -h -E "^(FAILED|ERROR) " "$OUT"/shard*.log | sort | head -80 | tee -a "$OUT/gpu_tests.log"
fi

# the targets before the bench whatever the order in STEPS: they decide, and the bench may use up the budget
if has targets; then
  step "apt bench --targets"
  timeout "$(cap "${TARGETS_TIMEOUT:-240}")" python -m apt bench --device cuda --targets --out "$OUT/targets" --save \
    --results-dir "$OUT/results" > "$OUT/targets.log" 2>&1
  echo "targets rc=$?"
  grep -E "^\| .*\*\*(MET|NOT MET|NOT MEASURABLE)\*\*" "$OUT/targets/bench.md" 2>/dev/null | head -40 \
    || tail -30 "$OUT/targets.log"
fi

if has bench; then
  step "apt bench ($BENCH)"
  FLAG=""; [ "$BENCH" = quick ] && FLAG="--quick"
  timeout "$(cap "${BENCH_TIMEOUT:-240}")" python -m apt bench --device cuda $FLAG --out "$OUT/bench" --save \
    --results-dir "$OUT/results" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  tail -30 "$OUT/bench.log"
fi

if has tune && [ -f benchmarks/tune_tva_triton.py ]; then
  step "Triton TVA tuning sweep"
  timeout "$(cap "${TUNE_TIMEOUT:-150}")" python benchmarks/tune_tva_triton.py > "$OUT/tune_tva.log" 2>&1
  echo "tune rc=$?"
  tail -30 "$OUT/tune_tva.log"
fi
step done
