"""./run, as a new user meets it: its usage, the Python check, the .venv it makes and remakes.

Each test runs a copy of `run` in its own folder (never this checkout's .venv). The copy's
requirements.txt pins nothing, so "installing" takes no download.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def run_script(folder: Path, *args: str, python: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder)}
    if python:
        env["PYTHON"] = python
    return subprocess.run(["bash", str(folder / "run"), *args], capture_output=True, text=True, cwd=folder,
                          env=env, timeout=90, stdin=subprocess.DEVNULL)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copy2(ROOT / "run", tmp_path / "run")
    (tmp_path / "requirements.txt").write_text("# nothing to install in this test\n-r requirements-extra.txt\n")
    (tmp_path / "requirements-extra.txt").write_text("# pins nothing either\n")
    return tmp_path


def fake_python(folder: Path, name: str, version: str, prefix: str = "/opt/elsewhere") -> str:
    """An interpreter that only answers the version questions ./run asks."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\ncase \"$2\" in\n  *base_prefix*) echo '{version} {prefix}' ;;\n"
                    f"  *) echo '{version}' ;;\nesac\n")
    path.chmod(0o755)
    return str(path)


def test_usage_without_a_command_is_its_text_not_its_code(copy):
    result = run_script(copy)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: ./run COMMAND")
    for command in ("./run demo", "./run test", "./run bridge", "./run python"):
        assert command in result.stdout
    assert "set -euo" not in result.stdout and "exec " not in result.stdout
    assert run_script(copy, "--help").stdout == result.stdout
    assert not (copy / ".venv").exists()


def test_unknown_command(copy):
    result = run_script(copy, "dmeo")
    assert result.returncode == 2
    assert result.stderr.startswith("run: unknown command 'dmeo'\nusage: ./run")


def test_an_old_python_is_refused_in_one_line_before_anything_is_made(copy):
    old = fake_python(copy / "bin", "python3.10", "3.10.13")
    result = run_script(copy, "demo", python=old)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"run: Python 3.11 or newer is needed; '{old}' is 3.10.13 (set PYTHON=python3.11 or newer)"]
    assert not (copy / ".venv").exists()
    missing = run_script(copy, "test", python="no-such-python")
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    assert "cannot run 'no-such-python'" in missing.stderr


def test_version_check_compares_numbers_not_text(copy):
    newer = fake_python(copy / "bin", "python3.100", "3.100.0")
    result = run_script(copy, "demo", python=newer)
    assert "needed" not in result.stderr  # 3.100 passes the check (it then fails to make a venv)


def test_a_venv_made_by_another_python_is_recreated_and_then_reused(copy):
    fake_python(copy / ".venv" / "bin", "python", "3.10.13", "/opt/old-python")
    first = run_script(copy, "python", "-c", "import sys; print(sys.prefix, sys.version_info[:2] >= (3, 11))",
                       python=sys.executable)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(copy / ".venv"), "True"]
    lines = first.stderr.splitlines()
    assert lines[0] == "run: .venv was made by another Python (3.10.13 /opt/old-python); recreating it with " \
                       f"{'.'.join(map(str, sys.version_info[:3]))}"
    assert lines[1].startswith("run: creating .venv with Python ")
    assert lines[2].startswith("run: installing requirements.txt into .venv from PyPI")

    second = run_script(copy, "python", "-c", "import sys; print(sys.prefix)", python=sys.executable)
    assert second.returncode == 0 and second.stdout.strip() == str(copy / ".venv")
    assert second.stderr == ""  # reused as is: nothing made, nothing installed

    (copy / "requirements-extra.txt").write_text("# changed\n")
    third = run_script(copy, "python", "-c", "pass", python=sys.executable)
    assert third.returncode == 0 and "installing requirements.txt" in third.stderr
    assert "creating" not in third.stderr


def test_the_install_message_lists_the_pins_through_includes(tmp_path):
    (tmp_path / "x.txt").write_text("a==1 # why\n-r more.txt\n")
    (tmp_path / "more.txt").write_text("b==2\n\n  c==3  \n# only a comment\n")
    listed = subprocess.run(["bash", "-c", f"source <(sed -n '/^pins()/,/^}}/p' {ROOT / 'run'}); pins {tmp_path}/x.txt"],
                            capture_output=True, text=True, timeout=30)
    assert listed.stdout.split() == ["a==1", "b==2", "c==3"], listed.stderr
