"""mamba_ssm compatibility of the decode step's Mamba-2 head layout on every entry point (proposed tests)."""
import pytest
import torch

import apt_kernels as K
from apt_kernels.ops import scan as S
from apt_kernels.testing import assert_close


def _mamba2_inputs(groups, g, b=2, H=4, P=3, N=5):
    state = torch.randn(b, H, P, N, generator=g)
    x, dt, z = (torch.randn(b, H, P, generator=g) for _ in range(3))
    A = (-torch.rand(H, 1, 1, generator=g)).expand(H, P, N)
    B, C = torch.randn(b, groups, N, generator=g), torch.randn(b, groups, N, generator=g)
    D, dt_bias = torch.randn(H, P, generator=g), torch.randn(H, P, generator=g)
    return state, x, dt, A, B, C, D, z, dt_bias


def _per_head(state, x, dt, A, B, C, D, z, dt_bias):
    H, G = state.shape[1], B.shape[1]
    ref, ys = state.clone(), []
    for h in range(H):
        s3 = ref[:, h].clone()
        gi = h // (H // G)
        ys.append(K.selective_state_update_ref(s3, x[:, h], dt[:, h], A[h].contiguous(), B[:, gi], C[:, gi], D[h],
                                               z[:, h], dt_bias[h], True))
        ref[:, h] = s3
    return torch.stack(ys, 1), ref


@pytest.mark.parametrize("name", ["selective_state_update", "selective_state_update_ref",
                                  "selective_state_update_cpu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_every_decode_entry_point_takes_the_mamba2_head_layout(name, groups):
    """mamba_ssm's selective_state_update and selective_state_update_ref both take a 4-d state; so do ours, the
    explicit ones (and through them the scan providers) included."""
    if name.endswith("_cpu") and not S.cpu_status()[0]:
        pytest.skip(S.cpu_status()[1])
    args = _mamba2_inputs(groups, torch.Generator().manual_seed(50))
    y_ref, s_ref = _per_head(*args)
    state = args[0].clone()
    y = getattr(K, name)(state, *args[1:], dt_softplus=True)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, family="scan")
    assert_close(state, s_ref, family="scan")


@pytest.mark.parametrize("provider", ["reference", "cpu_native"])
def test_scan_providers_take_the_mamba2_head_layout(provider):
    apt = pytest.importorskip("apt")
    p = apt.get("scan", provider, strict=True)
    args = _mamba2_inputs(2, torch.Generator().manual_seed(51))
    y_ref, s_ref = _per_head(*args)
    state = args[0].clone()
    y = p.selective_state_update(state, *args[1:], dt_softplus=True)
    assert_close(y, y_ref, family="scan")
    assert_close(state, s_ref, family="scan")


def test_mamba2_head_layout_takes_2d_B_C_as_one_group():
    """mamba_ssm unsqueezes a (batch, N) B/C to (batch, 1, N) next to a 4-d state."""
    args = list(_mamba2_inputs(1, torch.Generator().manual_seed(52)))
    y_ref, s_ref = _per_head(*args)
    args[4], args[5] = args[4][:, 0], args[5][:, 0]
    state = args[0].clone()
    y = K.selective_state_update(state, *args[1:], dt_softplus=True)
    assert_close(y, y_ref, family="scan")
    assert_close(state, s_ref, family="scan")


def test_flag_error_names_numpy_bool_unambiguously():
    """A numpy bool is refused like any non-bool, but the message must not read "expected a bool, got bool"."""
    np = pytest.importorskip("numpy")
    x = K.reference.scan.random_scan_inputs(1, 3, 4, 2, generator=torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match=r"delta_softplus: expected a bool .*got numpy\.bool"):
        K.selective_scan_fn(**x, delta_softplus=np.bool_(True))
