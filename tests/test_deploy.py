"""deploy/: the systemd unit and its settings file agree with the bridge and with the nginx
configuration (tests/test_nginx.py runs that one for real)."""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
from dotenv import dotenv_values

from bridge import parse_args
from settings import OPTIONS, load_settings

from .conftest import ROOT

DEPLOY = ROOT / "deploy"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "comfy-bridge.service").read_text())
    return parser


def test_unit_runs_the_installed_command_with_the_settings_file():
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0].endswith("/bin/comfy-bridge") and "comfy-bridge" in scripts
    args = parse_args(command[1:])  # options the bridge takes
    assert args.env_file == "/etc/comfy-bridge/env"
    assert not any("api-key" in word or "API_KEY" in word for word in command)  # never on the command line
    assert service["KillSignal"] == "SIGTERM"  # what bridge.serve() stops cleanly on
    assert service["StateDirectory"] == "comfy-bridge" and service["User"] == "comfy-bridge"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_settings_file_is_valid_and_matches_nginx_and_the_unit(tmp_path):
    values = dotenv_values(DEPLOY / "comfy-bridge.env")
    assert set(values) <= {opt.key for opt in OPTIONS}
    settings = load_settings(env={}, dotenv_path=DEPLOY / "comfy-bridge.env", check_paths=False)
    assert settings.host == "127.0.0.1"
    assert str(settings.data_dir) == "/var/lib/" + unit()["Service"]["StateDirectory"]
    assert unit()["Service"]["WorkingDirectory"] == str(settings.data_dir)
    nginx = (DEPLOY / "nginx" / "comfy-bridge.conf").read_text()
    assert f"server {settings.host}:{settings.port};" in nginx
    # nginx lets through what the bridge accepts: UPLOAD_MAX_SIZE plus the multipart framing.
    body_limit = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    assert settings.upload_max_size < body_limit <= settings.upload_max_size + 2
    assert f"client_body_timeout {int(settings.body_timeout)}s;" in nginx


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit's keys are checked above)")
    copy = tmp_path / "comfy-bridge.service"
    copy.write_text((DEPLOY / "comfy-bridge.service").read_text()
                    .replace("/opt/comfy-bridge/venv/bin/comfy-bridge", shutil.which("true") or "/bin/true"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines()
                if "comfy-bridge.service" in line and "User" not in line and "Group" not in line]
    assert not problems, result.stderr
