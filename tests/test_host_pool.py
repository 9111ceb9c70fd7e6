"""The host pool for large CPU outputs (csrc/common/host_pool.cpp, apt_kernels._native.host_empty): a block is
reused only after torch frees every tensor on it, the cap holds, and the MoE kernels that write into pooled blocks
write every element (a reused block starts with the previous tensor's values, here NaN)."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from apt_kernels import _native
from apt_kernels.backends import native_status
from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
from apt_kernels.testing import assert_close

pytestmark = pytest.mark.skipif(not native_status()[0], reason="apt_kernels._C is not built")

MB = 1 << 20


@pytest.fixture
def pool():
    """A fresh pool with the default cap, restored afterwards (the pool is process-wide)."""
    limit = _native.host_cache_stats()["limit_bytes"]
    _native.empty_host_cache()
    _native.set_host_cache_limit(1 << 30)
    yield _native
    _native.set_host_cache_limit(limit)
    _native.empty_host_cache()


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _stat(name: str) -> int:
    return _native.host_cache_stats()[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.bool])
def test_host_empty_is_a_plain_contiguous_tensor(pool, dtype):
    t = pool.host_empty((3, 700, 601), dtype)
    assert t.shape == (3, 700, 601) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert _stat("in_use_bytes") >= t.numel() * t.element_size() >= pool.HOST_POOL_MIN_BYTES
    t.fill_(1)
    assert torch.all(t == 1)


def test_small_outputs_and_zero_sizes_bypass_the_pool(pool):
    before = _native.host_cache_stats()
    a = pool.host_empty((100, 100), torch.float32)
    b = pool.host_empty((0, 5000, 5000), torch.float32)
    assert a.shape == (100, 100) and b.shape == (0, 5000, 5000)
    assert _native.host_cache_stats() == before


def test_freed_block_is_reused_live_block_never(pool):
    a = pool.host_empty((1024, 1024), torch.float32)
    pa = a.data_ptr()
    b = pool.host_empty((1024, 1024), torch.float32)  # a is alive: a new block
    (lo, hi), (blo, bhi) = _span(a), _span(b)
    assert bhi <= lo or blo >= hi
    hits = _stat("hits")
    del a
    c = pool.host_empty((1024, 1024), torch.float32)
    assert c.data_ptr() == pa and _stat("hits") == hits + 1


@pytest.mark.parametrize("keep", ["view", "autograd", "storage", "numpy"])
def test_block_stays_out_of_the_pool_while_anything_holds_it(pool, keep):
    """Whatever keeps the storage alive (a view, a tensor saved for backward, the storage object, a NumPy array)
    keeps the block out of reuse: the pool learns of the free from torch's deleter, not from a use count."""
    a = pool.host_empty((1024, 1024), torch.float32)
    a.fill_(3.0)
    ptr = a.data_ptr()
    if keep == "view":
        holder = a[1:, 2:]
    elif keep == "autograd":
        w = torch.ones(1024, requires_grad=True)
        holder = (a * w).sum()  # mul saves a for the gradient of w
    elif keep == "storage":
        holder = a.untyped_storage()
    else:
        holder = a.numpy()
    del a
    others = [pool.host_empty((1024, 1024), torch.float32) for _ in range(3)]
    assert all(o.data_ptr() != ptr for o in others)
    for o in others:
        o.fill_(float("nan"))
    if keep == "autograd":
        holder.backward()
        assert torch.equal(w.grad, torch.full((1024,), 3.0 * 1024))
    elif keep == "view":
        assert torch.all(holder == 3.0)
    elif keep == "numpy":
        assert (holder == 3.0).all()
    del holder
    if keep == "autograd":
        del w
    assert pool.host_empty((1024, 1024), torch.float32).data_ptr() == ptr


def test_unconsumed_capsule_frees_its_block(pool):
    m = _native.native_module()
    cap = m.host_empty([4 * MB], 0)
    assert _stat("in_use_bytes") == 16 * MB
    del cap
    assert _stat("in_use_bytes") == 0 and _stat("cached_bytes") == 16 * MB


def test_cap_evicts_oldest_and_zero_turns_the_pool_off(pool):
    pool.set_host_cache_limit(40 * MB)
    a, b, c = (pool.host_empty((4 * MB,), torch.float32) for _ in range(3))  # 16 MiB each
    pb, pc = b.data_ptr(), c.data_ptr()
    del a, b  # 32 MiB held
    assert _stat("cached_bytes") == 32 * MB
    del c  # 48 MiB > 40: the oldest (a's) goes back to the OS
    assert _stat("cached_bytes") == 32 * MB and _stat("cached_blocks") == 2
    hits = _stat("hits")
    d = pool.host_empty((4 * MB,), torch.float32)
    assert d.data_ptr() in (pb, pc) and _stat("hits") == hits + 1  # served from a held block, not a's
    assert _stat("cached_blocks") == 1
    pool.set_host_cache_limit(0)
    assert _stat("cached_bytes") == 0
    before = _native.host_cache_stats()
    e = pool.host_empty((4 * MB,), torch.float32)
    assert e.shape == (4 * MB,) and _native.host_cache_stats()["misses"] == before["misses"]  # torch.empty
    del d, e
    assert _stat("cached_bytes") == 0  # d's block, freed with the cap at 0, is not kept


def test_a_block_much_larger_than_asked_is_not_used(pool):
    big = pool.host_empty((8 * MB,), torch.float32)  # 32 MiB
    del big
    small = pool.host_empty((2 * MB,), torch.float32)  # 8 MiB: 4x smaller, a new block
    assert _stat("cached_blocks") == 1 and small.numel() == 2 * MB


def test_set_host_cache_limit_checks_its_argument(pool):
    with pytest.raises(ValueError, match="nbytes"):
        pool.set_host_cache_limit(-1)
    with pytest.raises(TypeError, match="nbytes"):
        pool.set_host_cache_limit(1.5)
    pool.set_host_cache_limit(1 << 70)  # "no limit": the largest cap the pool counts (was a pybind TypeError)
    assert _stat("limit_bytes") == (1 << 63) - 1


def test_sizes_that_overflow_are_errors(pool):
    """The element count wrapped: torch got a 1-byte block with the huge shape and aborted the process."""
    for shape, what in [((1 << 62, 4), "number of elements"), ((1 << 61,), "size in bytes"),
                        ((0, 1 << 40, 1 << 40), "strides")]:
        with pytest.raises(ValueError, match=f"shape: .*{what}"):  # the C++ op itself (an empty tensor never
            pool._pool_module.host_empty(list(shape), pool.DTYPE_CODES[torch.float32])  # reaches it from Python)
    with pytest.raises(ValueError, match="shape: .*number of elements"):
        pool.host_empty((1 << 62, 4), torch.float32)


def test_stats_while_the_garbage_collector_frees_a_pooled_tensor(pool, tmp_path):
    """stats() built its dict holding the pool's lock; the allocation could run the collector, which freed a pooled
    tensor in a reference cycle, whose deleter took the same lock on the same thread: the process hung for ever.
    Run in a child with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = """
import gc, torch
from apt_kernels import _native as NV
class Holder: pass
for trial in range(30):
    gc.collect()
    h = Holder(); h.self = h
    h.t = NV.host_empty((1 << 20,), torch.float32)  # a pooled 4 MiB block, freed only by the collector
    del h
    keep = [dict() for _ in range(200)]  # empties the dict free list: stats()'s dict is a fresh GC allocation
    gc.disable(); gc.set_threshold(1); gc.enable()  # and the collector runs at that allocation
    pad = [[] for _ in range(trial % 3)]
    s = NV.host_cache_stats()
    gc.set_threshold(700)
    del keep
print("ok", s["hits"])
"""
    # the child imports the apt_kernels this process runs (from the checkout's root, "-c" would find the source
    # tree first, which has no compiled module when the package is installed)
    import os

    import apt_kernels

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(apt_kernels.__file__))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("raw,expected", [(None, 1 << 30), ("", 1 << 30), ("0", 0), ("256", 256 * MB),
                                          ("0.5", MB // 2), ("lots", 1 << 30), ("-3", 1 << 30), ("nan", 1 << 30),
                                          ("1e30", (1 << 63) - 1), ("8796093022208", (1 << 63) - 1)])
def test_env_limit(monkeypatch, caplog, raw, expected):
    if raw is None:
        monkeypatch.delenv(_native.HOST_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(_native.HOST_CACHE_ENV, raw)
    with caplog.at_level(logging.WARNING, logger="apt_kernels._native"):
        assert _native._host_cache_limit_from_env() == expected
    bad = raw in ("lots", "-3", "nan")
    assert (_native.HOST_CACHE_ENV in caplog.text) == bad


def test_threads_never_share_a_live_block(pool):
    """Blocks taken and freed from several threads at once: no two live tensors overlap, and each keeps what its
    thread wrote."""
    errors: list[str] = []

    def work(tid: int) -> None:
        try:
            for i in range(60):
                live = [pool.host_empty((MB // 2 + 1024 * (j % 3),), torch.float32) for j in range(3)]
                for j, t in enumerate(live):
                    t.fill_(tid * 1000 + i * 10 + j)
                for j, t in enumerate(live):
                    if not torch.all(t == tid * 1000 + i * 10 + j):
                        errors.append(f"thread {tid} step {i}: block overwritten")
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert _stat("in_use_bytes") == 0


def test_share_memory_moves_the_tensor_out_of_the_pool(pool):
    t = pool.host_empty((MB,), torch.float32).fill_(2.0)
    t.share_memory_()
    assert t.is_shared() and torch.all(t == 2.0) and _stat("in_use_bytes") == 0


def test_a_torch_that_refuses_the_capsule_turns_the_pool_off(pool, monkeypatch, caplog):
    def refuse(_):
        raise RuntimeError("unversioned DLPack capsules are no longer supported")

    monkeypatch.setattr(torch, "from_dlpack", refuse)
    with caplog.at_level(logging.WARNING, logger="apt_kernels._native"):
        t = pool.host_empty((MB,), torch.float32)
    assert t.shape == (MB,) and "host pool is off" in caplog.text
    assert _stat("in_use_bytes") == 0  # the refused block went back
    before = _native.host_cache_stats()
    pool.host_empty((MB,), torch.float32)
    assert _native.host_cache_stats() == before  # no longer asked
    # and it says so: its cap is 0 (nothing held), and the status and `apt info` name the refusal
    assert before["limit_bytes"] == 0 and before["cached_bytes"] == 0
    on, why = pool.host_pool_status()
    assert not on and "from_dlpack refused" in why and "no longer supported" in why
    from apt.cli.commands.info import environment, render

    assert "from_dlpack refused" in render(environment(), [])
    pool.set_host_cache_limit(1 << 30)  # asked for again: on, and it tries torch.from_dlpack again
    assert pool.host_pool_status()[0]


def test_pool_status_follows_the_cap(pool):
    on, why = pool.host_pool_status()
    assert on and "1024 MiB" in why
    pool.set_host_cache_limit(0)
    on, why = pool.host_pool_status()
    assert not on and "cap 0" in why


def _poison_pool(nbytes_list: list[int]) -> None:
    """Leaves NaN-filled blocks of these sizes held for reuse."""
    blocks = [_native.host_empty((n // 4,), torch.float32).fill_(float("nan")) for n in nbytes_list]
    del blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cf", [0.5, 1.25, None])
def test_moe_cpu_native_writes_every_element_of_pooled_outputs(pool, dtype, cf):
    """Dispatch (empty slots), combine (tokens with every choice dropped) and both backwards write into blocks that
    held NaN, and match the reference."""
    torch.manual_seed(3)
    n, c, e, k = 2048, 320, 8, 2  # every output >= 1 MiB in bf16 too
    lg = torch.randn(n, e)
    lg[:64] = lg[:1]  # 64 tokens with the same choices: at cf 0.5 some have every choice dropped
    x = torch.randn(n, c, dtype=dtype)
    res = {}
    for impl in ("reference", "cpu_native"):
        xi = x.clone().requires_grad_()
        li = lg.clone().requires_grad_()
        r = moe_route(li, k, cf, impl=impl)
        row = c * x.element_size()
        _poison_pool([n * row, r.num_slots * row] * 2)  # forward outputs, then the backwards'
        buf = moe_dispatch(xi, r, impl=impl)
        y = moe_combine(buf * 1.5, r, impl=impl)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype))
        res[impl] = (buf.detach(), y.detach(), xi.grad, li.grad)
    assert _stat("hits") > 0
    for got, want in zip(res["cpu_native"], res["reference"]):
        assert not torch.isnan(got).any()
        assert_close(got, want, grad=True)
