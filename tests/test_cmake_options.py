"""CMake option spellings (CMakeLists.txt): APT_CUDA / APT_CCACHE read as CMake reads a boolean, any case; a value
that means nothing fails the configure instead of falling back to AUTO; a build dir that found no nvcc looks again.
Configure only (a few seconds each)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")
pytest.importorskip("pybind11")  # the configure finds it through this interpreter


def _configure(tmp_path, *defs, path=None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    for var in ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "CMAKE_CUDA_COMPILER"):
        env.pop(var, None)
    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}", *defs]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("value", ["OFF", "off", "0", "false", "No"])
def test_apt_cuda_off_spellings_skip_cuda(tmp_path, value):
    r = _configure(tmp_path, f"-DAPT_CUDA={value}")
    assert r.returncode == 0, r.stderr
    assert "Looking for a CUDA compiler" not in r.stdout  # OFF never probes for nvcc, whatever its spelling


@pytest.mark.parametrize("value", ["bogus", "maybe"])
def test_apt_cuda_unknown_value_fails(tmp_path, value):
    r = _configure(tmp_path, f"-DAPT_CUDA={value}")
    assert r.returncode != 0 and "APT_CUDA" in r.stderr


def test_apt_cuda_on_lowercase_requires_nvcc(tmp_path):
    bare = os.pathsep.join(p for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin") if os.path.isdir(p))
    if any(os.access(os.path.join(p, "nvcc"), os.X_OK) for p in bare.split(os.pathsep)):
        pytest.skip("nvcc in a system directory")
    r = _configure(tmp_path, "-DAPT_CUDA=on", path=bare)
    assert r.returncode != 0 and "no CUDA compiler was found" in r.stderr


def test_cuda_compiler_looked_up_again_after_notfound(tmp_path):
    """A build dir configured without nvcc on the PATH finds it once it is there (check_language caches NOTFOUND)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on the PATH")
    bare = os.pathsep.join(p for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin") if os.path.isdir(p))
    first = _configure(tmp_path, path=bare)
    assert first.returncode == 0, first.stderr
    assert "no CUDA compiler found" in first.stdout
    again = _configure(tmp_path)
    assert "no CUDA compiler found" not in again.stdout, again.stdout


@pytest.mark.parametrize("value", ["ON", "on", "1", "true", "Yes"])
def test_apt_ccache_on_spellings_configure(tmp_path, value):
    r = _configure(tmp_path, "-DAPT_CUDA=OFF", f"-DAPT_CCACHE={value}")
    assert r.returncode == 0, r.stderr  # ON meant "use ccache" before the spellings were checked


@pytest.mark.parametrize("archs", ["75", "80;70-real"])
def test_cuda_archs_below_sm80_fail_the_configure(tmp_path, archs):
    """The tensor-core TVA kernels use sm_80 instructions (mma m16n8k16, cp.async): an older architecture failed
    in ptxas minutes into the build; now the configure says why."""
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on the PATH")
    r = _configure(tmp_path, f"-DAPT_CUDA_ARCHS={archs}")
    assert r.returncode != 0 and "need sm_80 or newer" in r.stderr, r.stderr
