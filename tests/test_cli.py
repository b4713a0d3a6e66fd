"""The command line of `python bridge.py` / `comfy-bridge`: the demo's address, what it says on
start, the warning for a key given as a flag, and where a setting came from."""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import demo_banner, settle_heap
from settings import load_settings, setting_source

from .conftest import ROOT
from .test_packaging import poll, stop


def start_demo(tmp_path, *args, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "demo.log"
    clean = {k: v for k, v in os.environ.items() if k not in ("HOST", "BRIDGE_API_KEY")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "bridge.py"), "--demo", "--port", "0", "--data-dir", str(tmp_path / "data"),
             *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})})
    return process, log


def test_demo_listens_on_loopback_unless_host_is_given(tmp_path):
    process, log = start_demo(tmp_path, "--env-file", str(tmp_path / "none"))
    try:
        def ready():
            assert process.poll() is None, log.read_text()
            return re.search(r"Demo bridge ready: open http://127\.0\.0\.1:(\d+)/", log.read_text())
        port = poll(ready, what="the demo to start").group(1)
        text = log.read_text()
        assert f"bridge listening on 127.0.0.1:{port} " in text  # bound there, not on 0.0.0.0
        assert "Listening on 127.0.0.1 only: other machines cannot reach it" in text
    finally:
        stop(process)


def test_demo_host_from_the_env_file_is_respected_and_the_demo_warns(tmp_path):
    env_file = tmp_path / "demo.env"
    env_file.write_text("HOST=0.0.0.0\n")
    process, log = start_demo(tmp_path, "--env-file", str(env_file))
    try:
        def ready():
            assert process.poll() is None, log.read_text()
            return "Demo bridge ready" in log.read_text()
        poll(ready, what="the demo to start")
        text = log.read_text()
        assert re.search(r"bridge listening on 0\.0\.0\.0:\d+ ", text)
        assert "other machines on the network can reach it and use it WITHOUT A KEY" in text
    finally:
        stop(process)


def test_demo_banner_says_who_can_reach_it():
    settings = load_settings({"HOST": "127.0.0.1", "DATA_DIR": "/tmp/x"}, env={}, dotenv_path=None, check_paths=False)
    assert "127.0.0.1 only" in demo_banner(settings, 8000)
    wide = settings.replace(host="0.0.0.0")
    assert "WITHOUT A KEY" in demo_banner(wide, 8000) and "open http://127.0.0.1:8000/" in demo_banner(wide, 8000)
    keyed = wide.replace(bridge_api_key="k")
    assert "asks for BRIDGE_API_KEY" in demo_banner(keyed, 8000) and "WITHOUT" not in demo_banner(keyed, 8000)
    assert "open http://192.168.1.5:8000/" in demo_banner(settings.replace(host="192.168.1.5"), 8000)
    assert "open http://[::1]:9/" in demo_banner(settings.replace(host="::1"), 9)


def test_setting_source(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9000\n")
    assert setting_source("HOST", {"HOST": "1.2.3.4"}, {}, env_file) == "the command line"
    assert setting_source("HOST", {}, {"HOST": "x"}, env_file) == "the environment"
    assert setting_source("PORT", {}, {}, env_file) == str(env_file)
    assert setting_source("HOST", {}, {}, env_file) is None
    assert setting_source("HOST", {}, {}, tmp_path / "missing") is None


@pytest.mark.parametrize("flag", ["--bridge-api-key", "--bridge-api-key="])
def test_a_key_on_the_command_line_is_warned_about(tmp_path, flag):
    args = [flag + "s3cret-value"] if flag.endswith("=") else [flag, "s3cret-value"]
    result = subprocess.run([sys.executable, str(ROOT / "bridge.py"), *args, "--port", "abc",
                             "--env-file", str(tmp_path / "none")], capture_output=True, text=True, timeout=30,
                            cwd=ROOT)
    assert result.returncode == 2  # the bad port stops it; the warning came first
    warning, bad = result.stderr.strip().splitlines()
    assert "--bridge-api-key is visible to other users" in warning and "BRIDGE_API_KEY in the environment" in warning
    assert "s3cret-value" not in result.stderr
    assert "PORT" in bad


def test_a_key_from_the_environment_is_not_warned_about(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--port", "abc", "--env-file",
                             str(tmp_path / "none")], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "BRIDGE_API_KEY": "from-env"})
    assert result.returncode == 2 and "warning" not in result.stderr


def test_settle_heap_takes_what_exists_out_of_the_collectors_walks():
    try:
        kept = [[i] for i in range(1000)]  # tracked objects alive at start-up
        assert settle_heap() >= len(kept)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
