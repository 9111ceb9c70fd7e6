"""The compiled module's CPU kernels follow torch.set_num_threads. With torch's CPU wheel both load the same
libgomp.so.1; beside an OpenMP runtime of another name they would not, so apt_kernels._native mirrors torch's count
into the module before each call (cpu_module)."""
from __future__ import annotations

import pytest
import torch

from apt_kernels._native import native_module
from apt_kernels.backends import native_family_status

if not native_family_status("tva")[0] or not getattr(native_module(), "with_openmp", False):
    pytest.skip("needs the compiled module with OpenMP", allow_module_level=True)

from apt_kernels.ops.scan import selective_scan_cpu  # noqa: E402
from apt_kernels.ops.tva import tva_attention_cpu  # noqa: E402


def test_cpu_kernels_use_torchs_thread_count():
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 32, generator=g) for _ in range(3))
    u, delta = torch.randn(2, 16, 300, generator=g), torch.rand(2, 16, 300, generator=g)
    A, B, C = -torch.rand(16, 8, generator=g), torch.randn(2, 8, 300, generator=g), torch.randn(2, 8, 300, generator=g)
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((tva_attention_cpu(q, k, v), selective_scan_cpu(u, delta, A, B, C)))
            assert native_module().max_threads() == n
        # each task's work does not depend on how many threads share the tasks
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
    tva_attention_cpu(q, k, v)
    assert native_module().max_threads() == before


def test_cpu_module_mirrors_the_count_into_a_separate_runtime(monkeypatch):
    """A module whose OpenMP runtime torch does not share (recorded here by a stand-in) gets torch's count for the
    calling thread when it changes, once per change."""
    import threading

    import apt_kernels._native as nat

    class Separate:
        def __init__(self):
            self.calls = []

        def set_num_threads(self, n):
            self.calls.append(n)

    fake = Separate()
    monkeypatch.setattr(nat, "_module", fake)
    monkeypatch.setattr(nat, "_threads", threading.local())
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # an earlier test may have left torch at 1 thread
    try:
        assert nat.cpu_module() is fake and fake.calls == [before]
        torch.set_num_threads(other)
        nat.cpu_module()
        nat.cpu_module()
        assert fake.calls == [before, other]
    finally:
        torch.set_num_threads(before)
    nat.cpu_module()
    assert fake.calls == [before, other, before]


def _child_runs_kernel(x, queue):
    from apt_kernels.ops.running_mean import running_mean_native

    queue.put((native_module().max_threads(), float(running_mean_native(x, None).sum())))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_forked_child_runs_the_kernels_without_hanging():
    """The parent's OpenMP team does not survive fork(): with 2 threads a child's first kernel waited forever on it
    (GNU libgomp), e.g. in a fork-started worker. A child runs them on its calling thread."""
    import multiprocessing as mp

    from apt_kernels.ops.running_mean import running_mean_native

    before = torch.get_num_threads()
    x = torch.randn(8, 8192, 64)
    try:
        torch.set_num_threads(2)
        want = float(running_mean_native(x, None).sum())  # starts the team
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        p = ctx.Process(target=_child_runs_kernel, args=(x, queue))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            pytest.fail("the forked child hung in the native kernel")
        threads, got = queue.get(timeout=5)
        assert p.exitcode == 0 and threads == 1 and got == pytest.approx(want, rel=1e-5)
        # the parent keeps its count
        running_mean_native(x, None)
        assert native_module().max_threads() == 2
    finally:
        torch.set_num_threads(before)
