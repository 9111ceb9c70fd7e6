"""Shared fixtures. Tests run on the CPU; Triton tests set TRITON_INTERPRET=1 themselves (module level, before
triton is imported) and are marked ``triton``; CUDA tests are marked ``cuda`` and skipped without a device.

Without a CUDA device TRITON_INTERPRET=1 is set here, before any test module is collected: Triton builds each
``@triton.jit`` function for one mode when its module is imported, so a module imported first without it (say by
a provider check while collecting another file) would break the interpreter tests of any subset of files that
happens to collect that file first. The whole suite ends up in that state anyway."""
from __future__ import annotations

import os

import pytest
import torch

from apt_kernels.backends import triton_interpret

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a CUDA machine the interpreter-only modules set TRITON_INTERPRET=1 when collected (test_moe_triton.py sorts
# before test_scan_cuda.py and test_tva_cuda.py), which turns every compiled-Triton GPU test of a plain `pytest`
# into a skip ("TRITON_INTERPRET=1 is set in this process"). Collect them there only when asked for explicitly
# (TRITON_INTERPRET=1, or their file named on the command line). TRITON_INTERPRET=0 asks for the compiled path:
# test_scan_triton.py would still set it to 1 at import.
collect_ignore = []
if torch.cuda.is_available() and not triton_interpret():
    collect_ignore = ["test_moe_triton.py", "test_scan_triton.py", "test_tva_triton.py", "test_triton_layouts.py",
                      "test_triton_int64_offsets.py", "test_triton_lowp.py"]

# Keep the suite within CI's 2 cores and deterministic.
torch.set_num_threads(int(os.environ.get("APT_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0



@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny tiny_debug GPT (window 64) trained for 3 steps (about a second on 2 cores), shared
    by the tests that need a real one (generation and evaluation commands)."""
    from apt.core.config import load_profile
    from apt.training import Trainer

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_profile("tiny_debug", {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1,
                                      "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3,
                                      "training.max_epochs": 1, "training.progress": False,
                                      "training.out_dir": str(out)})
    return Trainer(cfg).fit()["checkpoint"]
