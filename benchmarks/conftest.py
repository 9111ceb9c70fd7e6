"""pytest-benchmark suite: the `apt bench` measurements as pytest items (not collected by the default `pytest`,
whose testpaths is tests/). Parametrisation comes from apt.bench.pytest_support, one item per (shape, mode,
provider); every module sets KIND and has a test taking the `bench_item` argument."""
from __future__ import annotations

import os

import torch


def pytest_addoption(parser):
    g = parser.getgroup("apt bench")
    g.addoption("--apt-device", default=None, help="cpu or cuda (default: APT_BENCH_DEVICE, else cuda if available)")
    g.addoption("--apt-grid", default=None, choices=("quick", "full"),
                help="shape grid (default: APT_BENCH_GRID, else quick)")
    g.addoption("--apt-providers", default=None, help="comma-separated providers/peers (the reference always runs)")


def pytest_configure(config):
    import pytest

    from apt.bench.cases import all_cases
    from apt.bench.pytest_support import grid_name
    from apt.bench.runner import check_provider_names

    # a misspelt name or grid ran only the reference, or the quick grid, without a word (apt bench refuses both)
    try:
        grid_name(config.getoption("--apt-grid"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    providers = config.getoption("--apt-providers")
    try:
        check_provider_names(list(all_cases()), [p for p in providers.split(",") if p] if providers else None)
    except ValueError as exc:
        raise pytest.UsageError(f"--apt-providers: {exc}") from None
    # like `apt bench --device`: "gpu" or "CPU" failed every module's collection with torch's device-string error
    from apt.bench.pytest_support import default_device

    device = config.getoption("--apt-device") or default_device()
    if device.split(":")[0] not in ("cpu", "cuda"):
        src = "--apt-device" if config.getoption("--apt-device") else "APT_BENCH_DEVICE"
        raise pytest.UsageError(f"{src}: expected cpu or cuda[:N], got {device!r}")
    # like `apt bench --threads auto`: on a busy machine, threads beyond the idle cores make timings meaningless.
    # Empty is the default; anything but auto or a count >= 1 is a usage error, not an INTERNALERROR traceback
    threads = os.environ.get("APT_BENCH_THREADS", "").strip() or "auto"
    if threads == "auto":
        from apt.bench.runner import auto_threads

        torch.set_num_threads(auto_threads())
    else:
        try:
            n = int(threads)
            if n < 1:
                raise ValueError
        except ValueError:
            raise pytest.UsageError(f"APT_BENCH_THREADS: expected auto or a thread count >= 1, got {threads!r}") \
                from None
        torch.set_num_threads(n)


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    from apt.bench.pytest_support import items

    opt = metafunc.config.getoption
    providers = opt("--apt-providers")
    found = items(metafunc.module.KIND, device=opt("--apt-device"), grid=opt("--apt-grid"),
                  providers=[p for p in providers.split(",") if p] if providers else None)
    metafunc.parametrize("bench_item", found, ids=[i.id for i in found])
