"""Shared fixtures. Tests run on the CPU; Triton tests set TRITON_INTERPRET=1 themselves (module level, before
triton is imported) and are marked ``triton``; CUDA tests are marked ``cuda`` and skipped without a device."""
from __future__ import annotations

import os

import pytest
import torch

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

