"""native_cuda_status() must report the CUDA kernels unavailable on a pre-sm_80 GPU (the build holds only
sm_80/sm_90 images and compute_80/90 PTX), so impl="auto" does not pick them there."""
import pytest
import torch

from apt_kernels import _native


@pytest.fixture
def fake_gpu(monkeypatch):
    if _native.native_module() is None or not getattr(_native.native_module(), "with_cuda", False):
        pytest.skip("needs a module built with CUDA")

    def make(cap, *others):  # device 0 has cap, devices 1.. the others
        caps = (cap, *others)
        _native._capability.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[0 if i is None else i])
    yield make
    _native._capability.cache_clear()


@pytest.mark.parametrize("cap", [(7, 0), (7, 5)])
def test_pre_ampere_is_unavailable(fake_gpu, cap):
    fake_gpu(cap)
    ok, why = _native.native_cuda_status()
    assert not ok and "sm_80" in why and f"sm_{cap[0]}{cap[1]}" in why


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (9, 0), (12, 0)])
def test_ampere_and_newer_are_available(fake_gpu, cap):
    fake_gpu(cap)
    assert _native.native_cuda_status() == (True, "")


def test_mixed_gpus_check_the_tensors_device(fake_gpu):
    # an A100 as cuda:0 (current) and a V100 as cuda:1: an op on cuda:1 tensors must not pick the CUDA kernels
    fake_gpu((8, 0), (7, 0))
    assert _native.native_cuda_status() == (True, "")
    assert _native.native_cuda_status(torch.device("cuda", 0)) == (True, "")
    ok, why = _native.native_cuda_status(torch.device("cuda", 1))
    assert not ok and "sm_70" in why
