"""Ahead-of-time compilation of the Triton scan and MoE kernels for sm_90 (H100/H200) with the real compiler, on
a CPU-only machine: the interpreter tests (TRITON_INTERPRET=1) never run Triton's compiler, so a kernel that only
fails to compile would pass them. Runs scripts/triton_aot_check.py in a subprocess without TRITON_INTERPRET (the
kernels of a module imported under the interpreter cannot be compiled); about 45 s on 2 cores."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]


def test_scan_and_moe_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"), "--only", "scan,moe",
                        "--arch", "90", "--quiet"], cwd=ROOT, env=env, check=False,
                        capture_output=True, text=True, timeout=900)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "no CUDA backend / ptxas")
    assert r.returncode == 0, f"AOT compile failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert "failed" in r.stdout and " 0 failed" in r.stdout, r.stdout[-4000:]
