"""`apt info` output and the no-native-module path (APT_DISABLE_NATIVE=1 behaves like a build without _C)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from apt.cli.main import main


def run_apt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "apt", *args], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_info_table_lists_kinds_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "apt_kernels._C" in out and "torch" in out and "providers" in out
    assert "kind" in out and "available" in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["torch"] == torch.__version__
    for p in data["providers"]:
        assert set(p) >= {"kind", "name", "available", "reason", "is_default"}
        assert p["available"] or p["reason"], f"unavailable provider without a reason: {p}"


def test_info_names_the_cpu_kernel_builds(capsys, monkeypatch):
    """`apt info` says which instruction-set build each C++ CPU kernel family runs, and its cap variable moves it."""
    from apt_kernels.backends import CPU_ISA_ENV, cpu_kernel_isas, native_status

    if not native_status()[0]:
        pytest.skip(native_status()[1])
    isas = cpu_kernel_isas()
    assert set(isas) == set(CPU_ISA_ENV) and set(isas.values()) <= {"generic", "avx2", "avx512"}, isas
    for var in CPU_ISA_ENV.values():
        monkeypatch.setenv(var, "generic")
    assert set(cpu_kernel_isas().values()) == {"generic"}
    monkeypatch.setenv("APT_MOE_CPU_ISA", "avx2")
    assert cpu_kernel_isas()["moe"] == ("generic" if isas["moe"] == "generic" else "avx2")
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CPU kernel ISA"))
    assert "tva generic" in line and "scan generic" in line and "APT_MOE_CPU_ISA" in line, line


def test_without_native_module_everything_still_runs():
    code = (
        "import torch, apt_kernels\n"
        "from apt_kernels.backends import native_status\n"
        "ok, why = native_status()\n"
        "assert not ok and 'APT_DISABLE_NATIVE' in why, why\n"
        "x = torch.randn(2, 5, 3, dtype=torch.float64)\n"
        "torch.testing.assert_close(apt_kernels.running_mean(x), apt_kernels.running_mean_ref(x))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, APT_DISABLE_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    info = run_apt("info", env={"APT_DISABLE_NATIVE": "1"})
    assert info.returncode == 0, info.stderr
    assert "unavailable (disabled by APT_DISABLE_NATIVE)" in info.stdout


FALLBACK = "apt registry: asked for scan/nonexistent, using scan/reference instead: 'nonexistent' is not registered"


def test_fallback_warning_reaches_a_library_user_without_logging_setup():
    """No logging configured: the fallback warning still reaches stderr (logging's last-resort handler; `apt`
    attaches no NullHandler that would swallow it), once, and stdout stays clean."""
    code = "import apt\nprint(apt.get('scan', 'nonexistent').name)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "reference\n"
    assert r.stderr.count(FALLBACK) == 1, r.stderr


def test_fallback_warning_follows_the_programs_logging_setup():
    code = ("import logging\nlogging.basicConfig(format='LOG %(levelname)s %(name)s: %(message)s')\n"
            "import apt\napt.get('scan', 'nonexistent')\n"
            "logging.getLogger('apt').setLevel(logging.ERROR)\napt.get('scan', 'other')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(FALLBACK) == 1 and f"LOG WARNING apt.core.registry: {FALLBACK}" in r.stderr, r.stderr
    assert "scan/other" not in r.stderr  # silenced by the level set on the apt logger


def test_cli_prints_a_fallback_warning_once(tmp_path):
    r = run_apt("train", "-p", "tiny_debug", "--model.attention_name", "nonexistent", "--max-steps", "1",
                "--no-progress", "--out-dir", str(tmp_path / "run"), "--model.d_model", "16", "--model.num_layers",
                "1", "--model.num_heads", "2", "--data.seq_len", "16")
    assert r.returncode == 0, r.stderr
    line = "apt registry: asked for attention/nonexistent, using attention/tva_default instead"
    assert r.stderr.count(line) == 1, r.stderr
    assert f"WARNING apt.core.registry: {line}" in r.stderr  # the CLI's own format, not the last-resort one


def test_cli_without_command_prints_help():
    r = run_apt()
    assert r.returncode == 1 and "usage: apt" in r.stdout


def test_closed_stdout_is_not_a_traceback():
    """`apt info | head -1`: the reader leaves early; apt exits quietly instead of printing BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "apt", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141) and "Traceback" not in err, err


def test_unknown_ffn_name_reports_its_fallback_and_offers_only_dense_names(caplog):
    """`components:` printed 'ffn dense' without the (fallback: ...) note the other components carry, and the
    warning listed 'moe', which model.ffn_name refuses."""
    import logging

    from apt.core.config import load_profile
    from apt.modeling.compose import ModelBuilder

    cfg = load_profile("tiny_debug", {"model.ffn_name": "nosuch", "model.d_model": 16, "model.num_heads": 2,
                                      "model.num_layers": 2})
    with caplog.at_level(logging.WARNING):
        model = ModelBuilder(cfg, vocab_size=256).build()
    ffn = model.build_report["ffn"]
    assert ffn.startswith("dense (fallback: 'nosuch' is not registered") and "moe" not in ffn.split(";")[0], ffn
    warned = [r.getMessage() for r in caplog.records if "ffn/nosuch" in r.getMessage()]
    assert len(warned) == 1 and "dense FFN providers: dense;" in warned[0] and "registered: dense, moe" \
        not in warned[0], warned
    ok = ModelBuilder(load_profile("tiny_debug", {"model.d_model": 16, "model.num_heads": 2}), 256).build()
    assert ok.build_report["ffn"] == "dense"


def test_native_family_names_are_the_built_ones():
    """FAMILIES lists what csrc/ registers; a name outside it is a typo, not a module to rebuild ('scan' said
    "built without the 'scan' ops (rebuild: pip install .)" on a module that has scan_cpu)."""
    from apt_kernels import _native

    if not _native.native_status()[0]:
        pytest.skip(_native.native_status()[1])
    assert sorted(_native.cpu_module().families) == sorted(_native.FAMILIES)
    with pytest.raises(ValueError, match="^family: expected one of .*got 'scan'"):
        _native.native_family_status("scan")
