"""Which commit a bench run records (apt.bench.runner.commit_info) and the build-time record of it
(cmake/apt_build_info.cmake -> apt_kernels/_build_info.py): a plain `pip install .` puts the package in
site-packages, where git has nothing to say, so the checkout of the working directory and the commit recorded at
build time are asked instead, each labelled for what it is."""
from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from apt.bench import report, runner

REPO = Path(__file__).resolve().parents[1]
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def _repo(path: Path, project: str) -> str:
    """A one-commit git repository whose pyproject.toml names the distribution ``project``; returns its HEAD."""
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text(f'[project]\nname = "{project}"\nversion = "0"\n')
    (path / "python" / "apt" / "bench").mkdir(parents=True)
    _git(path, "init", "-q")
    _git(path, "add", "pyproject.toml")
    _git(path, "commit", "-qm", "init")
    return _git(path, "rev-parse", "HEAD")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The bench package as after a plain `pip install .`: in a site-packages outside any checkout, no build record."""
    site = tmp_path / "venv" / "lib" / "site-packages" / "apt" / "bench"
    site.mkdir(parents=True)
    monkeypatch.setattr(runner, "_PACKAGE_DIR", str(site))
    monkeypatch.setattr(runner, "build_commit", lambda: None)
    return site


def test_installed_package_run_inside_the_project_checkout(tmp_path, installed, monkeypatch):
    head = _repo(tmp_path / "checkout", "apt-kernels")
    monkeypatch.chdir(tmp_path / "checkout" / "python")  # anywhere inside it
    info = runner.commit_info()
    assert info == {"git_commit": head, "git_commit_source": "working-directory checkout", "build_commit": None}
    assert runner.git_commit() == head
    (tmp_path / "checkout" / "pyproject.toml").write_text('[project]\nname = "apt-kernels"\nversion = "1"\n')
    assert runner.commit_info()["git_commit"] == head + "+dirty"


def test_an_unrelated_repository_is_not_reported(tmp_path, installed, monkeypatch):
    _repo(tmp_path / "other", "something-else")
    monkeypatch.chdir(tmp_path / "other")
    assert runner.commit_info() == {"git_commit": "unknown", "git_commit_source": None, "build_commit": None}
    monkeypatch.chdir(tmp_path)  # no repository at all
    assert runner.git_commit() == "unknown"


def test_package_checkout_wins_but_not_a_venv_inside_it(tmp_path, monkeypatch):
    head = _repo(tmp_path / "checkout", "apt-kernels")
    monkeypatch.setattr(runner, "build_commit", lambda: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "_PACKAGE_DIR", str(tmp_path / "checkout" / "python" / "apt" / "bench"))
    assert runner.commit_info()["git_commit_source"] == "package checkout"
    assert runner.commit_info()["git_commit"] == head
    venv_pkg = tmp_path / "checkout" / ".venv" / "lib" / "site-packages" / "apt" / "bench"
    venv_pkg.mkdir(parents=True)
    monkeypatch.setattr(runner, "_PACKAGE_DIR", str(venv_pkg))  # installed into a venv kept in the checkout
    assert runner.commit_info()["git_commit_source"] is None


def test_this_checkout_is_found_from_the_package_or_the_working_directory(monkeypatch):
    if not (REPO / ".git").exists():
        pytest.skip("the tests do not run from a git checkout")
    monkeypatch.chdir(REPO)
    info = runner.commit_info()
    head = _git(REPO, "rev-parse", "HEAD")
    assert info["git_commit"].split("+")[0] == head
    assert info["git_commit_source"] in ("package checkout", "working-directory checkout")


def test_build_commit_is_read_from_the_build_record_and_labelled(monkeypatch):
    monkeypatch.setitem(sys.modules, "apt_kernels._build_info",
                        types.SimpleNamespace(GIT_COMMIT="0123456789abcdef0123", GIT_DIRTY=True))
    assert runner.build_commit() == "0123456789abcdef0123+dirty"
    monkeypatch.setitem(sys.modules, "apt_kernels._build_info", types.SimpleNamespace(GIT_COMMIT=None))
    assert runner.build_commit() is None

    meta = {"git_commit": "unknown", "git_commit_source": None, "build_commit": "0123456789abcdef0123"}
    assert report.commit_text(meta) == ("commit `unknown`; package built from `0123456789abcdef0123` "
                                        "(recorded at build time; the working tree may differ)")
    assert report.short_commit(meta) == "`0123456789ab` (build)"
    meta.update(git_commit="feedface", git_commit_source="working-directory checkout")
    assert report.commit_text(meta).startswith("commit `feedface` (working-directory checkout); package built from")
    meta["build_commit"] = "feedface"  # the same: said once
    assert report.commit_text(meta) == "commit `feedface` (working-directory checkout)"
    assert report.short_commit(meta) == "`feedface`"


def test_environment_records_the_commit_and_its_source(installed, tmp_path, monkeypatch):
    import torch

    head = _repo(tmp_path / "checkout", "apt-kernels")
    monkeypatch.chdir(tmp_path / "checkout")
    monkeypatch.setattr(runner, "build_commit", lambda: "abc123")
    meta = runner.environment(torch.device("cpu"))
    assert (meta["git_commit"], meta["git_commit_source"], meta["build_commit"]) == (
        head, "working-directory checkout", "abc123")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_record(tmp_path):
    script = REPO / "cmake" / "apt_build_info.cmake"
    head = _repo(tmp_path / "src", "apt-kernels")

    def record(source: Path) -> dict:
        out = tmp_path / "_build_info.py"
        subprocess.run(["cmake", f"-DSOURCE_DIR={source}", f"-DOUTPUT={out}", "-P", str(script)], check=True,
                       capture_output=True)
        ns: dict = {}
        exec(out.read_text(), ns)
        return {"GIT_COMMIT": ns["GIT_COMMIT"], "GIT_DIRTY": ns["GIT_DIRTY"]}

    assert record(tmp_path / "src") == {"GIT_COMMIT": head, "GIT_DIRTY": False}
    (tmp_path / "src" / "pyproject.toml").write_text("changed\n")
    assert record(tmp_path / "src") == {"GIT_COMMIT": head, "GIT_DIRTY": True}
    # a source tree inside another repository (an unpacked sdist, say) is not that repository's commit
    assert record(tmp_path / "src" / "python") == {"GIT_COMMIT": None, "GIT_DIRTY": False}
    (tmp_path / "plain").mkdir()
    assert record(tmp_path / "plain") == {"GIT_COMMIT": None, "GIT_DIRTY": False}


def test_a_tree_without_git_takes_the_commit_from_apt_git_commit(tmp_path, installed, monkeypatch):
    """The GPU device tool runs a copy of the tree without .git: the result JSON said commit 'unknown'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APT_GIT_COMMIT", "0123abcd" * 5)
    assert runner.commit_info() == {"git_commit": "0123abcd" * 5, "git_commit_source": "APT_GIT_COMMIT",
                                    "build_commit": None}
    monkeypatch.setenv("APT_GIT_COMMIT", "abc1234+dirty")
    assert runner.commit_info()["git_commit"] == "abc1234+dirty"
    monkeypatch.setenv("APT_GIT_COMMIT", "not a commit; rm -rf /")
    assert runner.commit_info()["git_commit"] == "unknown"
    head = _repo(tmp_path / "checkout", "apt-kernels")  # a checkout that answers wins over the variable
    monkeypatch.chdir(tmp_path / "checkout")
    monkeypatch.setenv("APT_GIT_COMMIT", "abc1234")
    assert runner.commit_info()["git_commit"] == head
