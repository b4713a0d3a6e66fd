"""Shared fixtures. Everything runs in-process on free loopback ports.

Fixtures:
- `sim_factory`: `await sim_factory(name=..., tick_seconds=...)` starts a SimulatedComfy;
  all are stopped at teardown.
- `bridge_factory`: `await bridge_factory(sims, **settings)` starts a Bridge (tmp DATA_DIR,
  the repo's workflows) in front of those simulators; returns a `RunningBridge`. One bridge
  per DATA_DIR: `await running.stop()` before starting another on the same one.
- `sim`, `bridge`: one simulator and a bridge in front of it, ready (backend up);
  `@pytest.mark.bridge_settings(MAX_INFLIGHT_PER_SERVER=1)` gives that bridge other settings.
- `api`: an `Api` client bound to `bridge` (HTTP + websocket helpers with timeouts).
- `sim_profile`: the profile the `sim` fixture imitates. None (= the simulator's default)
  unless the test or its module is marked `@pytest.mark.all_profiles` (module:
  `pytestmark = pytest.mark.all_profiles`): then the test runs once per profile
  (`ALL_PROFILES`), with ids like `test_x[current]`. `all_profiles(xfail={"legacy": "why"})`
  marks the run on those profiles xfail(strict=True); `all_profiles("0.3.64", "current")`
  limits the runs to the profiles named.
"""
from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path

import pytest
import ujson
from PIL import Image
from tornado import httpclient, websocket

from bridge import Bridge
from comfysim.testing import wait_until
from settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
ALL_PROFILES = ("legacy", "0.3.64", "current")


def pytest_configure(config):
    config.addinivalue_line("markers", "bridge_settings(**settings): settings of the `bridge` fixture")
    config.addinivalue_line(
        "markers", "all_profiles(*profiles, xfail={profile: reason}): run the test against every "
        "simulator profile (the `sim` fixture reads `sim_profile`)")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("all_profiles")
    if marker is None or "sim_profile" not in metafunc.fixturenames:
        return
    xfails = marker.kwargs.get("xfail", {})
    unknown = set(marker.args) - set(ALL_PROFILES) | set(xfails) - set(ALL_PROFILES)
    assert not unknown, f"all_profiles: unknown profile(s) {sorted(unknown)}"
    params = [pytest.param(p, id=p, marks=[pytest.mark.xfail(strict=True, reason=xfails[p])] if p in xfails else [])
              for p in (marker.args or ALL_PROFILES)]
    metafunc.parametrize("sim_profile", params, indirect=True)


# Poll a sync or async predicate until truthy, with a deadline (shared with the simulator's tests).
wait_for = wait_until


def png_bytes(width: int = 16, height: int = 12, seed: int = 1) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 13 + seed) % 256, (y * 29 + seed) % 256, (x * y + seed) % 256)
                   for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def multipart(parts: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """parts: (field name, file name, data, content type) -> (body, content-type header)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for field, filename, data, ctype in parts:
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                  f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def parse_multipart(body: bytes, content_type: str) -> list[dict]:
    """Minimal multipart/form-data parser for checking /history responses."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append({"headers": headers, "data": data[:-2]})
    return parts


class Api:
    def __init__(self, base: str, api_key: str | None = None):
        self.base = base
        self.ws_base = base.replace("http://", "ws://")
        self.api_key = api_key
        self.http = httpclient.AsyncHTTPClient(force_instance=True)
        self.sockets: list[StatusSocket] = []

    def close(self) -> None:
        for socket in self.sockets:
            socket.close()
        self.http.close()

    async def fetch(self, path: str, method: str = "GET", body=None, headers=None,
                    timeout: float = TIMEOUT) -> httpclient.HTTPResponse:
        headers = dict(headers or {})
        if self.api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if isinstance(body, (dict, list)):
            body = ujson.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if method == "POST" and body is None:
            body = b""
        return await self.http.fetch(self.base + path, method=method, body=body, headers=headers,
                                     request_timeout=timeout, raise_error=False)

    async def json(self, path: str, method: str = "GET", body=None, expect: int = 200, **kw):
        response = await self.fetch(path, method, body, **kw)
        assert response.code == expect, (path, response.code, response.body)
        return ujson.loads(response.body) if response.body else None

    async def upload(self, data: bytes, field: str = "file", filename: str = "in.png",
                     ctype: str = "image/png") -> str:
        body, content_type = multipart([(field, filename, data, ctype)])
        saved = await self.json("/upload", "POST", body, headers={"Content-Type": content_type})
        return saved[field]

    async def generate(self, client_id: str, body: dict, expect: int = 200):
        return await self.json(f"/generate-based-workflow?clientId={client_id}", "POST", body, expect=expect)

    async def ws(self, client_id: str) -> "StatusSocket":
        connection = await websocket.websocket_connect(
            httpclient.HTTPRequest(f"{self.ws_base}/ws?clientId={client_id}", connect_timeout=TIMEOUT,
                                   request_timeout=TIMEOUT,
                                   headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else None))
        socket = StatusSocket(connection)
        self.sockets.append(socket)
        return socket

    async def history(self, client_id: str, expect: int = 200) -> list[dict]:
        response = await self.fetch(f"/history?clientId={client_id}")
        assert response.code == expect, (response.code, response.body, response.headers.get("X-Bridge-Detail"))
        if expect != 200:
            return []
        return parse_multipart(response.body, response.headers["Content-Type"])

    async def wait_status(self, client_id: str, *statuses: str, timeout: float = TIMEOUT) -> dict:
        """Poll /execution-info until its status is one of `statuses`."""
        async def check():
            info = await self.json(f"/execution-info?clientId={client_id}")
            return info if info["status"] in statuses else None
        return await wait_for(check, timeout, interval=0.02, what=f"{client_id} to reach {statuses}")


class StatusSocket:
    def __init__(self, connection):
        self.connection = connection
        self.messages: list[dict] = []

    async def next(self, timeout: float = TIMEOUT) -> dict | None:
        raw = await asyncio.wait_for(self.connection.read_message(), timeout)
        if raw is None:
            return None
        message = ujson.loads(raw)
        self.messages.append(message)
        return message

    async def until(self, *statuses: str, timeout: float = TIMEOUT) -> dict:
        """Read until a message with one of `statuses` (skipping others); fail on close."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await self.next(max(left, 0.001))
            if message is None:
                raise AssertionError(f"socket closed before {statuses}; got {self.messages}")
            if message["status"] in statuses:
                return message

    async def closed(self, timeout: float = TIMEOUT) -> list[dict]:
        """Read to the server's close; returns the messages seen on the way."""
        while await self.next(timeout) is not None:
            pass
        return self.messages

    def close(self) -> None:
        self.connection.close()


class RunningBridge:
    def __init__(self, bridge: Bridge, port: int, sims: list):
        self.bridge = bridge
        self.port = port
        self.sims = sims
        self.url = f"http://127.0.0.1:{port}"
        self.stopped = False

    @property
    def service(self):
        return self.bridge.service

    def api(self, api_key: str | None = None) -> Api:
        return Api(self.url, api_key)

    async def stop(self) -> None:
        """Stop it before the test ends (e.g. to start another on its DATA_DIR)."""
        if not self.stopped:
            self.stopped = True
            await self.bridge.stop()


@pytest.fixture
def sim_profile(request):
    """The profile of the `sim` fixture: None (the simulator's default) unless parametrized."""
    return getattr(request, "param", None)


@pytest.fixture
async def sim_factory():
    from comfysim import SimulatedComfy
    started = []

    async def make(name: str = "sim", tick_seconds: float = 0.02, profile: str | None = None, **kwargs):
        sim = SimulatedComfy(name=name, tick_seconds=tick_seconds, profile=profile, **kwargs)
        await sim.start(port=0)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def bridge_factory(tmp_path):
    running = []

    async def make(sims: list, wait_up: bool = True, **overrides) -> RunningBridge:
        values = {
            "COMFYUI_SERVERS": ",".join(sim.address for sim in sims),
            "DATA_DIR": str(tmp_path / f"data{len(running)}"),
            "WORKFLOW_DIR": str(ROOT / "workflows"),
            "WORKFLOW_ALIAS": str(ROOT / "workflows" / "aliases.json"),
            "HOST": "127.0.0.1",
            "PORT": "0",
            "LOGGING_LEVEL": "INFO",
        }
        values.update({k.upper(): str(v) for k, v in overrides.items()})
        settings = load_settings(values, env={}, dotenv_path=None)
        bridge = Bridge(settings)
        port = await bridge.start(port=0, host="127.0.0.1")
        handle = RunningBridge(bridge, port, sims)
        running.append(handle)
        if wait_up:
            for backend in bridge.service.backends:
                assert await backend.wait_up(TIMEOUT), f"backend {backend.address} never came up"
        return handle

    yield make
    for handle in running:
        await handle.stop()


@pytest.fixture
async def sim(sim_factory, sim_profile):
    return await sim_factory(name="sim-a", profile=sim_profile)


@pytest.fixture
async def bridge(sim, bridge_factory, request):
    """`@pytest.mark.bridge_settings(NAME=value, ...)` on a test or module sets its settings."""
    marker = request.node.get_closest_marker("bridge_settings")
    return await bridge_factory([sim], **(marker.kwargs if marker else {}))


@pytest.fixture
async def api(bridge):
    client = bridge.api()
    yield client
    client.close()


def new_client_id() -> str:
    return str(uuid.uuid4())


def stopped_by_id(sim, prompt_id: str, how: tuple[str, ...] = ("interrupted", "dequeued")) -> bool:
    """The bridge stopped this prompt by its id: the atomic cancel route of a current server
    (with one of `how` as its effect), or a targeted interrupt / queue delete on older ones."""
    if any(pid == prompt_id and outcome in how for pid, outcome in getattr(sim, "cancel_calls", ())):
        return True
    if "interrupted" in how and prompt_id in sim.interrupt_calls:
        return True
    return "dequeued" in how and any(m == "POST" and p.endswith("/queue") and b == {"delete": [prompt_id]}
                                     for m, p, b in sim.requests_log)
