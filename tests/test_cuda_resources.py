"""Static resource checks of CUDA kernels that cannot run here: compiled for sm_90 with ``ptxas -v``, the MoE
kernels and the tensor-core TVA kernels keep everything in registers (no stack frame, no spills). The top-k
kernel's runtime-indexed candidate arrays had gone to local memory (a 192-byte stack frame: a local load of the
k-th best for every expert of every token). Needs nvcc; a few seconds per file."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

_PROPS = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")


def _ptxas_report(src: str, tmp_path: Path, arch: str = "sm_90") -> dict[str, tuple[int, int, int]]:
    # the build's flags (CMakeLists.txt) that change code generation
    cmd = ["nvcc", "-O3", "-DNDEBUG", "-DAPT_WITH_CUDA=1", f"-I{ROOT / 'csrc'}", "--expt-relaxed-constexpr",
           "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
           str(ROOT / "csrc" / src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    found = {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in _PROPS.finditer(r.stderr)}
    assert found, r.stderr[-3000:]
    return found


@pytest.mark.parametrize("src", ["moe/moe_cuda.cu", "tva/tva_cuda_tc.cu"])
def test_no_local_memory(src, tmp_path):
    report = _ptxas_report(src, tmp_path)
    bad = {name: v for name, v in report.items() if any(v)}
    assert not bad, f"kernels with (stack bytes, spill stores, spill loads): {bad}"
    if src.startswith("moe"):
        assert sum("topk_kernel" in name for name in report) == 5  # K = 1, 2, 4, 8, 16
