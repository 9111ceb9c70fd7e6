"""Environment-variable parsing and logging hygiene (helper h22e)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), ("on", True), ("y", True),
                                            ("0", False), ("", False), ("off", False), ("no", False)])
def test_triton_interpret_reads_like_triton(monkeypatch, value, expected):
    """apt's reading of TRITON_INTERPRET is Triton's own: TRITON_INTERPRET=on runs Triton in the interpreter, so
    apt must not report the Triton providers unusable ("set TRITON_INTERPRET=1") in that process."""
    from apt_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpret() is expected
    try:
        import triton
        knob = triton.knobs.runtime.interpret
    except (ImportError, AttributeError):
        return
    assert knob is expected


def test_env_flag_warns_once_on_garbage(monkeypatch, caplog):
    from apt_kernels import _native

    monkeypatch.setenv("APT_TEST_FLAG_X", "enable")
    with caplog.at_level(logging.WARNING, logger="apt_kernels"):
        assert _native.env_flag("APT_TEST_FLAG_X") is False
        assert _native.env_flag("APT_TEST_FLAG_X") is False
    hits = [r for r in caplog.records if "APT_TEST_FLAG_X" in r.getMessage()]
    assert len(hits) == 1 and "not a boolean" in hits[0].getMessage()


@pytest.mark.parametrize("value", ["on", "ON", "True"])
def test_disable_native_spellings(value):
    code = ("import apt_kernels._native as n; ok, why = n.native_status(); "
            "assert not ok and 'APT_DISABLE_NATIVE' in why, why")
    env = dict(os.environ, APT_DISABLE_NATIVE=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_disable_native_garbage_warns():
    env = dict(os.environ, APT_DISABLE_NATIVE="disable")
    r = subprocess.run([sys.executable, "-c", "import apt_kernels._native"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "APT_DISABLE_NATIVE='disable' is not a boolean" in r.stderr, r.stderr


def test_config_overrides_error_names_its_source(monkeypatch):
    tva = pytest.importorskip("apt_kernels.triton.tva")
    monkeypatch.delenv(tva.CONFIG_ENV, raising=False)
    monkeypatch.setitem(tva.CONFIG_OVERRIDES, "fwd", (100, 64, 4, 1))
    with pytest.raises(ValueError, match=r"^CONFIG_OVERRIDES: fwd blocks"):
        tva.kernel_configs(torch.device("cpu"), torch.float32, 64)


def _moe_model(num_layers=4):
    from apt.core.config import load_profile
    from apt.modeling.compose import ModelBuilder

    cfg = load_profile("tiny_debug")
    m = cfg["model"]
    m["num_layers"] = num_layers
    m.setdefault("ffn", {})["activation"] = "gelu"
    m.setdefault("moe", {}).update(enabled=True, activation="swiglu")  # experts cannot take the dense weights
    return ModelBuilder(cfg, vocab_size=64).build()


def test_upcycle_failure_warns_once_per_reason(caplog):
    from apt.plugins.base import HookContext
    from apt.plugins.builtin.moe import MoEPlugin

    model = _moe_model(4)
    p = MoEPlugin({})
    ctx = HookContext(model=model)
    p.on_training_start(ctx)
    for layer in p._layers:
        layer.active = False  # the dense phase before the enable epoch
    with caplog.at_level(logging.WARNING, logger="apt"):
        p.on_epoch_start(ctx)
    hits = [r.getMessage() for r in caplog.records if "not upcycled" in r.getMessage()]
    assert len(hits) == 1, hits
    assert "0, 1, 2, 3" in hits[0] and "activations differ" in hits[0]


def test_auto_scan_does_not_log_per_layer_at_info(caplog):
    from apt.core.config import load_profile
    from apt.modeling.compose import ModelBuilder

    cfg = load_profile("mamba_tiny")
    cfg["model"]["num_layers"] = 4
    cfg["model"]["mamba"]["scan_name"] = "auto"
    with caplog.at_level(logging.INFO, logger="apt"):
        ModelBuilder(cfg, vocab_size=64).build()
    per_layer = [r for r in caplog.records if r.levelno >= logging.INFO and "scan provider for" in r.getMessage()]
    assert per_layer == []


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("env,msg", [({"APT_BENCH_THREADS": "abc"}, "APT_BENCH_THREADS: expected auto"),
                                     ({"APT_BENCH_THREADS": "0"}, "APT_BENCH_THREADS: expected auto"),
                                     ({"APT_BENCH_DEVICE": "gpu"}, "APT_BENCH_DEVICE: expected cpu or cuda")])
def test_bench_env_usage_errors(env, msg):
    if not os.path.isdir(BENCH):
        pytest.skip("benchmarks/ not beside tests/")
    r = subprocess.run([sys.executable, "-m", "pytest", BENCH, "--collect-only", "-q", "-p", "no:cacheprovider"],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and msg in out and "INTERNALERROR" not in out, out[-2000:]


def test_bench_threads_empty_is_auto():
    if not os.path.isdir(BENCH):
        pytest.skip("benchmarks/ not beside tests/")
    r = subprocess.run([sys.executable, "-m", "pytest", BENCH, "--collect-only", "-q", "-p", "no:cacheprovider"],
                       env=dict(os.environ, APT_BENCH_THREADS="", APT_BENCH_DEVICE="cpu"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]


@pytest.mark.parametrize("error,level", [
    (ImportError("undefined symbol: GOMP_parallel"), logging.WARNING),  # found, fails to load: wherever it lives
    (ModuleNotFoundError("No module named 'apt_kernels._C'", name="apt_kernels._C"), None)])  # None: a file beside?
def test_compiled_module_that_does_not_load_warns(monkeypatch, caplog, error, level):
    """A _C that is there but fails to import (another Python's build, a missing libgomp) made every op run on the
    reference with only a debug log; a build without one (APT_NATIVE=OFF) stays quiet. In an editable install _C
    is in site-packages, not beside _native.py: a load failure there warns too."""
    import importlib
    from pathlib import Path

    from apt_kernels import _native

    if level is None:  # not found: only another Python's build beside _native.py is worth a warning
        level = logging.WARNING if any(Path(_native.__file__).parent.glob("_C.*")) else logging.DEBUG
    real_import = importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "apt_kernels._C":
            raise error
        return real_import(name, *a, **kw)

    monkeypatch.setattr(_native, "_module", _native._module)
    monkeypatch.setattr(_native, "_reason", _native._reason)
    monkeypatch.setattr(_native.importlib, "import_module", fake_import)
    monkeypatch.delenv("APT_DISABLE_NATIVE", raising=False)
    _native._module = None
    with caplog.at_level(logging.DEBUG, logger="apt_kernels._native"):
        _native._load()
    assert _native._module is None and str(error) in _native._reason
    levels = [r.levelno for r in caplog.records if str(error) in r.getMessage()]
    assert levels == [level]
