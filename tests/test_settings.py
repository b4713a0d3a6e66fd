"""Settings: defaults, precedence, and a clear one-line refusal of bad values."""
import subprocess
import sys

import pytest

from settings import OPTIONS, SettingsError, load_settings
from tests.conftest import ROOT


def settings_with(tmp_path, **values):
    base = {"WORKFLOW_DIR": str(ROOT / "workflows"), "DATA_DIR": str(tmp_path / "data")}
    base.update(values)
    return load_settings(base, env={}, dotenv_path=None)


def test_defaults(tmp_path):
    s = settings_with(tmp_path)
    assert s.port == 8000 and s.host == "0.0.0.0"
    assert s.comfyui_servers == ("127.0.0.1:8188",)
    assert s.execution_timeout == 300 and s.heartbeat_interval == 1 and s.result_ttl == 3600
    assert s.upload_max_size == 100 and s.upload_max_bytes == 100 * 1024 * 1024
    assert s.max_inflight_per_server == 2 and s.free_after_n_generations == 0
    assert s.models_kept_per_server == 2
    assert s.current_state == tmp_path / "data" / "current_state.json"


def test_precedence_dotenv_env_override(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=1111\nHEARTBEAT_INTERVAL=2\nMAX_RETRIES=5\n")
    s = load_settings({"WORKFLOW_DIR": str(ROOT / "workflows"), "DATA_DIR": str(tmp_path / "d"), "PORT": "3333"},
                      env={"PORT": "2222", "HEARTBEAT_INTERVAL": "3"}, dotenv_path=dotenv)
    assert s.port == 3333            # override beats environment
    assert s.heartbeat_interval == 3  # environment beats .env
    assert s.max_retries == 5         # .env beats default


def test_servers_parsed(tmp_path):
    s = settings_with(tmp_path, COMFYUI_SERVERS=" 127.0.0.1:8188, http://gpu2:8189/ ,[::1]:9000")
    assert s.comfyui_servers == ("127.0.0.1:8188", "gpu2:8189", "[::1]:9000")


@pytest.mark.parametrize("key,value", [
    ("PORT", "abc"), ("PORT", "70000"), ("COMFYUI_SERVERS", "gpu2"), ("COMFYUI_SERVERS", "a:1,a:1"),
    ("COMFYUI_SERVERS", ""), ("EXECUTION_TIMEOUT", "-1"), ("EXECUTION_TIMEOUT", "soon"),
    ("MAX_INFLIGHT_PER_SERVER", "0"), ("LOGGING_LEVEL", "LOUD"), ("UPLOAD_MAX_SIZE", "1.5"),
])
def test_bad_value_names_key_and_value(tmp_path, key, value):
    with pytest.raises(SettingsError) as info:
        settings_with(tmp_path, **{key: value})
    message = str(info.value)
    assert message.startswith(f"{key}: ") and repr(value) in message


def test_unreadable_workflow_dir(tmp_path):
    with pytest.raises(SettingsError, match="WORKFLOW_DIR: .*missing"):
        settings_with(tmp_path, WORKFLOW_DIR=str(tmp_path / "missing"))


def run_bridge(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bridge.py"), *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=env)


def test_bad_setting_stops_startup_with_one_line(tmp_path):
    result = run_bridge("--port", "abc", "--data-dir", str(tmp_path / "d"), "--env-file", str(tmp_path / "none"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PORT" in lines[0] and "'abc'" in lines[0]


def test_help_lists_every_option():
    result = run_bridge("--help")
    assert result.returncode == 0
    for opt in OPTIONS:
        assert opt.key in result.stdout
    assert "--demo" in result.stdout


def test_env_example_and_readme_document_every_option():
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for opt in OPTIONS:
        assert f"\n{opt.key}=" in example, opt.key
        assert f"| `{opt.key}` |" in readme, opt.key


def test_every_option_is_a_settings_field_and_back():
    from dataclasses import fields

    from settings import Settings
    assert [opt.key.lower() for opt in OPTIONS] == [f.name for f in fields(Settings)]
