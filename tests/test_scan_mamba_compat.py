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


@pytest.mark.parametrize("name", ["selective_state_update", "selective_state_update_ref",
                                  "selective_state_update_cpu"])
def test_one_head_state_with_channel_layout_inputs(name):
    """mamba_ssm adds the head axis argument by argument: a (batch, 1, dim, N) state with (batch, dim) x/dt/z,
    (dim, N) or (1, dim, N) A, (batch, N) B/C runs as one head, y (batch, 1, dim) as mamba_ssm's (it squeezes the
    head axis only for a 3-d state)."""
    if name.endswith("_cpu") and not S.cpu_status()[0]:
        pytest.skip(S.cpu_status()[1])
    state, x, dt, A, B, C, D, z, dt_bias = _mamba2_inputs(1, torch.Generator().manual_seed(53), H=1)
    y_ref, s_ref = _per_head(state, x, dt, A, B, C, D, z, dt_bias)
    for A_in, B_in in ((A[0], B[:, 0]), (A, B)):  # channel-layout A and B, or the head layout's
        st = state.clone()
        y = getattr(K, name)(st, x[:, 0], dt[:, 0], A_in, B_in, C[:, 0], D[0], z[:, 0], dt_bias, dt_softplus=True)
        assert y.shape == (2, 1, 3)
        assert_close(y, y_ref, family="scan")
        assert_close(st, s_ref, family="scan")


def test_decode_step_with_parameters_warns_once_that_it_runs_the_reference(caplog, monkeypatch):
    """mamba_ssm's step() passes D and dt_bias, nn.Parameters: outside no_grad the step runs the differentiable
    reference, which is correct but several times slower; said once, as a warning."""
    monkeypatch.setattr(S, "_warned_step_with_grad", False)
    state, x, dt, A, B, C, D, z, dt_bias = _mamba2_inputs(1, torch.Generator().manual_seed(54))
    D = torch.nn.Parameter(D)
    with caplog.at_level("WARNING", logger=S.logger.name):
        for _ in range(2):
            K.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        with torch.no_grad():
            K.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    said = [r for r in caplog.records if "requires grad" in r.getMessage()]
    assert len(said) == 1 and "torch.no_grad()" in said[0].getMessage()


def test_flag_error_names_numpy_bool_unambiguously():
    """A numpy bool is refused like any non-bool, but the message must not read "expected a bool, got bool"."""
    np = pytest.importorskip("numpy")
    x = K.reference.scan.random_scan_inputs(1, 3, 4, 2, generator=torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match=r"delta_softplus: expected a bool .*got numpy\.bool"):
        K.selective_scan_fn(**x, delta_softplus=np.bool_(True))


def _slots_truth(pool, idx, x, dt, A, B, C, D, z, dt_bias):
    """Row by row with the reference on the row's slot: the truth for state_batch_indices."""
    pool, ys = pool.clone(), []
    for i, s in enumerate(idx.tolist()):
        if s < 0:
            ys.append(torch.zeros_like(x[i]))
            continue
        st = pool[s:s + 1].clone()
        sl = lambda t: None if t is None else t[i:i + 1]  # noqa: E731
        ys.append(K.selective_state_update_ref(st, sl(x), sl(dt), A, sl(B), sl(C), D, sl(z), dt_bias, True)[0])
        pool[s] = st[0]
    return torch.stack(ys), pool


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("idx", [[5, -1, 0, 3], [-1, -1, 2, 6], [-1, -1, -1, -1], [0, 1, 2, 3]])
def test_state_batch_indices_step_rows_on_their_slots(heads, idx):
    """mamba_ssm's continuous batching: row i steps state[state_batch_indices[i]] of a pool; a negative index is a
    padding row (y zeros, no state touched); slots no row names stay as they were."""
    g = torch.Generator().manual_seed(55)
    args = list(_mamba2_inputs(2, g, b=4))
    if not heads:  # the channel layout: (batch, dim, N), B/C (batch, N)
        b, H, P, N = args[0].shape
        args = [args[0].reshape(b, H * P, N), *(t.reshape(b, H * P) for t in args[1:3]),
                args[3].reshape(H * P, N), args[4][:, 0], args[5][:, 0], args[6].reshape(H * P),
                args[7].reshape(b, H * P), args[8].reshape(H * P)]
    _, x, dt, A, B, C, D, z, dt_bias = args
    pool = torch.randn(7, *args[0].shape[1:], generator=g)
    ind = torch.tensor(idx)
    y_ref, pool_ref = _slots_truth(pool, ind, x, dt, A, B, C, D, z, dt_bias)
    got = pool.clone()
    y = K.selective_state_update(got, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, state_batch_indices=ind)
    assert_close(y, y_ref, family="scan")
    assert_close(got, pool_ref, family="scan")
    untouched = [s for s in range(7) if s not in idx]
    assert torch.equal(got[untouched], pool[untouched])


def test_state_batch_indices_bad_input_errors():
    g = torch.Generator().manual_seed(56)
    _, x, dt, A, B, C, D, z, dt_bias = _mamba2_inputs(1, g, b=3)
    pool = torch.randn(5, *x.shape[1:], A.shape[-1], generator=g)

    def run(ind):
        return K.selective_state_update(pool.clone(), x, dt, A, B, C, D, z, dt_bias, state_batch_indices=ind)
    for ind, err, msg in ((torch.tensor([0.0, 1.0, 2.0]), TypeError, "int32 or int64"),
                          ([0, 1, 2], TypeError, "expected a tensor"),
                          (torch.tensor([0, 1]), ValueError, r"shape \(batch,\) = \(3,\)"),
                          (torch.tensor([0, 5, 1]), ValueError, "index 5 past the state pool of 5"),
                          (torch.tensor([2, -1, 2]), ValueError, "more than once")):
        with pytest.raises(err, match=f"^state_batch_indices: .*{msg}"):
            run(ind)
    assert run(torch.tensor([4, -1, 0], dtype=torch.int32)).shape == x.shape


def test_state_batch_indices_gradients_and_no_host_sync():
    """Padding rows write the anchor slot's own value back: with a gradient through the updated pool it must
    count once (index_copy_'s backward gave each repeat the slot's whole gradient: x6 with five padding rows);
    and no .item() (a host sync per decode step on a GPU): torch.compile(fullgraph=True) traces it."""
    g = torch.Generator().manual_seed(57)
    _, x, dt, A, B, C, D, z, dt_bias = _mamba2_inputs(1, g, b=5)
    pool0 = torch.randn(6, *x.shape[1:], A.shape[-1], generator=g)
    for idx in ([-1, 3, -1, 0, 1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4]):
        ind = torch.tensor(idx)
        xs = x.clone().requires_grad_()
        p = pool0.clone().requires_grad_()
        pool = p * 1.0  # a non-leaf, updated in place
        y = K.selective_state_update(pool, xs, dt, A, B, C, D, z, dt_bias, dt_softplus=True, state_batch_indices=ind)
        gx, gp = torch.autograd.grad((pool ** 2).sum() + y.sum(), (xs, p))
        xr, pr = x.clone().requires_grad_(), pool0.clone().requires_grad_()
        y_r, pool_r = _slots_truth(pr * 1.0, ind, xr, dt, A, B, C, D, z, dt_bias)  # row by row on its slot
        gxr, gpr = torch.autograd.grad((pool_r ** 2).sum() + y_r.sum(), (xr, pr), allow_unused=True,
                                       materialize_grads=True)
        torch.testing.assert_close(gx, gxr, msg=f"dx {idx}")
        torch.testing.assert_close(gp, gpr, msg=f"dpool {idx}")
    step = torch.compile(lambda st, ind: K.selective_state_update(st, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                                                  state_batch_indices=ind), fullgraph=True)
    ind = torch.tensor([4, -1, 0, 2, -1])
    got, want = pool0.clone(), pool0.clone()
    y = step(got, ind)
    y_ref = K.selective_state_update(want, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, state_batch_indices=ind)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(got, want)
