#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (GCC or Clang; CPU only, no CUDA):
#   scripts/sanitize_cpu.sh                        # the default test files below
#   scripts/sanitize_cpu.sh tests/test_scan_native.py -k decode
#   scripts/sanitize_cpu.sh --cuda-emu [pytest args]   # the CUDA kernels through tests/cuda_emu instead
# Builds apt_kernels._C with -fsanitize=address,undefined into a scratch copy of the checkout (the in-place build
# writes the module next to the sources, and this one must not shadow the real one), then runs pytest there with the
# sanitizer runtimes preloaded (python itself is not instrumented). Any report stops the run; reports go to stderr.
# The copy keeps timestamps, so a rerun rebuilds only what changed (APT_SANITIZE_DIR: where, default $TMPDIR).
# Needs the test dependencies (pip install ".[test]") in the active Python.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python}
CXX=${CXX:-c++}
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libubsan.so)"
# leaks: python and torch keep allocations until exit by design; each report names the kernel's file:line
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
sanitized_pytest() {  # $1: extra ASAN_OPTIONS
  local asan="detect_leaks=0:halt_on_error=1:$1"
  shift
  # --capture=sys: pytest's default fd capture would swallow a report written to fd 2 just before the abort
  LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="$asan" "$PY" -m pytest -q -x -p no:cacheprovider --capture=sys "$@"
}
if [ "${1:-}" = "--cuda-emu" ]; then
  # The emulator module (tests/cuda_emu/emu_build.py) is built apart from _C, cached by its flags: build it
  # sanitized and run its tests in this checkout. Its header poisons the gaps between shared-memory variables and
  # the unused tail of dynamic shared memory under ASan, so overruns inside a block's shared memory are caught too.
  shift
  [ "$#" -eq 0 ] && set -- tests/test_cuda_emu.py
  cd "$ROOT"
  export CXX  # emu_build.py compiles with $CXX too
  export APT_CUDA_EMU_CXXFLAGS="$SAN -g"
  sanitized_pytest "detect_stack_use_after_return=0" "$@"  # the emulator's fibers switch stacks
  exit
fi
WORK=${APT_SANITIZE_DIR:-${TMPDIR:-/tmp}/apt-sanitize}
mkdir -p "$WORK/src"
# tracked and untracked-but-not-ignored files: what a fresh clone plus the work in progress would build
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t "$WORK/src" 2>/dev/null) \
  || { echo "sanitize_cpu.sh: copying the checkout failed (needs git and GNU cp)" >&2; exit 2; }
cmake -S "$WORK/src" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAPT_CUDA=OFF \
  -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="$SAN" \
  -DCMAKE_MODULE_LINKER_FLAGS="$SAN" -DPython_EXECUTABLE="$(command -v "$PY")" >"$WORK/cmake.log"
cmake --build "$WORK/build" -j "${JOBS:-2}"
# an editable install of the real checkout would win over PYTHONPATH: drop its import hook in this process only
mkdir -p "$WORK/site"
cat >"$WORK/site/sitecustomize.py" <<'EOF'
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "editable" not in repr(f).lower() and "editable" not in getattr(f, "__module__", "")]
EOF
if [ "$#" -eq 0 ]; then
  set -- tests/test_tva_cpu.py tests/test_scan_native.py tests/test_moe_native.py tests/test_native_threads.py \
    tests/test_bad_layouts.py tests/test_tva_huge_window.py tests/test_running_mean.py tests/test_host_pool.py \
    tests/test_native_edge_values.py
fi
cd "$WORK/src"
export PYTHONPATH="$WORK/site:$WORK/src:$WORK/src/python"
# the sanitized module, not an installed one (a missing module would just skip the native tests)
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$PY" -c "
import sys, apt_kernels._native as n
m = n.native_module()
if m is None or not m.__file__.startswith(sys.argv[1]):
    sys.exit(f'sanitize_cpu.sh: expected the sanitized module under {sys.argv[1]}, got {m and m.__file__}: {n.native_status()}')
" "$WORK/src/apt_kernels/"
sanitized_pytest "abort_on_error=0" "$@"
