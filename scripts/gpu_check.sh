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
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}  # the device image's python3 holds torch; `python`/`pip` may be another or none
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-build test bench}
BENCH=${BENCH:-quick}
mkdir -p "$OUT"
OUTF=$OUT
# the details live outside $OUTF (the device tool returns at most 8 files from it, also when it kills the call) and
# are packed into $OUTF after every step, so a call killed at its limit still returns what the finished steps wrote
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
# (tar exits 1 for a log that grew while it read it: that archive is still good)
pack() { tar czf "$OUTF/details.tar.gz.tmp" -C "$OUT" . 2>/dev/null; [ $? -le 1 ] && mv -f "$OUTF/details.tar.gz.tmp" "$OUTF/details.tar.gz"
         cp "$OUT"/results/*.json "$OUTF"/ 2>/dev/null; cp "$OUT/gpu_tests.log" "$OUTF"/ 2>/dev/null; true; }
# and every PACK_EVERY seconds while a step runs, so a kill loses at most that much of its logs
( while sleep "${PACK_EVERY:-20}"; do pack; done ) & PACKER=$!
trap 'kill "$PACKER" 2>/dev/null; wait "$PACKER" 2>/dev/null; pack; rm -rf "$OUT" "$OUTF/details.tar.gz.tmp"' EXIT
export PYTHONUNBUFFERED=1
T0=$(date +%s)
# seconds a step may still take so that the whole call ends by CALL_BUDGET (a device command stops at 600 s)
# (no floor: a step that would start with under MIN_STEP seconds left is skipped, so the call ends by CALL_BUDGET
# plus the few untimed seconds of packing)
left() { echo $(( ${CALL_BUDGET:-570} - ($(date +%s) - T0) )); }
# never 0 or less: `timeout 0` means no limit at all
cap() { local want=$1 l; l=$(left); (( l < 1 )) && l=1; echo $(( want < l ? want : l )); }
MIN_STEP=${MIN_STEP:-20}
# run a step only when MIN_STEP seconds are left; else say so (in the reply and in gpu_tests.log)
budget_ok() { local l; l=$(left); (( l >= MIN_STEP )) && return 0
              echo "SKIPPED $1: ${l} s left of CALL_BUDGET=${CALL_BUDGET:-570}" | tee -a "$OUT/gpu_tests.log"; return 1; }
step() { pack; echo "== $* ($(date +%T))"; }
# SIGKILL 10 s after the SIGTERM: a process stuck in a CUDA call can outlive the TERM
tmo() { timeout -k 10 "$@"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

step nvidia-smi
tmo 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
head -12 "$OUT/nvidia-smi.txt"

if has build; then
  step build
  # one architecture for the device at hand keeps the build to a minute or two
  ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  if ! APT_CUDA=ON APT_CUDA_ARCHS="${APT_CUDA_ARCHS:-$ARCH}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) tmo "$(cap 900)" \
      "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
fi
tmo 60 "$PY" -m apt info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

if has test && budget_ok test; then
  step GPU tests
  # The CPU suite's Triton tests set TRITON_INTERPRET=1 at import, which would turn the compiled Triton path off for
  # the whole process: the GPU tests run with the interpreter off, in TEST_SHARDS processes at the same time (their
  # tests dealt round-robin, so each process compiles its share of the Triton kernel variants: the first compile of
  # each is CPU-bound and the device machine has 16 cores; a kernel fault that poisons one CUDA context fails only
  # its shard), each within TEST_TIMEOUT. In files not named *_cuda.py only the tests marked cuda run (the CPU ones
  # ran in CI).
  : > "$OUT/ids.txt"
  : > "$OUT/gpu_tests.log"
  # one collection for the *_cuda.py files (all their tests) and one for the others (only those marked cuda); a
  # collection error is reported, not dropped with the file's tests
  mapfile -t files < <(grep -l -E "pytest.mark.cuda|device=\"cuda\"" tests/test_*.py | grep -v -E "_triton\.py$")
  cfiles=(); mfiles=()
  for f in "${files[@]}"; do if [[ "$(basename "$f" .py)" == *_cuda ]]; then cfiles+=("$f"); else mfiles+=("$f"); fi; done
  for grp in c m; do
    if [ $grp = c ]; then set -- "${cfiles[@]}"; sel=(); else set -- "${mfiles[@]}"; sel=(-m cuda); fi
    [ $# -gt 0 ] || continue
    TRITON_INTERPRET=0 tmo 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${sel[@]}" "$@" \
      > "$OUT/collect_$grp.log" 2>&1
    rc=$?
    grep "::" "$OUT/collect_$grp.log" >> "$OUT/ids.txt"
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then
      echo "COLLECTION rc=$rc in $*:" | tee -a "$OUT/gpu_tests.log"
      grep -E "^(ERROR|E ) " "$OUT/collect_$grp.log" | head -20 | tee -a "$OUT/gpu_tests.log"
    fi
  done
  SHARDS=${TEST_SHARDS:-8}
  TT=$(cap "${TEST_TIMEOUT:-360}")
  echo "$(wc -l < "$OUT/ids.txt") GPU tests in $SHARDS shards, at most ${TT} s"
  # per-test limit when pytest-timeout is there (the device image has it): a hang fails one test, with its traceback,
  # instead of the shard; -v puts each test's id in the log before it runs, so a killed shard names its last test
  PT=(); "$PY" -c "import pytest_timeout" 2>/dev/null && PT=(--timeout="${PER_TEST_TIMEOUT:-$(( TT / 2 ))}")
  pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    awk -v s="$SHARDS" -v i="$i" 'NR % s == i' "$OUT/ids.txt" > "$OUT/shard$i.txt"
    [ -s "$OUT/shard$i.txt" ] || continue
    mapfile -t ids < "$OUT/shard$i.txt"
    ( TRITON_INTERPRET=0 tmo "$TT" "$PY" -m pytest -v -rfEs -p no:cacheprovider "${PT[@]}" \
        --junitxml="$OUT/shard$i.xml" "${ids[@]}" > "$OUT/shard$i.log" 2>&1
      echo "shard $i: rc=$? $(tail -1 "$OUT/shard$i.log")" >> "$OUT/gpu_tests.log" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  cat "$OUT/gpu_tests.log"
  # the failures of every shard, for the reply's tail
  grep -h -E "^(FAILED|ERROR) " "$OUT"/shard*.log | sort | head -80 | tee -a "$OUT/gpu_tests.log"
fi

# the targets before the bench whatever the order in STEPS: they decide, and the bench may use up the budget
if has targets && budget_ok targets; then
  step "apt bench --targets"
  tmo "$(cap "${TARGETS_TIMEOUT:-240}")" "$PY" -m apt bench --device cuda --targets --out "$OUT/targets" --save \
    --results-dir "$OUT/results" > "$OUT/targets.log" 2>&1
  echo "targets rc=$?"
  grep -E "^\| .*\*\*(MET|NOT MET|NOT MEASURABLE)\*\*" "$OUT/targets/bench.md" 2>/dev/null | head -40 \
    || tail -30 "$OUT/targets.log"
fi

if has bench && budget_ok bench; then
  step "apt bench ($BENCH)"
  FLAG=""; [ "$BENCH" = quick ] && FLAG="--quick"
  tmo "$(cap "${BENCH_TIMEOUT:-240}")" "$PY" -m apt bench --device cuda $FLAG --out "$OUT/bench" --save \
    --results-dir "$OUT/results" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  tail -30 "$OUT/bench.log"
fi

if has tune && [ -f benchmarks/tune_tva_triton.py ] && budget_ok tune; then
  step "Triton TVA tuning sweep"
  tmo "$(cap "${TUNE_TIMEOUT:-150}")" "$PY" benchmarks/tune_tva_triton.py > "$OUT/tune_tva.log" 2>&1
  echo "tune rc=$?"
  tail -30 "$OUT/tune_tva.log"
fi
step done
