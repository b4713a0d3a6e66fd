"""One client object per ComfyUI server: every HTTP call to it, its websocket, its health.

All calls go through `Backend.call`, which sets explicit timeouts and turns transport
failures and 5xx answers into `BackendUnavailable`, so the service can mark the backend down
and move its jobs. Requests are built here from scratch: a client's `Origin`, `Cookie` or
`Authorization` header never reaches ComfyUI (it answers 403 to a foreign Origin).

Websocket: one per backend, opened with a fresh `clientId` on every (re)connect. ComfyUI
registers sockets by clientId, and a reconnect under the old id can be silently deregistered
when the server notices the old socket's close (captured in comfy-protocol 13); events of a
prompt submitted under a previous id are lost, which the job's history poll covers.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import urlencode

import ujson
from tornado import httpclient, websocket
from tornado.httputil import HTTPHeaders

log = logging.getLogger("bridge.backend")

CONNECT_TIMEOUT = 5.0
PROBE_BACKOFF_START = 0.25
PROBE_BACKOFF_MAX = 10.0
UNROUTED_PROMPTS_KEPT = 64
UNROUTED_EVENTS_PER_PROMPT = 256
HEALTH_MISSES_ALLOWED = 2


class BackendUnavailable(Exception):
    """The backend did not answer, refused the connection, timed out or answered 5xx."""


class BackendRejected(Exception):
    """The backend answered 4xx; `body` is its parsed JSON (or None)."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class PromptListener(Protocol):
    def on_backend_event(self, kind: str, data: dict) -> None: ...


@dataclass
class BackendStats:
    completed: int = 0
    failed: int = 0
    since_free: int = 0
    last_error: str = ""
    durations: dict[str, deque] = field(default_factory=dict)  # alias -> recent seconds

    def record_duration(self, alias: str, seconds: float) -> None:
        self.durations.setdefault(alias, deque(maxlen=20)).append(seconds)

    def mean_duration(self, alias: str | None = None) -> float | None:
        samples = (self.durations.get(alias, ()) if alias
                   else [s for d in self.durations.values() for s in d])
        return sum(samples) / len(samples) if samples else None


class Backend:
    def __init__(self, address: str, *, index: int, request_timeout: float, health_interval: float = 5.0,
                 on_up: Callable[["Backend"], None], on_down: Callable[["Backend"], None],
                 max_clients: int = 32):
        self.address = address
        self.index = index
        self.base_url = f"http://{address}"
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self._on_up = on_up
        self._on_down = on_down
        self._http = _keepalive_client(max_clients)
        # Uploads stream their body from disk (body_producer), which only tornado's own
        # client supports; they are rare next to the JSON calls.
        self._upload_http = httpclient.AsyncHTTPClient(force_instance=True, max_clients=max_clients)
        self.up = False
        self.state_since = time.time()
        self.ws_client_id = ""
        self.node_classes: frozenset[str] = frozenset()
        self.output_classes: frozenset[str] = frozenset()
        self.in_flight: set[str] = set()          # job ids holding a slot here
        self.uploaded: dict[str, str] = {}         # local file -> name on this backend
        self.uploading: dict[str, asyncio.Future] = {}  # local file -> upload in progress
        self.abandoned: set[str] = set()           # prompts whose jobs were moved elsewhere
        self.stats = BackendStats()
        self._listeners: dict[str, PromptListener] = {}
        self._unrouted: dict[str, list[tuple[str, dict]]] = {}
        self._ws: websocket.WebSocketClientConnection | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._connected_event = asyncio.Event()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            self._ws.close()
        if self._supervisor is not None:
            # Let the reader see the close handshake end, so the socket is really closed.
            done, _ = await asyncio.wait({self._supervisor}, timeout=2.0)
            if not done:
                self._supervisor.cancel()
                await asyncio.gather(self._supervisor, return_exceptions=True)
        self._http.close()
        self._upload_http.close()

    async def wait_up(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def mark_down(self, reason: str) -> None:
        """Called on any sign of trouble; the supervisor probes and reconnects with backoff."""
        if not self.up:
            return
        log.warning("backend %s is down: %s", self.address, reason)
        self.up = False
        self.state_since = time.time()
        self.stats.last_error = reason
        self._connected_event.clear()
        if self._ws is not None:
            self._ws.close()
        self._on_down(self)

    async def _supervise(self) -> None:
        delay = PROBE_BACKOFF_START
        while not self._closing:
            try:
                await self._connect()
                if self._closing:
                    self._ws.close()
            except (BackendUnavailable, BackendRejected, OSError, websocket.WebSocketError,
                    httpclient.HTTPError, asyncio.TimeoutError) as exc:
                self.stats.last_error = self.stats.last_error or str(exc)
                log.debug("backend %s not reachable yet: %s", self.address, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PROBE_BACKOFF_MAX)
                continue
            delay = PROBE_BACKOFF_START
            health = asyncio.get_running_loop().create_task(self._watch_health())
            try:
                await self._read_messages()
            finally:
                health.cancel()
            if not self._closing:
                self.mark_down("websocket closed")

    async def _watch_health(self) -> None:
        """A hung server keeps its sockets open and answers websocket pings from its event
        loop, yet never answers a request: only a request with a deadline notices. Two misses
        in a row are needed, so one slow answer from a busy GPU server does not move its jobs."""
        misses = 0
        while self.up:
            await asyncio.sleep(self.health_interval)
            try:
                await self.call("GET", "/system_stats", timeout=self.health_interval, mark_down=False)
                misses = 0
            except BackendUnavailable as exc:
                misses += 1
                if misses >= HEALTH_MISSES_ALLOWED:
                    self.mark_down(f"health probe: {exc}")
                    return
            except BackendRejected as exc:
                self.mark_down(f"health probe answered HTTP {exc.status}")
                return

    async def _connect(self) -> None:
        await self.call("GET", "/system_stats", timeout=CONNECT_TIMEOUT)
        info = await self.call("GET", "/object_info", timeout=max(self.request_timeout, CONNECT_TIMEOUT))
        if isinstance(info, dict):
            self.node_classes = frozenset(info)
            self.output_classes = frozenset(
                name for name, spec in info.items() if isinstance(spec, dict) and spec.get("output_node"))
        self.ws_client_id = f"bridge-{uuid.uuid4().hex[:16]}"
        url = f"ws://{self.address}/ws?{urlencode({'clientId': self.ws_client_id})}"
        self._ws = await websocket.websocket_connect(
            httpclient.HTTPRequest(url, connect_timeout=CONNECT_TIMEOUT, request_timeout=CONNECT_TIMEOUT),
            ping_interval=10, ping_timeout=10, max_message_size=64 * 1024 * 1024)
        # A backend that came back may have restarted: it lost the files we put on it.
        self.uploaded.clear()
        self.up = True
        self.state_since = time.time()
        log.info("backend %s is up (%d node classes)", self.address, len(self.node_classes))
        self._connected_event.set()
        self._on_up(self)

    async def _read_messages(self) -> None:
        ws = self._ws
        while ws is not None:
            message = await ws.read_message()
            if message is None:
                return
            if isinstance(message, bytes):
                continue  # binary previews: the bridge does not relay them
            try:
                parsed = ujson.loads(message)
                kind, data = parsed["type"], parsed.get("data") or {}
            except (ValueError, KeyError, TypeError):
                continue
            self._route(kind, data)

    # ------------------------------------------------------------------ event routing
    def listen(self, prompt_id: str, listener: PromptListener) -> None:
        self._listeners[prompt_id] = listener
        for kind, data in self._unrouted.pop(prompt_id, ()):
            listener.on_backend_event(kind, data)

    def unlisten(self, prompt_id: str) -> None:
        self._listeners.pop(prompt_id, None)
        self._unrouted.pop(prompt_id, None)

    def _route(self, kind: str, data: dict) -> None:
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if not prompt_id:
            return  # status broadcasts and reconnect re-announcements carry no prompt
        listener = self._listeners.get(prompt_id)
        if listener is not None:
            listener.on_backend_event(kind, data)
            return
        # Events can arrive before the POST /prompt answer names the prompt to us. Others'
        # prompts show up here too (ComfyUI broadcasts progress of prompts without a client),
        # so both the prompts and the events per prompt kept are bounded.
        events = self._unrouted.get(prompt_id)
        if events is None:
            if len(self._unrouted) >= UNROUTED_PROMPTS_KEPT:
                self._unrouted.pop(next(iter(self._unrouted)))
            events = self._unrouted[prompt_id] = deque(maxlen=UNROUTED_EVENTS_PER_PROMPT)
        events.append((kind, data))

    # ------------------------------------------------------------------ HTTP
    async def call(self, method: str, path: str, body=None, *, timeout: float | None = None,
                   mark_down: bool = True):
        """One HTTP call with explicit timeouts. JSON in, JSON out."""
        url = self.base_url + path
        headers = HTTPHeaders()
        payload = None
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                payload = bytes(body)
            else:
                payload = ujson.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        elif method == "POST":
            payload = b""
        total = timeout if timeout is not None else self.request_timeout
        request = httpclient.HTTPRequest(
            url, method=method, body=payload, headers=headers, connect_timeout=min(CONNECT_TIMEOUT, total),
            request_timeout=total, decompress_response=True, follow_redirects=False)
        response = await self.fetch(request, f"{method} {path}", mark_down)
        return json_or_none(response.body)

    async def fetch(self, request: httpclient.HTTPRequest, what: str,
                    mark_down: bool = True) -> httpclient.HTTPResponse:
        """Send a prepared request; failures become BackendUnavailable (marking this backend
        down) or BackendRejected (4xx)."""
        try:
            client = self._upload_http if request.body_producer is not None else self._http
            response = await client.fetch(request, raise_error=False)
        except (OSError, asyncio.TimeoutError, httpclient.HTTPClientError) as exc:
            # raise_error=False covers HTTP statuses only; timeouts and resets still raise.
            response, reason = None, str(exc)
        else:
            reason = str(response.error) if response.code == 599 else f"HTTP {response.code}"
        if response is None or response.code == 599 or response.code >= 500:
            failure = f"{what}: {reason}"
            if mark_down:
                self.mark_down(failure)
            raise BackendUnavailable(failure)
        if response.code >= 400:
            raise BackendRejected(response.code, json_or_none(response.body))
        return response


def _keepalive_client(max_clients: int) -> httpclient.AsyncHTTPClient:
    """libcurl keeps connections to the backend open between calls; tornado's simple client
    opens a new one per call, which was the largest cost per job on loopback (BENCHMARKS.md)."""
    try:
        from tornado.curl_httpclient import CurlAsyncHTTPClient
    except ImportError:  # pycurl missing: correct, only slower
        return httpclient.AsyncHTTPClient(force_instance=True, max_clients=max_clients)
    return CurlAsyncHTTPClient(force_instance=True, max_clients=max_clients)


def json_or_none(body: bytes | None):
    if not body:
        return None
    try:
        return ujson.loads(body)
    except ValueError:
        return None
