"""Logs a person can use: one access line per request, one line per job transition, the level
from LOGGING_LEVEL, and no key in any line."""
from __future__ import annotations

import io
import logging
import re

import pytest

import bridge as bridge_module
from logs import SecretFilter, configure_logging
from tests.conftest import wait_for, new_client_id, png_bytes

KEY = "k3y-that-must-never-be-logged"


def messages(caplog, logger: str | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if logger is None or r.name == logger]


@pytest.fixture
def root_logging():
    """configure_logging changes the root logger: put it back afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("PIL").level)
    yield root
    for handler in root.handlers:
        if handler not in saved[1]:
            root.removeHandler(handler)
    root.setLevel(saved[0])
    logging.getLogger("PIL").setLevel(saved[2])


async def test_one_access_line_per_request(api, caplog):
    caplog.set_level(logging.INFO)
    client_id = new_client_id()
    await api.fetch(f"/execution-info?clientId={client_id}")
    await api.fetch("/workflow-list")
    lines = messages(caplog, "bridge.access")
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"GET /execution-info 400 \d+\.\dms clientId={client_id}", lines[0]), lines[0]
    assert re.fullmatch(r"GET /workflow-list 200 \d+\.\dms clientId=-", lines[1]), lines[1]
    levels = [r.levelno for r in caplog.records if r.name == "bridge.access"]
    assert levels == [logging.WARNING, logging.INFO]  # client errors stand out


async def test_job_transition_lines_carry_the_facts(api, bridge, sim, caplog):
    caplog.set_level(logging.INFO)
    saved = await api.upload(png_bytes())
    done = new_client_id()
    await api.generate(done, {"workflow": "invert", "1/image": saved})
    await api.wait_status(done, "closed")
    prompt_id = bridge.service.get(done).prompt_id
    failed = new_client_id()
    await api.generate(failed, {"workflow": "slow-progress", "1/image": saved, "2/steps": 400})
    # Executing on the backend, not only sent: ComfyUI clears the flag when a prompt starts.
    await wait_for(lambda: bridge.service.get(failed).percent > 0, what="slow job executing")
    sim.interrupt()
    await api.wait_status(failed, "error")

    lines = messages(caplog, "bridge.jobs")
    mine = [line for line in lines if f"clientId={done} " in line]
    assert [line.split()[1] for line in mine] == ["queued", "dispatched", "done"], mine
    done_line = mine[-1]
    assert f"prompt={prompt_id} " in done_line and f"backend={sim.address} " in done_line
    assert "workflow=invert" in done_line
    assert re.search(r"duration=\d+\.\d{3}", done_line) and "files=1" in done_line
    assert re.search(r"waited=\d+\.\d{3}", mine[1])
    failed_line = next(line for line in lines if line.startswith("job failed") and f"clientId={failed} " in line)
    assert f"backend={sim.address} " in failed_line and "reason=interrupted" in failed_line
    assert "prompt=-" not in failed_line


async def test_no_key_reaches_the_logs(sim, bridge_factory, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    running = await bridge_factory([sim], bridge_api_key=KEY)
    keyed, anonymous = running.api(KEY), running.api()
    try:
        # Key in the query, refused (401) and accepted; a bad clientId with the key beside it.
        await anonymous.fetch(f"/status?token={KEY}")
        await keyed.fetch(f"/status?token={KEY}&api_key={KEY}")
        await keyed.fetch(f"/execution-info?clientId=bad!id&token={KEY}")
        await anonymous.fetch(f"/ws?clientId=bad!id&token={KEY}")
        await anonymous.fetch("/workflow-list", headers={"Authorization": f"Bearer {KEY}x"})
        # A bug (500) logs a traceback with the request summary: scrubbed too.
        monkeypatch.setattr(running.service, "snapshot", lambda now: 1 / 0)
        broken = await keyed.fetch(f"/status?token={KEY}")
        assert broken.code == 500
    finally:
        keyed.close()
        anonymous.close()
    text = "\n".join(messages(caplog))
    assert KEY not in text
    assert "token=***" in text
    uncaught = [r for r in caplog.records if r.getMessage().startswith("Uncaught exception")]
    assert uncaught and uncaught[0].exc_info is not None
    assert "/status?token=***" in uncaught[0].getMessage()


def test_secret_filter_scrubs_whatever_reaches_the_handler():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter(KEY))
    logger = logging.getLogger("tests.secret-filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("GET %s", f"/x?token={KEY}")
        logger.warning("headers %r", {"Authorization": f"Bearer {KEY}", "X-API-Key": KEY})
        logger.warning("the key itself: %s", KEY)
        logger.warning("plain line stays as it is: %d%%", 5)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert KEY not in out
    assert "token=***" in out and "Bearer ***" in out
    assert "plain line stays as it is: 5%" in out


def test_logging_level_applies(root_logging):
    handler = configure_logging("WARNING")
    assert root_logging.level == logging.WARNING
    assert not logging.getLogger("bridge.jobs").isEnabledFor(logging.INFO)
    assert logging.getLogger("bridge.jobs").isEnabledFor(logging.WARNING)
    assert any(isinstance(f, SecretFilter) for f in handler.filters)
    configure_logging("DEBUG")
    assert logging.getLogger("bridge.backend").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("PIL.PngImagePlugin").isEnabledFor(logging.DEBUG)  # chunk chatter
    ours = [h for h in root_logging.handlers if getattr(h, "bridge_handler", False)]
    assert len(ours) == 1  # configuring again replaces, never doubles every line


LOOPBACK = ("--host", "127.0.0.1", "--port", "0")  # main() binds before it serves


def test_main_takes_the_level_from_logging_level(root_logging, monkeypatch, tmp_path):
    seen = {}

    async def fake_serve(settings, demo, lock, sockets):
        seen["level"] = settings.logging_level
        for sock in sockets:
            sock.close()
        lock.release()

    monkeypatch.setattr(bridge_module, "serve", fake_serve)
    monkeypatch.setenv("LOGGING_LEVEL", "ERROR")
    code = bridge_module.main(["--env-file", str(tmp_path / "none.env"), "--data-dir", str(tmp_path),
                               "--comfyui-servers", "127.0.0.1:1", *LOOPBACK])
    assert code == 0 and seen["level"] == "ERROR"
    assert root_logging.level == logging.ERROR
    code = bridge_module.main(["--env-file", str(tmp_path / "none.env"), "--data-dir", str(tmp_path),
                               "--comfyui-servers", "127.0.0.1:1", "--logging-level", "DEBUG", *LOOPBACK])
    assert code == 0 and root_logging.level == logging.DEBUG
