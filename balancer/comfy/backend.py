"""One ComfyUI server as the bridge sees it: its transport, its websocket, its health, the
slots the bridge's jobs hold on it and what it has run.

Websocket: one per backend, opened with a fresh `clientId` on every (re)connect. ComfyUI
registers sockets by clientId, and a reconnect under the old id can be silently deregistered
when the server notices the old socket's close (captured in comfy-protocol 13); events of a
prompt submitted under a previous id are lost, which the job's history poll covers.

This object is the only writer of its state: the service takes and releases slots and
records outcomes through its methods.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import urlencode

import ujson
from tornado import httpclient, websocket

from ..affinity import GpuBelief
from .answers import parse_preview
from .files import UploadCache
from .http import CONNECT_TIMEOUT, BackendRejected, BackendUnavailable, Transport

log = logging.getLogger("bridge.backend")

PROBE_BACKOFF_START = 0.25
PROBE_BACKOFF_MAX = 10.0
UNROUTED_PROMPTS_KEPT = 64
UNROUTED_EVENTS_PER_PROMPT = 256
HEALTH_MISSES_ALLOWED = 2
# Failed calls in a row, with no answer between, that make a backend down (Envoy's outlier
# detection ejects a host after 5 consecutive 5xx). A refused or lost connection needs one.
FAILURES_BEFORE_DOWN = 5
UNREACHABLE_LOG_EVERY = 60.0


def probe_phase(address: str) -> float:
    """Where in the health interval this backend's probes fall, in (0, 1]: backends that came
    up together (a bridge starting with 300) probe spread over the interval, not in one burst."""
    return (zlib.crc32(address.encode()) % 1000 + 1) / 1000


class PromptListener(Protocol):
    def on_backend_event(self, kind: str, data: dict) -> None: ...


@dataclass
class BackendStats:
    completed: int = 0
    failed: int = 0
    since_free: int = 0             # jobs completed since the last /free
    last_error: str = ""            # why it was last down or unreachable
    consecutive_failures: int = 0   # failed calls since the last answer
    last_failure: str = ""          # the last failed call and why
    call_failures: int = 0          # failed calls in all
    durations: dict[str, deque] = field(default_factory=dict)  # alias -> recent seconds

    def mean_duration(self, alias: str | None = None) -> float | None:
        samples = (self.durations.get(alias, ()) if alias
                   else [s for d in self.durations.values() for s in d])
        return sum(samples) / len(samples) if samples else None


@dataclass
class Slot:
    alias: str
    cold: frozenset                 # its model files not expected loaded by the time it runs
    expected: float                 # seconds its prompt should run, as estimated when it was sent
    started: float | None = None    # time.monotonic() of its execution_start


class Backend:
    def __init__(self, address: str, *, request_timeout: float, health_interval: float = 5.0,
                 on_up: Callable[["Backend"], None], on_down: Callable[["Backend"], None],
                 max_clients: int = 32, models_kept: int = 2):
        self.address = address
        self.base_url = f"http://{address}"
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self._on_up = on_up
        self._on_down = on_down
        self.http = Transport(self.base_url, request_timeout, on_answer=self._answered,
                              on_failure=self._call_failed, max_clients=max_clients)
        self.files = UploadCache(self)
        self.up = False
        self.state_since = time.time()
        self.ws_client_id = ""
        self.node_classes: frozenset[str] = frozenset()
        self.output_classes: frozenset[str] = frozenset()
        self.accepts_prompt_ids = True       # until it refuses one (see api.submit_prompt)
        self.has_cancel_route: bool | None = None  # POST /api/jobs/{id}/cancel; None: not tried yet
        self.stats = BackendStats()
        self.gpu = GpuBelief(models_kept)    # its loaded models and run times, as far as we know
        self._slots: dict[str, Slot] = {}    # job id -> its prompt's expected run, while sent here
        self._abandoned: set[str] = set()    # prompts whose jobs were moved elsewhere
        self._listeners: dict[str, PromptListener] = {}
        self._unrouted: dict[str, deque] = {}
        self._executing: tuple[str | None, str | None] = (None, None)   # prompt and node, from `executing`
        self._ws: websocket.WebSocketClientConnection | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._connected_event = asyncio.Event()
        self._unreachable_logged = float("-inf")
        self._last_answer = float("-inf")    # when a call last got an HTTP answer

    # ------------------------------------------------------------------ slots and statistics
    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._slots)

    @property
    def load(self) -> int:
        return len(self._slots)

    def take_slot(self, job_id: str, alias: str = "", cold: frozenset = frozenset(), expected: float = 0.0) -> None:
        """A prompt of workflow `alias` that loads `cold`, expected to run `expected` seconds once
        started, is sent here."""
        self._slots[job_id] = Slot(alias, cold, expected)

    def slot_started(self, job_id: str, when: float) -> None:
        slot = self._slots.get(job_id)
        if slot is not None and slot.started is None:
            slot.started = when

    def release_slot(self, job_id: str) -> None:
        self._slots.pop(job_id, None)

    def backlog(self, now: float, expected=None) -> float:
        """Seconds of expected work still ahead of this backend's GPU (time.monotonic() `now`):
        the rest of what runs, and all of what waits in its queue. `expected(backend, alias,
        cold)` estimates with what is known now (affinity.Estimator.expected); without it, the
        estimates made when the prompts were sent."""
        total = 0.0
        for slot in self._slots.values():
            expected_s = slot.expected if expected is None else expected(self, slot.alias, slot.cold)
            total += expected_s if slot.started is None else max(expected_s - (now - slot.started), 0.0)
        return total

    def record_completed(self, alias: str, seconds: float) -> None:
        self.stats.completed += 1
        self.stats.since_free += 1
        self.stats.durations.setdefault(alias, deque(maxlen=20)).append(seconds)

    def record_failed(self) -> None:
        self.stats.failed += 1

    def record_freed(self) -> None:
        self.stats.since_free = 0

    def abandon(self, prompt_id: str) -> None:
        """The prompt's job moved elsewhere: stop it here if this backend comes back with it."""
        self._abandoned.add(prompt_id)

    def take_abandoned(self) -> set[str]:
        prompts, self._abandoned = self._abandoned, set()
        return prompts

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
        self.http.close()

    async def wait_up(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _answered(self) -> None:
        self.stats.consecutive_failures = 0
        self._last_answer = time.monotonic()

    def _call_failed(self, reason: str, fatal: bool) -> None:
        """One failed call is not a dead backend: a lost connection is, and so are several
        failures in a row with no answer between."""
        stats = self.stats
        stats.consecutive_failures += 1
        stats.call_failures += 1
        stats.last_failure = reason
        if not self.up:
            return  # already down: the supervisor says why it cannot reconnect
        if fatal:
            self.mark_down(reason)
        elif stats.consecutive_failures >= FAILURES_BEFORE_DOWN:
            self.mark_down(f"{stats.consecutive_failures} calls failed in a row, the last: {reason}")
        else:
            log.warning("backend %s: call failed (%d in a row): %s", self.address,
                        stats.consecutive_failures, reason)

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
                self._unreachable(str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PROBE_BACKOFF_MAX, self.health_interval)
                continue
            delay = PROBE_BACKOFF_START
            health = asyncio.get_running_loop().create_task(self._watch_health())
            try:
                await self._read_messages()
            finally:
                health.cancel()
            if not self._closing:
                self.mark_down("websocket closed")

    def _unreachable(self, reason: str) -> None:
        """Say why the backend cannot be reached: at once when the reason is new, then at most
        once a minute (a bridge pointed at a wrong port must say so, not fill the log)."""
        now = time.monotonic()
        if reason != self.stats.last_error or now - self._unreachable_logged >= UNREACHABLE_LOG_EVERY:
            log.warning("backend %s cannot be reached: %s", self.address, reason)
            self._unreachable_logged = now
        self.stats.last_error = reason

    async def _watch_health(self) -> None:
        """A hung server keeps its sockets open and answers websocket pings from its event
        loop, yet never answers a request: only a request with a deadline notices. Two misses
        in a row are needed, so one slow answer from a busy GPU server does not move its jobs.
        A server that answered one of its jobs' calls within the interval is not probed: with
        hundreds of backends the probes are most of the bridge's background work."""
        misses = 0
        delay = self.health_interval * probe_phase(self.address)
        while self.up:
            await asyncio.sleep(delay)
            delay = self.health_interval
            if not self.up:
                return  # marked down meanwhile: the supervisor takes over
            if time.monotonic() - self._last_answer < self.health_interval:
                misses = 0  # a job's own call was answered within the interval: no probe needed
                continue
            try:
                await self.http.call("GET", "/system_stats", timeout=self.health_interval, counts=False,
                                     retry=False)
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
        # Not retried here: the supervisor tries again, with backoff.
        await self.http.call("GET", "/system_stats", timeout=CONNECT_TIMEOUT, retry=False)
        info = await self.http.call("GET", "/object_info", timeout=max(self.request_timeout, CONNECT_TIMEOUT),
                                    retry=False)
        if isinstance(info, dict):
            self.object_info = info  # kept for the inputs' limits (balancer/intake.py)
            self.node_classes = frozenset(info)
            self.output_classes = frozenset(
                name for name, spec in info.items() if isinstance(spec, dict) and spec.get("output_node"))
        self.ws_client_id = f"bridge-{uuid.uuid4().hex[:16]}"
        url = f"ws://{self.address}/ws?{urlencode({'clientId': self.ws_client_id})}"
        self._ws = await websocket.websocket_connect(
            httpclient.HTTPRequest(url, connect_timeout=CONNECT_TIMEOUT, request_timeout=CONNECT_TIMEOUT),
            ping_interval=10, ping_timeout=10, max_message_size=64 * 1024 * 1024)
        # A backend that came back may have restarted: it lost the files we put on it.
        self.files.clear()
        self.accepts_prompt_ids = True
        self.has_cancel_route = None
        self.stats.consecutive_failures = 0
        self.stats.last_error = ""
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
                self._route_preview(message)
                continue
            if '"prompt_id"' not in message:
                continue  # status broadcasts that name no prompt: not routed
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

    def _route_preview(self, frame: bytes) -> None:
        """A preview image goes to its prompt's listener as a `preview` event; a frame that
        names no prompt belongs to the one executing (ComfyUI executes one prompt at a time)."""
        preview = parse_preview(frame)
        if preview is None:
            return
        prompt_id, node_id, content_type, image = preview
        if prompt_id is None:
            prompt_id, node_id = self._executing
        listener = self._listeners.get(prompt_id) if prompt_id else None
        if listener is not None:
            listener.on_backend_event("preview", {"prompt_id": prompt_id, "node": node_id,
                                                  "content_type": content_type, "image": image})

    def _route(self, kind: str, data: dict) -> None:
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if not prompt_id:
            return  # status broadcasts and reconnect re-announcements carry no prompt
        if kind == "executing":
            self._executing = (prompt_id, data.get("node"))
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
