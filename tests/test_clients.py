"""The example clients (clients/*.py) and the curl scripts (scripts/*.sh) against a bridge.

They run as subprocesses; the bridge runs in this test's event loop, so the subprocesses are
awaited with asyncio (a blocking subprocess.run would stall the bridge).
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import ujson
from PIL import Image

from .conftest import ROOT, TIMEOUT, new_client_id, parse_multipart, png_bytes, wait_for

CLIENTS = ROOT / "clients"
SCRIPTS = ROOT / "scripts"


async def run(*command, env: dict | None = None, cwd: Path = ROOT, timeout: float = 40.0):
    """-> (exit status, stdout, stderr) of a subprocess, without blocking the loop."""
    # A key in the developer's own environment must not leak into the tests.
    full_env = {k: v for k, v in os.environ.items() if k not in ("BRIDGE", "BRIDGE_API_KEY")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    process = await asyncio.create_subprocess_exec(
        *map(str, command), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=full_env, cwd=str(cwd))
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"{command} did not finish in {timeout}s")
    return process.returncode, out.decode(), err.decode()


async def client(name: str, *args, env: dict | None = None):
    return await run(sys.executable, CLIENTS / name, *args, env=env)


def assert_inverted(result: Path | bytes, source: bytes) -> None:
    data = result.read_bytes() if isinstance(result, Path) else result
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "the saved result is not a PNG"
    got = Image.open(io.BytesIO(data)).convert("RGB")
    original = Image.open(io.BytesIO(source)).convert("RGB")
    assert got.size == original.size
    assert got.tobytes() == bytes(255 - value for value in original.tobytes())


@pytest.fixture
def source_png(tmp_path) -> tuple[Path, bytes]:
    data = png_bytes(24, 16, seed=11)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    return path, data


# ------------------------------------------------------------------------------- clients

@pytest.mark.parametrize("name", ["ws_example.py", "rest_example.py"])
async def test_example_client_inverts_an_uploaded_png(name, bridge, source_png, tmp_path):
    path, data = source_png
    out = tmp_path / "out"
    code, stdout, stderr = await client(name, "--server", bridge.url, "--workflow", "invert",
                                        "--file", f"1/image={path}", "--out", out, "--client-id", "cli-1")
    assert code == 0, (stdout, stderr)
    assert "uploaded 1/image:" in stdout and "queued / 1" in stdout
    saved = sorted(out.iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".png"
    assert f"saved {saved[0]}" in stdout
    assert_inverted(saved[0], data)
    # The job's life cycle ended with the history fetch.
    assert bridge.service.get("cli-1") is None


@pytest.mark.parametrize("name", ["ws_example.py", "rest_example.py"])
async def test_example_client_draws_progress(name, sim, bridge, source_png, tmp_path):
    sim.tick_seconds = 0.05
    path, _ = source_png
    code, stdout, stderr = await client(name, "--server", bridge.url, "--workflow", "slow-progress",
                                        "--file", f"1/image={path}", "--input", "2/steps=12",
                                        "--out", tmp_path / "out")
    assert code == 0, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.startswith("progress ")]
    assert lines and lines[-1] == "progress 100.00%"  # not a terminal: one line per 10 % step
    assert len(list((tmp_path / "out").iterdir())) == 1


@pytest.mark.parametrize("name", ["ws_example.py", "rest_example.py"])
async def test_example_client_reports_errors(name, bridge, tmp_path):
    code, stdout, stderr = await client(name, "--server", bridge.url, "--workflow", "blank-image",
                                        "--input", "1/widht=5", "--out", tmp_path)
    assert code == 1
    assert "unknown input '1/widht' for workflow 'blank-image'" in stderr
    assert "Traceback" not in stderr

    code, _, stderr = await client(name, "--server", bridge.url, "--file", "1/image=/no/such.png",
                                   "--workflow", "invert")
    assert code == 1 and "/no/such.png" in stderr

    code, stdout, _ = await client(name, "--server", bridge.url)
    assert code == 2 and "invert" in stdout and "slow-progress" in stdout

    code, _, stderr = await client(name, "--input", "no-equals-sign")
    assert code == 2 and "KEY=VALUE" in stderr


async def test_example_clients_with_an_api_key(sim, bridge_factory, source_png, tmp_path):
    running = await bridge_factory([sim], bridge_api_key="k")
    path, data = source_png
    for name in ("ws_example.py", "rest_example.py"):
        code, _, stderr = await client(name, "--server", running.url, "--workflow", "invert",
                                       "--file", f"1/image={path}", "--out", tmp_path / name)
        assert code == 1 and "401" in stderr, stderr
        code, stdout, stderr = await client(name, "--server", running.url, "--workflow", "invert",
                                            "--file", f"1/image={path}", "--out", tmp_path / name,
                                            env={"BRIDGE_API_KEY": "k"})
        assert code == 0, (stdout, stderr)
        [saved] = (tmp_path / name).iterdir()
        assert_inverted(saved, data)


async def test_ws_example_job_error_exits_non_zero(sim, bridge, source_png, tmp_path):
    sim.tick_seconds = 0.2
    path, _ = source_png
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "ws_example.py"), "--server", bridge.url, "--workflow", "slow-progress",
        "--file", f"1/image={path}", "--input", "2/steps=200", "--client-id", "cli-err", "--out", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    api = bridge.api()
    try:
        await wait_for(lambda: bridge.service.get("cli-err") is not None, what="the job to be queued")
        await api.wait_status("cli-err", "progress")
        await api.json("/interrupt?clientId=cli-err", "POST")
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        api.close()
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 1
    assert "the job failed: interrupted" in err.decode()


def test_client_helpers():
    spec = importlib.util.spec_from_file_location("bridge_client", CLIENTS / "bridge_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.input_value("42") == 42
    assert module.input_value("1.5") == 1.5
    assert module.input_value("true") is True
    assert module.input_value('"42"') == "42"
    assert module.input_value("a red fox") == "a red fox"
    assert module.safe_name("../../etc/passwd", "result_0") == "passwd"
    assert module.safe_name("..", "result_0") == "result_0"
    assert module.safe_name("a\\b\\c.png", "r") == "c.png"
    assert module.parse_args("x", ["--workflow", "invert"]).out == Path("out")  # git-ignored


# ------------------------------------------------------------------------------- curl scripts

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


async def script(name: str, *args, bridge, cwd: Path = ROOT, env: dict | None = None):
    return await run("bash", SCRIPTS / name, *args, env={"BRIDGE": bridge.url, **(env or {})}, cwd=cwd)


@needs_curl
async def test_curl_scripts_run_a_job_end_to_end(sim, bridge, source_png, tmp_path):
    path, data = source_png
    client_id = new_client_id()

    code, out, err = await script("workflow-list.sh", bridge=bridge)
    assert code == 0 and "invert" in ujson.loads(out), err
    assert "+ curl -X GET" in err  # each script shows its command

    code, out, _ = await script("workflow-info.sh", "invert", bridge=bridge)
    assert code == 0 and ujson.loads(out)["1/image"]["upload"] is True

    # Several -F parts in one request.
    second = tmp_path / "second.png"
    second.write_bytes(png_bytes(8, 8, seed=2))
    code, out, err = await script("upload.sh", f"1/image={path}", second, bridge=bridge)
    assert code == 0, err
    saved = ujson.loads(out)
    assert set(saved) == {"1/image", "file_2"}

    if shutil.which("wscat") is None:
        code, out, _ = await script("ws.sh", client_id, bridge=bridge)
        assert code == 0 and f"ws://127.0.0.1:{bridge.port}/ws?clientId={client_id}" in out

    body = ujson.dumps({"workflow": "invert", "1/image": saved["1/image"]})
    code, out, err = await script("generate.sh", client_id, body, bridge=bridge)
    assert code == 0, err
    assert ujson.loads(out)["detail"].startswith("queued / ")

    async def finished():
        code, out, _ = await script("execution-info.sh", client_id, bridge=bridge)
        assert code == 0
        return ujson.loads(out)["status"] == "closed"
    await wait_for(finished, TIMEOUT, interval=0.1, what="execution-info.sh to say closed")

    code, out, _ = await script("free.sh", client_id, bridge=bridge)
    assert code == 0 and ujson.loads(out)["detail"] == f"server memory free now / {client_id}"
    code, out, _ = await script("free.sh", "--all", bridge=bridge)
    assert code == 0 and ujson.loads(out)["detail"] == "server memory free now / ALL"

    # Without OUTPUT the body goes to out/ (git-ignored) under the current folder.
    code, out, err = await script("history.sh", client_id, bridge=bridge, cwd=tmp_path)
    assert code == 0, (out, err)
    assert "bridge_invert_" in out
    target = tmp_path / "out" / f"history-{client_id}.multipart"
    assert f"to out/history-{client_id}.multipart" in out
    raw = target.read_bytes()
    boundary = raw.split(b"\r\n", 1)[0][2:].decode()
    [part] = parse_multipart(raw, f"multipart/form-data; boundary={boundary}")
    assert part["headers"]["content-type"] == "image/png"
    assert_inverted(part["data"], data)

    code, out, _ = await script("history.sh", client_id, bridge=bridge, cwd=tmp_path)
    assert code == 3 and "It is not recognized" in out
    assert [p.name for p in (tmp_path / "out").iterdir()] == [target.name]  # no file for a 204

    code, out, _ = await script("generation-count.sh", bridge=bridge)
    assert code == 0 and int(out) == 1


@needs_curl
async def test_curl_scripts_interrupt_and_errors(sim, bridge, tmp_path):
    sim.tick_seconds = 0.2
    client_id = new_client_id()
    code, out, err = await script("generate.sh", client_id,
                                  '{"workflow": "slow-progress", "2/steps": 200}', bridge=bridge)
    assert code == 0, err
    code, out, _ = await script("interrupt.sh", client_id, bridge=bridge)
    assert code == 0
    assert ujson.loads(out)["detail"] == f"interrupted that clientId will be ignored. / {client_id}"
    code, out, _ = await script("execution-info.sh", client_id, bridge=bridge)
    assert ujson.loads(out) == {"status": "error", "detail": "interrupted", "details": "interrupted"}
    code, out, _ = await script("history.sh", client_id, bridge=bridge, cwd=tmp_path)
    assert code == 22 and "interrupted" in out

    # Errors: the bridge's detail is printed, the exit status says it failed.
    code, out, _ = await script("generate.sh", "cid-2", "no-such-workflow", bridge=bridge)
    assert code == 22 and "no-such-workflow" in ujson.loads(out)["detail"]
    code, out, _ = await script("interrupt.sh", "never-seen", bridge=bridge)
    assert code == 22 and "not recognized" in ujson.loads(out)["detail"]
    code, _, err = await script("interrupt.sh", bridge=bridge)
    assert code == 2 and "usage: interrupt.sh CLIENT_ID" in err


@needs_curl
async def test_curl_scripts_send_the_api_key(sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_key="s3cret")
    code, out, _ = await script("workflow-list.sh", bridge=running)
    assert code == 22 and "API key" in ujson.loads(out)["detail"]
    code, out, err = await script("workflow-list.sh", bridge=running, env={"BRIDGE_API_KEY": "s3cret"})
    assert code == 0 and "invert" in ujson.loads(out)
    assert "s3cret" not in err  # the printed command does not show the key


SCRIPT_NAMES = sorted(p.name for p in SCRIPTS.glob("*.sh") if not p.name.startswith("_"))
NOWHERE = "http://127.0.0.1:9"  # nothing listens: a script that sent a request would fail (curl: 7)


@needs_curl
@pytest.mark.parametrize("name", SCRIPT_NAMES)
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["demo-1", "--help"]])
async def test_scripts_help_sends_nothing(name, args, tmp_path):
    code, out, err = await run("bash", SCRIPTS / name, *args, env={"BRIDGE": NOWHERE}, cwd=tmp_path)
    assert code == 0, (out, err)
    assert out.startswith(f"usage: {name}")
    assert "Environment: BRIDGE" in out and "BRIDGE_API_KEY" in out
    assert "+ curl" not in err and err == ""  # no request shown, none made
    assert not list(tmp_path.iterdir())  # and no file written


@needs_curl
async def test_scripts_refuse_unknown_options_and_free_needs_all(tmp_path):
    code, _, err = await run("bash", SCRIPTS / "interrupt.sh", "--bogus", env={"BRIDGE": NOWHERE})
    assert code == 2 and "unknown option '--bogus'" in err and "+ curl" not in err
    code, _, err = await run("bash", SCRIPTS / "free.sh", env={"BRIDGE": NOWHERE})
    assert code == 2 and "+ curl" not in err
    assert "give a CLIENT_ID (frees that job's backend), or --all to free every backend" in err
    code, _, err = await run("bash", SCRIPTS / "free.sh", "--all", "demo-1", env={"BRIDGE": NOWHERE})
    assert code == 2 and "either a CLIENT_ID or --all" in err
    code, _, err = await run("bash", SCRIPTS / "workflow-list.sh", "extra", env={"BRIDGE": NOWHERE})
    assert code == 2 and "takes no arguments" in err
    # After "--", an argument that looks like an option is sent as it is (here: refused by the bridge's
    # clientId check, had a bridge listened); curl's failure to connect proves it was sent.
    code, _, err = await run("bash", SCRIPTS / "interrupt.sh", "--", "--help", env={"BRIDGE": NOWHERE})
    assert code == 7 and "clientId=--help" in err
