"""BRIDGE_API_KEYS and the per-tenant limits: parsing from a file or inline, and errors that
name the setting and the line or entry but never show a key."""
from __future__ import annotations

import pytest

from settings import SettingsError, load_settings

KEY_A, KEY_B = "alpha-secret-1", "beta-secret-2"


def settings_with(tmp_path, **values):
    base = {"DATA_DIR": str(tmp_path / "data"), "WORKFLOW_DIR": str(tmp_path)}
    return load_settings({**base, **values}, env={}, dotenv_path=None)


def refused(tmp_path, **values) -> str:
    with pytest.raises(SettingsError) as info:
        settings_with(tmp_path, **values)
    message = str(info.value)
    assert message.startswith("BRIDGE_API_KEYS: ")
    for secret in (KEY_A, KEY_B, "lonely-key"):
        assert secret not in message
    return message


def test_no_key_at_all_is_the_tenant_default_alone(tmp_path):
    settings = settings_with(tmp_path)
    assert settings.api_keys == {} and settings.tenants == ("default",)
    assert (settings.tenant_max_running, settings.tenant_max_queued) == (0, 0)


def test_inline_list(tmp_path):
    settings = settings_with(tmp_path, BRIDGE_API_KEYS=f" a:{KEY_A} , b.team-2 : {KEY_B},")
    assert settings.api_keys == {"a": KEY_A, "b.team-2": KEY_B}
    assert settings.tenants == ("a", "b.team-2")
    assert KEY_A not in repr(settings)


def test_file_with_comments_and_blank_lines(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants\n\na:{KEY_A}\n  # b is new\nb:{KEY_B}:with-colon\n")
    settings = settings_with(tmp_path, BRIDGE_API_KEYS=str(keys))
    assert settings.api_keys == {"a": KEY_A, "b": f"{KEY_B}:with-colon"}


def test_the_single_key_stays_and_is_the_tenant_default(tmp_path):
    settings = settings_with(tmp_path, BRIDGE_API_KEY="old-key", BRIDGE_API_KEYS=f"a:{KEY_A}")
    assert settings.api_keys == {"default": "old-key", "a": KEY_A}
    assert settings.tenants == ("default", "a")


def test_limits_are_parsed(tmp_path):
    settings = settings_with(tmp_path, TENANT_MAX_RUNNING="2", TENANT_MAX_QUEUED="50")
    assert (settings.tenant_max_running, settings.tenant_max_queued) == (2, 50)
    with pytest.raises(SettingsError, match="TENANT_MAX_QUEUED"):
        settings_with(tmp_path, TENANT_MAX_QUEUED="-1")


def test_errors_name_the_entry_and_never_the_key(tmp_path):
    assert "entry 2 is not name:key" in refused(tmp_path, BRIDGE_API_KEYS=f"a:{KEY_A},{KEY_B}")
    assert "entry 2: tenant 'b' has no key" in refused(tmp_path, BRIDGE_API_KEYS=f"a:{KEY_A},b:")
    assert "tenant name 'a b' is invalid" in refused(tmp_path, BRIDGE_API_KEYS=f"a b:{KEY_A}")
    assert "entry 2: tenant 'a' is listed twice (entry 1)" in refused(
        tmp_path, BRIDGE_API_KEYS=f"a:{KEY_A},a:{KEY_B}")
    assert "entry 2: tenant 'b' has the same key as entry 1 (tenant 'a')" in refused(
        tmp_path, BRIDGE_API_KEYS=f"a:{KEY_A},b:{KEY_A}")
    assert "invalid" in refused(tmp_path, BRIDGE_API_KEYS=f"{'n' * 65}:{KEY_A}")


def test_errors_in_a_file_name_its_line(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants\na:{KEY_A}\n\nb {KEY_B}\n")
    assert f"line 4 of {keys} is not name:key" in refused(tmp_path, BRIDGE_API_KEYS=str(keys))


def test_a_missing_file_or_a_lone_key_is_refused_without_showing_it(tmp_path):
    message = refused(tmp_path, BRIDGE_API_KEYS="lonely-key")
    assert "not a readable file" in message and "name:key" in message


def test_the_single_key_and_the_list_stay_apart(tmp_path):
    assert "tenant 'default' is BRIDGE_API_KEY's" in refused(
        tmp_path, BRIDGE_API_KEY=KEY_B, BRIDGE_API_KEYS=f"default:{KEY_A}")
    assert "tenant 'a' has the same key as BRIDGE_API_KEY" in refused(
        tmp_path, BRIDGE_API_KEY=KEY_A, BRIDGE_API_KEYS=f"a:{KEY_A}")


def test_inline_keys_on_the_command_line_are_warned_about_a_file_is_not(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    def start(value):
        return subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--bridge-api-keys", value, "--port", "abc",
                               "--env-file", str(tmp_path / "none")], capture_output=True, text=True, timeout=30,
                              cwd=ROOT)

    inline = start(f"a:{KEY_A}")
    assert inline.returncode == 2 and "--bridge-api-keys are visible to other users" in inline.stderr
    assert KEY_A not in inline.stderr
    keys = tmp_path / "keys"
    keys.write_text(f"a:{KEY_A}\n")
    from_file = start(str(keys))
    assert from_file.returncode == 2 and "warning" not in from_file.stderr
