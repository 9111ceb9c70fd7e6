"""Builds ``_C_cuda_emu``: apt_kernels' CUDA kernels and their bindings compiled as host C++ against the emulator in
``include/apt_cuda_emu.h``, so the kernels run (slowly, on small shapes) on a machine without a GPU.

The ``.cu`` and ``.cuh`` files (and ``selftest.cu``: kernels with the bugs the emulator must report) are copied under
``gen/`` with two rewrites, line numbers kept (errors point at the real file):
- ``kernel<<<grid, block, smem, stream>>>(args)`` -> ``::apt_emu::launch(::apt_emu::LaunchConfig(grid, block, smem,
  stream), kernel, args)``;
- ``__shared__ T a[X];`` -> ``static char site; auto& a = ::apt_emu::shared_var<T[X]>(&site);``: per-block storage,
  poisoned at the start of each block;
- ``__launch_bounds__(X)`` kernels start with ``::apt_emu::check_launch_bounds(X);``.
The module is cached under ``build/cuda_emu/<hash of the sources and flags>/`` (or
``$APT_CUDA_EMU_BUILD_DIR/<hash>/``).

    python tests/cuda_emu/emu_build.py      # build (or find) it and print its path
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
MODULE = "_C_cuda_emu"
# the CUDA families: module.cpp reports the build, the bindings check arguments; tva_cpu.cpp also binds tva_cuda
HOST_SOURCES = ["common/module.cpp", "scan/scan_cuda_bindings.cpp", "moe/moe_cuda_bindings.cpp", "tva/tva_cpu.cpp"]
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi",
         "-DAPT_WITH_CUDA=1", "-DAPT_CUDA_EMU=1", f"-DAPT_MODULE_NAME={MODULE}", '-DAPT_VERSION_INFO="cuda-emu"']


def _find_matching(s: str, i: int, open_c: str, close_c: str, step: int) -> int:
    """Index of the bracket matching s[i] (scanning forward with step=1, backward with step=-1)."""
    depth = 0
    while 0 <= i < len(s):
        if s[i] == open_c:
            depth += 1
        elif s[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError("unbalanced brackets")


def rewrite_launches(src: str) -> str:
    """``callee<<<cfg>>>(args)`` -> ``::apt_emu::launch(::apt_emu::LaunchConfig(cfg), callee, args)``."""
    out, pos = [], 0
    while True:
        j = src.find("<<<", pos)
        if j < 0:
            out.append(src[pos:])
            return "".join(out)
        # the callee: an identifier, possibly a template-id (kernel<T, D>)
        k = j
        if src[k - 1] == ">":
            k = _find_matching(src, k - 1, ">", "<", -1)
        while k > 0 and (src[k - 1].isalnum() or src[k - 1] in "_:"):
            k -= 1
        callee = src[k:j]
        end_cfg = src.index(">>>", j)
        cfg = src[j + 3:end_cfg]
        a = end_cfg + 3
        while src[a].isspace():
            a += 1
        if src[a] != "(":
            raise ValueError(f"launch of {callee} without an argument list")
        b = _find_matching(src, a, "(", ")", 1)
        args = src[a + 1:b]
        sep = ", " if args.strip() else ""
        out.append(src[pos:k])
        out.append(f"::apt_emu::launch(::apt_emu::LaunchConfig({cfg}), {callee}{sep}{args})")
        pos = b + 1


_SHARED = re.compile(r"\b__shared__\s+([A-Za-z_][\w:]*)\s+([^;\n]+);")
_DECL = re.compile(r"\s*([A-Za-z_]\w*)\s*((?:\[[^\]]+\])*)\s*$")


def rewrite_shared(src: str, where: str) -> str:
    """``__shared__ T a[X][Y], b[Z];`` -> per-declarator ``static char site; auto& a = shared_var<T[X][Y]>(&site);``
    (one statement per line kept: line numbers stay). ``extern __shared__`` is left alone (APT_DYNAMIC_SMEM)."""
    def one(m: re.Match) -> str:
        if src[max(0, m.start() - 7):m.start()] == "extern ":
            return m.group(0)
        ty, out = m.group(1), []
        for decl in m.group(2).split(","):
            d = _DECL.fullmatch(decl)
            if d is None:
                raise ValueError(f"{where}: cannot rewrite the shared declaration {m.group(0)!r}")
            name, dims = d.group(1), d.group(2)
            out.append(f"static char apt_emu_site_{name}; "
                       f"auto& {name} = ::apt_emu::shared_var<{ty}{dims}>(&apt_emu_site_{name});")
        return " ".join(out)

    return _SHARED.sub(one, src)


def rewrite_launch_bounds(src: str, where: str) -> str:
    """``__global__ void __launch_bounds__(X) k(...) {`` -> the same with ``::apt_emu::check_launch_bounds(X);``
    first in the body, on the same line: a launch with more threads per block than X fails as on a GPU."""
    out, pos = [], 0
    while True:
        j = src.find("__launch_bounds__(", pos)
        if j < 0:
            out.append(src[pos:])
            return "".join(out)
        a = j + len("__launch_bounds__")
        b = _find_matching(src, a, "(", ")", 1)
        args, depth, cut = src[a + 1:b], 0, None  # (max threads[, min blocks per SM]): the first top-level comma
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                cut = i
                break
        bound = args[:cut]
        params = src.index("(", b + 1)  # the kernel's parameter list
        body = src.index("{", _find_matching(src, params, "(", ")", 1))
        if src[b + 1:body].count(";"):
            raise ValueError(f"{where}: __launch_bounds__ not followed by a kernel definition")
        out.append(src[pos:body + 1])
        out.append(f" ::apt_emu::check_launch_bounds({bound});")
        pos = body + 1


def _includes() -> list[str]:
    import pybind11

    return [f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}"]


def _digest(cu_files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in (sorted(CSRC.rglob("*")) + sorted((HERE / "include").glob("*")) + cu_files +
              [HERE / "emu_runtime.cpp", Path(__file__)]):
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    h.update(" ".join(_flags() + [sys.version]).encode())
    return h.hexdigest()[:16]


def _flags() -> list[str]:
    # APT_CUDA_EMU_CXXFLAGS: extra flags for a one-off check, e.g. "-fsanitize=address" (then run python with
    # LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0)
    return FLAGS + os.environ.get("APT_CUDA_EMU_CXXFLAGS", "").split()


def build(out_root: Optional[Path] = None, jobs: int = 2) -> Path:
    """Builds the module (or finds it built) and returns the directory holding it. Raises RuntimeError with the
    compiler's output when a compile fails."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) to build the CUDA emulator")
    if not (CSRC / HOST_SOURCES[0]).exists():
        raise RuntimeError(f"no C++ compiler input: {CSRC} is not a source checkout")
    cu_files = sorted(CSRC.glob("*/*.cu")) + [HERE / "selftest.cu"]
    if out_root is None:
        out_root = Path(os.environ.get("APT_CUDA_EMU_BUILD_DIR", ROOT / "build" / "cuda_emu"))
    out = out_root / _digest(cu_files)
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = out / f"{MODULE}{ext}"
    if target.exists():
        return out
    # the rewritten CUDA sources and headers, at their csrc/ paths under gen/ (searched before csrc/)
    gen = out / "gen"
    units = [CSRC / s for s in HOST_SOURCES] + [HERE / "emu_runtime.cpp"]
    for src in cu_files + sorted(CSRC.glob("*/*.cuh")):
        dst = gen / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = rewrite_launch_bounds(rewrite_shared(rewrite_launches(src.read_text()), str(src)), str(src))
        dst.write_text(f'#line 1 "{src}"\n' + text)
        if src.suffix == ".cu":
            units.append(dst)
    inc = [f"-I{gen}"] + _includes()

    def compile_one(src: Path) -> Path:
        obj = out / (src.parent.name + "_" + src.stem + ".o")  # selftest.cu: gen/cuda_emu/selftest.cu
        cmd = [cxx, *_flags(), *inc, "-x", "c++", "-c", str(src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src} for the CUDA emulator failed:\n{r.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = out / f"{MODULE}.tmp{ext}"
    r = subprocess.run([cxx, "-shared", *_flags(), *map(str, objs), "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, target)  # atomic: a concurrent build sees the whole module or none
    return out


def load(out_dir: Path):
    """Imports the built module from ``out_dir``."""
    import importlib.util

    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    spec = importlib.util.spec_from_file_location(MODULE, out_dir / f"{MODULE}{ext}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build())
