"""A window at least as long as the sequence (e.g. a "no window" sentinel: 2**31 - 1, sys.maxsize) is no window:
every implementation must see every key, causal or not (the kernels' p + W overflowed int32 / int64)."""
from __future__ import annotations

import pytest
import torch

from apt_kernels.ops.tva import impl_status, tva_attention
from apt_kernels.reference.tva import random_tva_inputs, tva_attention_ref
from apt_kernels.testing import assert_close

HUGE = (2 ** 30, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 62, 2 ** 63 - 1)


@pytest.mark.parametrize("impl", ["reference", "cpu_native", "triton"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", HUGE)
@pytest.mark.parametrize("sinks", [0, 3])
def test_huge_window_is_no_window(impl, causal, window, sinks):
    if impl != "reference" and not impl_status(impl, torch.device("cpu"), 16, torch.float32)[0]:
        pytest.skip(f"{impl} unavailable on CPU tensors")
    inp = random_tva_inputs(B=1, H=2, Tq=5, Tk=7, D=16, pad=False)
    full = tva_attention_ref(**inp, causal=causal)
    out = tva_attention(**inp, causal=causal, window=window, sinks=sinks, impl=impl)
    assert_close(out, full, dtype=torch.float32, family="attention", msg=f"{impl} window={window}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [7, 8, 2 ** 31 - 1, 2 ** 63 - 1])
def test_the_native_kernel_itself_takes_a_window_past_the_keys_as_none(causal, window):
    """C++ checks its inputs too: a caller of the compiled op who skips check_tva_inputs' clamp gets the same."""
    if not impl_status("cpu_native", torch.device("cpu"), 16, torch.float32)[0]:
        pytest.skip("cpu_native unavailable")
    from apt_kernels.ops.tva import _native_forward

    inp = random_tva_inputs(B=1, H=2, Tq=5, Tk=7, D=16, pad=False)
    full = tva_attention_ref(**inp, causal=causal)
    o, _, _ = _native_forward(inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"], torch.tensor(inp["coef"]),
                           causal, window, 0, None, 16 ** -0.5, cuda=False)
    assert_close(o, full, dtype=torch.float32, family="attention", msg=f"window={window}")
