"""The clients the latency benches time a job with, each for two paths: straight to a (simulated)
ComfyUI, and through the bridge's own API.

  raw             the benches' own generator: tornado's websocket client and `_common.HttpConn`
                  (one bare HTTP/1.1 keep-alive socket, TCP_NODELAY set). Cheap, but nobody uses it.
  aiohttp-fresh   aiohttp's ClientSession (keep-alive HTTP), the bridge's per-job websocket on a
                  new TCP connection (a connector that never pools).
  aiohttp-reused  the same session for everything, as aiohttp does by default: the websocket
                  upgrade goes over a kept-alive connection a previous request left idle.
  chromium        a real browser: Debian's /usr/bin/chromium driven by Playwright; fetch() and
                  WebSocket in a page of the server's own origin, timed in the page with
                  performance.now() (Playwright's round trips are outside the clock).

bench/peer.py also drives Comfy-Org's comfy-api-proxy with aiohttp (`AiohttpPeer`).

Every client has `open()`, `close()` and `job(builder, image) -> (upload to results, generate
to results)` in seconds. `builder(name)` gives the graph (straight) or the bridge's inputs;
`name` is the uploaded input's name, or None when `image` is None. Clients whose package is
missing say so through `missing(kind)`; the benches skip them.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.parse
import uuid

import _common as c

try:
    import aiohttp
except ImportError:  # pragma: no cover - depends on the machine
    aiohttp = None
try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None

from tornado import websocket

KINDS = ("raw", "aiohttp-fresh", "aiohttp-reused", "chromium")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
TIMEOUT = 30.0  # seconds for any one wait of a job
INSTALL = ".venv/bin/pip install -r bench/requirements.txt"


def missing(kind: str) -> str | None:
    """Why the client `kind` cannot run here, or None."""
    if kind.startswith("aiohttp") and aiohttp is None:
        return f"aiohttp is not installed ({INSTALL})"
    if kind == "chromium":
        if async_playwright is None:
            return f"playwright is not installed ({INSTALL})"
        if not os.access(CHROMIUM, os.X_OK):
            return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


def is_done(msg: dict) -> str | None:
    """The prompt id a ComfyUI websocket message says has ended (`executing` of node null)."""
    data = msg.get("data") or {}
    if msg.get("type") == "executing" and data.get("node") is None:
        return data.get("prompt_id")
    return None


def view_query(entry: dict) -> str:
    out = entry["outputs"][next(iter(entry["outputs"]))]["images"][0]
    return urllib.parse.urlencode({"filename": out["filename"], "subfolder": out["subfolder"], "type": out["type"]})


def unique_name() -> str:
    return f"in-{random.getrandbits(40):x}.png"


# ----------------------------------------------------------------------------- raw

class RawDirect:
    """A ComfyUI client the usual way: one websocket for all its prompts, keep-alive HTTP."""

    def __init__(self, address: str):
        self.address = address
        host, port = address.rsplit(":", 1)
        self.http = c.HttpConn(host, int(port))
        self.client_id = str(uuid.uuid4())
        self.waiters: dict[str, asyncio.Future] = {}

    async def open(self) -> None:
        await self.http.open()
        self.ws = await websocket.websocket_connect(f"ws://{self.address}/ws?clientId={self.client_id}")
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.read_message()
            if message is None:
                return
            if isinstance(message, str):
                resolve(self.waiters, is_done(json.loads(message)))

    async def close(self) -> None:
        self.ws.close()
        self.reader.cancel()
        self.http.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        name = None
        if image is not None:
            body, ctype = c.multipart("image", unique_name(), image, fields={"overwrite": "true"})
            status, _, answer = await self.http.request("POST", "/upload/image", body, {"Content-Type": ctype})
            assert status == 200, (status, answer)
            name = json.loads(answer)["name"]
        t1 = time.perf_counter()
        prompt_id = str(uuid.uuid4())
        done = self.waiters[prompt_id] = asyncio.get_running_loop().create_future()
        status, _, answer = await self.http.request(
            "POST", "/prompt", json.dumps({"prompt": builder(name), "client_id": self.client_id,
                                           "prompt_id": prompt_id}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, (status, answer)
        await asyncio.wait_for(done, TIMEOUT)
        status, _, answer = await self.http.request("GET", f"/history/{prompt_id}")
        status, _, data = await self.http.request("GET", f"/view?{view_query(json.loads(answer)[prompt_id])}")
        assert status == 200 and data[:4] == b"\x89PNG", status
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


def resolve(waiters: dict, prompt_id: str | None) -> None:
    waiter = waiters.pop(prompt_id, None) if prompt_id else None
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class RawBridge:
    """A client of the bridge as its API says: upload, socket + generate at once, `closed`, history."""

    def __init__(self, base: str):
        self.base = base
        host, port = base.split("://", 1)[1].rsplit(":", 1)
        self.http = c.HttpConn(host, int(port))
        self.gen_http = c.HttpConn(host, int(port))

    async def open(self) -> None:
        await self.http.open()
        await self.gen_http.open()

    async def close(self) -> None:
        self.http.close()
        self.gen_http.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        client_id = f"lat-{random.getrandbits(64):x}"
        t0 = time.perf_counter()
        saved = None
        if image is not None:
            body, ctype = c.multipart("file", unique_name(), image)
            status, _, answer = await self.http.request("POST", "/upload", body, {"Content-Type": ctype})
            assert status == 200, (status, answer)
            saved = json.loads(answer)["file"]
        t1 = time.perf_counter()
        connect = websocket.websocket_connect(f"{self.base.replace('http', 'ws', 1)}/ws?clientId={client_id}")
        generate = self.gen_http.request("POST", f"/generate-based-workflow?clientId={client_id}",
                                         json.dumps(builder(saved)).encode(), {"Content-Type": "application/json"})
        ws, (status, _, answer) = await asyncio.gather(connect, generate)
        assert status == 200, (status, answer)
        try:
            while True:
                message = await asyncio.wait_for(ws.read_message(), TIMEOUT)
                assert message is not None, "socket closed before the job ended"
                msg = json.loads(message)
                if msg["status"] == "closed":
                    break
                assert msg["status"] != "error", msg
        finally:
            ws.close()
        status, _, data = await self.http.request("GET", f"/history?clientId={client_id}")
        assert status == 200 and b"\x89PNG" in data[:1024], (status, data[:200])
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


# ----------------------------------------------------------------------------- aiohttp

def _session(force_close: bool = False, trace=None):
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=force_close),
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                                 trace_configs=[trace] if trace is not None else None)


class UpgradeCounter:
    """Counts websocket upgrades that went over a new TCP connection or over a reused one
    (aiohttp's tracing), so the report can show which case a figure measured."""

    def __init__(self):
        self.new = self.reused = 0
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)
        self.config.on_connection_create_end.append(self._created)
        self.config.on_connection_reuseconn.append(self._reused)

    async def _start(self, session, ctx, params) -> None:
        ctx.upgrade = params.headers.get("Upgrade", "").lower() == "websocket"

    async def _created(self, session, ctx, params) -> None:
        self.new += getattr(ctx, "upgrade", False)

    async def _reused(self, session, ctx, params) -> None:
        self.reused += getattr(ctx, "upgrade", False)


class AiohttpDirect:
    """The straight path with aiohttp: one websocket per client, requests on the session's pool."""

    def __init__(self, address: str):
        self.base = f"http://{address}"
        self.client_id = str(uuid.uuid4())
        self.waiters: dict[str, asyncio.Future] = {}
        self.accepted = 0   # submissions answered with success (bench/peer.py counts them)

    async def open(self) -> None:
        self.session = _session()
        self.ws = await self.session.ws_connect(f"{self.base}/ws?clientId={self.client_id}")
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                resolve(self.waiters, is_done(json.loads(msg.data)))

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        name = None
        if image is not None:
            form = aiohttp.FormData()
            form.add_field("image", image, filename=unique_name(), content_type="image/png")
            form.add_field("overwrite", "true")
            async with self.session.post(f"{self.base}/upload/image", data=form) as r:
                assert r.status == 200, (r.status, await r.text())
                name = (await r.json())["name"]
        t1 = time.perf_counter()
        prompt_id = str(uuid.uuid4())
        done = self.waiters[prompt_id] = asyncio.get_running_loop().create_future()
        async with self.session.post(f"{self.base}/prompt", json={
                "prompt": builder(name), "client_id": self.client_id, "prompt_id": prompt_id}) as r:
            assert r.status == 200, (r.status, await r.text())
            await r.read()
        self.accepted += 1
        await asyncio.wait_for(done, TIMEOUT)
        async with self.session.get(f"{self.base}/history/{prompt_id}") as r:
            entry = (await r.json())[prompt_id]
        async with self.session.get(f"{self.base}/view?{view_query(entry)}") as r:
            data = await r.read()
            assert r.status == 200 and data[:4] == b"\x89PNG", r.status
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


class AiohttpBridge:
    """The bridge's API with aiohttp: the websocket `fresh` (a connector that never pools) or
    `reused` (the session's own pool, aiohttp's default, so a kept-alive connection carries it)."""

    def __init__(self, base: str, websocket_connection: str):
        self.base = base
        self.mode = websocket_connection
        self.upgrades = UpgradeCounter()
        self.accepted = 0

    async def open(self) -> None:
        self.session = _session(trace=self.upgrades.config)
        self.ws_session = self.session if self.mode == "reused" else _session(True, self.upgrades.config)

    async def close(self) -> None:
        await self.session.close()
        if self.ws_session is not self.session:
            await self.ws_session.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        client_id = f"lat-{random.getrandbits(64):x}"
        t0 = time.perf_counter()
        saved = None
        if image is not None:
            form = aiohttp.FormData()
            form.add_field("file", image, filename=unique_name(), content_type="image/png")
            async with self.session.post(f"{self.base}/upload", data=form) as r:
                assert r.status == 200, (r.status, await r.text())
                saved = (await r.json())["file"]
        t1 = time.perf_counter()

        async def generate():
            async with self.session.post(f"{self.base}/generate-based-workflow?clientId={client_id}",
                                         json=builder(saved)) as r:
                assert r.status == 200, (r.status, await r.text())
                await r.read()
            self.accepted += 1

        ws, _ = await asyncio.gather(self.ws_session.ws_connect(f"{self.base}/ws?clientId={client_id}"), generate())
        try:
            while True:
                msg = await ws.receive(timeout=TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.TEXT, f"socket ended before the job: {msg.type}"
                status = json.loads(msg.data)["status"]
                if status == "closed":
                    break
                assert status != "error", msg.data
        finally:
            await ws.close()
        async with self.session.get(f"{self.base}/history?clientId={client_id}") as r:
            data = await r.read()
            assert r.status == 200 and b"\x89PNG" in data[:1024], (r.status, data[:200])
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


class AiohttpPeer:
    """Comfy-Org's comfy-api-proxy through its v2 API with aiohttp: POST /api/v2/jobs, poll
    GET /api/v2/jobs/{id} until `succeeded` (first poll at once, then every `poll` seconds),
    GET the output asset's content. Its SSE stream (`/events`) is not used: the proxy allows 8 at
    once (a closed loop of 32 clients gets 429s), and a job that ends between the stream's first
    snapshot and its ComfyUI websocket connecting is seen only at the 15 s keep-alive."""

    TERMINAL_FAILURES = ("failed", "canceled")

    def __init__(self, base: str, poll: float):
        self.base = base
        self.poll = poll
        self.accepted = 0
        self.polls = 0
        self.expired_seen = 0   # `expired` answers for a job that then succeeded (see poll loop)

    async def open(self) -> None:
        self.session = _session()

    async def close(self) -> None:
        await self.session.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        assert image is None, "the peer client runs workflows without an input file only"
        t1 = time.perf_counter()
        async with self.session.post(f"{self.base}/api/v2/jobs", json={"workflow": builder(None)}) as r:
            assert r.status == 201, (r.status, await r.text())
            url = (await r.json())["urls"]["self"]
        self.accepted += 1
        deadline = t1 + TIMEOUT
        while True:
            async with self.session.get(url) as r:
                state = await r.json()
            self.polls += 1
            status = state["status"]
            if status == "succeeded":
                break
            assert status not in self.TERMINAL_FAILURES, state
            assert time.perf_counter() < deadline, f"job not done after {TIMEOUT}s: {state}"
            # `expired` here is the proxy's race, not the job's end: it reads /history/{id}, then
            # /queue, and a job that ends between the two is in neither. Polled again.
            self.expired_seen += status == "expired"
            if self.poll:
                await asyncio.sleep(self.poll)
        async with self.session.get(state["outputs"][0]["url"]) as r:
            data = await r.read()
            assert r.status == 200 and data[:4] == b"\x89PNG", r.status
        t2 = time.perf_counter()
        return t2 - t1, t2 - t1


# ----------------------------------------------------------------------------- chromium

class Chromium:
    """One headless Chromium for a run; `page(url)` opens a page of that origin in a context of
    its own (its own connection pool, nothing shared between the two paths)."""

    async def open(self) -> "Chromium":
        self._pw = await async_playwright().start()
        self.browser = await self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                      headless=True, timeout=30_000)
        return self

    async def page(self, url: str):
        context = await self.browser.new_context()
        page = await context.new_page()
        await page.goto(url)
        return page

    async def close(self) -> None:
        await self.browser.close()
        await self._pw.stop()


# In the page of the simulator's origin: one websocket for all prompts, as ComfyUI's own page does.
_DIRECT_SETUP = """async (clientId) => {
  window.waiters = {};
  window.ws = new WebSocket(`ws://${location.host}/ws?clientId=${clientId}`);
  window.ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') return;
    const m = JSON.parse(ev.data);
    if (m.type === 'executing' && m.data && m.data.node === null && window.waiters[m.data.prompt_id]) {
      window.waiters[m.data.prompt_id]();
      delete window.waiters[m.data.prompt_id];
    }
  };
  await new Promise((ok, fail) => { window.ws.onopen = ok; window.ws.onerror = fail; });
}"""

_DIRECT_JOB = """async ({graph, promptId, clientId}) => {
  const t1 = performance.now();
  const done = new Promise((ok) => { window.waiters[promptId] = ok; });
  const r = await fetch('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                    body: JSON.stringify({prompt: graph, client_id: clientId, prompt_id: promptId})});
  if (r.status !== 200) throw new Error('POST /prompt: ' + r.status + ' ' + await r.text());
  await done;
  const entry = (await (await fetch('/history/' + promptId)).json())[promptId];
  const out = Object.values(entry.outputs)[0].images[0];
  const v = await fetch('/view?' + new URLSearchParams({filename: out.filename, subfolder: out.subfolder, type: out.type}));
  const bytes = new Uint8Array(await v.arrayBuffer());
  if (v.status !== 200 || bytes[1] !== 0x50) throw new Error('GET /view: ' + v.status);
  return performance.now() - t1;
}"""

# In the page of the bridge's origin: a websocket per job, opened with the generate request.
_BRIDGE_JOB = """async ({inputs, clientId}) => {
  const t1 = performance.now();
  const ws = new WebSocket(`ws://${location.host}/ws?clientId=${clientId}`);
  const closed = new Promise((ok, fail) => {
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.status === 'closed') ok(); else if (m.status === 'error') fail(new Error(ev.data));
    };
    ws.onerror = () => fail(new Error('websocket error'));
  });
  const r = await fetch(`/generate-based-workflow?clientId=${clientId}`, {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(inputs)});
  if (r.status !== 200) throw new Error('generate: ' + r.status + ' ' + await r.text());
  await closed;
  ws.close();
  const h = await fetch(`/history?clientId=${clientId}`);
  const bytes = new Uint8Array(await h.arrayBuffer());
  if (h.status !== 200 || bytes.length < 100) throw new Error('GET /history: ' + h.status);
  return performance.now() - t1;
}"""


class ChromiumDirect:
    def __init__(self, browser: Chromium, address: str):
        self.browser, self.url = browser, f"http://{address}/system_stats"
        self.client_id = str(uuid.uuid4())

    async def open(self) -> None:
        self.page = await self.browser.page(self.url)
        await self.page.evaluate(_DIRECT_SETUP, self.client_id)

    async def close(self) -> None:
        await self.page.context.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        assert image is None, "the chromium client runs workflows without an input file only"
        ms = await self.page.evaluate(_DIRECT_JOB, {"graph": builder(None), "promptId": str(uuid.uuid4()),
                                                    "clientId": self.client_id})
        return ms / 1000, ms / 1000


class ChromiumBridge:
    def __init__(self, browser: Chromium, base: str):
        self.browser, self.url = browser, f"{base}/healthz"

    async def open(self) -> None:
        self.page = await self.browser.page(self.url)

    async def close(self) -> None:
        await self.page.context.close()

    async def job(self, builder, image: bytes | None) -> tuple[float, float]:
        assert image is None, "the chromium client runs workflows without an input file only"
        ms = await self.page.evaluate(_BRIDGE_JOB, {"inputs": builder(None),
                                                    "clientId": f"lat-{random.getrandbits(64):x}"})
        return ms / 1000, ms / 1000


async def pair(kind: str, sim_address: str, bridge_base: str, browser: Chromium | None = None):
    """(straight client, bridge client) of `kind`, not yet opened."""
    if kind == "raw":
        return RawDirect(sim_address), RawBridge(bridge_base)
    if kind in ("aiohttp-fresh", "aiohttp-reused"):
        return AiohttpDirect(sim_address), AiohttpBridge(bridge_base, kind.split("-", 1)[1])
    if kind == "chromium":
        return ChromiumDirect(browser, sim_address), ChromiumBridge(browser, bridge_base)
    raise ValueError(kind)
