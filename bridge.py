#!/usr/bin/env python3
"""ComfyUI bridge: a small, stable API in front of one or more unmodified ComfyUI servers.

    python bridge.py                 # settings from .env and the environment
    python bridge.py --demo          # two simulated ComfyUI backends in this process
    python bridge.py --help          # every option
    comfy-bridge ...                 # the same, once installed with `pip install .`
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path

from tornado import web
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

import handlers
from comfy_bridge_data import is_checkout, static_dir, workflows_dir
from comfy_bridge_version import __version__
from handlers.base import SERVER_MAX_BODY
from handlers.connections import BridgeHTTPServer
from logs import RefusalLog, configure_logging, log_request
from balancer.hub import StatusHub
from balancer.metrics import BridgeMetrics
from balancer.remote_inputs import RemoteInputs
from balancer.service import JobService
from balancer.v2.surface import V2Surface
from balancer.webhooks import WebhookSender
from settings import (Settings, SettingsError, add_arguments, load_settings, overrides_from_args,
                      setting_source)
from storage.assets import AssetStore
from storage.catalog import WorkflowCatalog
from storage.jobstore import JobStore
from storage.lock import DataDirInUse, DataDirLock
from storage.results import ResultStore
from storage.state import StateFile
from storage.sweep import sweep_disk
from storage.uploads import UploadStore

log = logging.getLogger("bridge")
ROOT = Path(__file__).resolve().parent
SWEEP_INTERVAL = 60.0


class Bridge:
    """Every long-lived object, built once; `start()` listens, `stop()` shuts down cleanly."""

    def __init__(self, settings: Settings, lock: DataDirLock | None = None):
        self.settings = settings
        # First of all: one bridge per data folder (DataDirInUse otherwise).
        self.lock = lock or DataDirLock(settings.data_dir).acquire()
        self.state = StateFile(settings.current_state)
        self.catalog = WorkflowCatalog(settings.workflow_dir, settings.workflow_alias)
        self.uploads = UploadStore(settings.uploads_dir, settings.upload_max_bytes)
        self.results = ResultStore(settings.results_dir)
        self.hub = StatusHub(settings.heartbeat_interval)
        self.store = JobStore(settings.data_dir / "jobs.sqlite3")
        self._stored_jobs, stored_count = self.store.open()
        if stored_count is not None:
            self.state.set_count(stored_count)
        self.webhooks = WebhookSender(settings, self.store, self.results, lambda: self.state.generation_count)
        self.service = JobService(settings, self.catalog, self.uploads, self.results, self.state, self.hub,
                                  self.store, webhooks=self.webhooks)
        self.metrics = BridgeMetrics(self.service, self.hub, self.state, webhooks=self.webhooks)
        self.remote_inputs = RemoteInputs(self.catalog, self.uploads, settings.input_url_allowed_hosts,
                                          settings.upload_max_bytes, settings.upload_max_size)
        # Comfy API v2: a second surface over the same service, its assets and keys in the same database.
        self.assets = AssetStore(settings.assets_dir, self.store, settings.upload_max_bytes)
        self.assets.load(self.store.records("asset"))
        self.v2 = V2Surface(settings, self.service, self.assets, self.store, self.hub)
        self.v2.keys.load(self.store.records("idempotency"))
        self.service.observers.append(self.v2.on_job_event)
        # Last: a job's delivery is queued after the log and metrics saw its end (same commit).
        self.service.observers.append(self.webhooks.on_job_event)
        self.refusals = RefusalLog()
        self.app = web.Application(
            handlers.all_routes(str(static_dir())),
            default_handler_class=handlers.NotFoundHandler,
            config=settings, service=self.service, catalog=self.catalog, uploads=self.uploads,
            hub=self.hub, state=self.state, metrics=self.metrics, refusals=self.refusals,
            remote_inputs=self.remote_inputs, v2=self.v2,
            log_function=log_request,
            websocket_ping_interval=20, websocket_ping_timeout=20,
            websocket_max_message_size=64 * 1024,
        )
        self.server: BridgeHTTPServer | None = None
        self.port: int | None = None
        self._sweeper: PeriodicCallback | None = None
        self._queue_watch: PeriodicCallback | None = None

    async def start(self, port: int | None = None, host: str | None = None, sockets: list | None = None) -> int:
        """Listens on `sockets` (bound by the caller) or binds `port` on `host` first of all."""
        if sockets is None:
            port = self.settings.port if port is None else port
            sockets = bind_sockets(port, host if host is not None else self.settings.host)
        self.service.start()
        self.service.restore(self._stored_jobs)
        self._stored_jobs = []
        self.v2.start()
        self.webhooks.restore(self.store.deliveries())
        self.state.write_if_changed()
        self.hub.start()
        self.metrics.start()
        # Often enough that nothing outlives RESULT_TTL by more than a quarter of it.
        interval = max(0.5, min(SWEEP_INTERVAL, self.settings.result_ttl / 4, self.settings.upload_ttl / 4))
        self._sweeper = PeriodicCallback(self.sweep, interval * 1000)
        self._sweeper.start()
        if self.settings.queue_timeout:
            self._queue_watch = PeriodicCallback(lambda: self.service.expire_waiting(time.time()),
                                                 min(1000.0, self.settings.queue_timeout * 250))
            self._queue_watch.start()
        # A client that is slow to send its headers or silent in the middle of a body is dropped
        # (HEADER_TIMEOUT, BODY_TIMEOUT). Bodies above SERVER_MAX_BODY are refused unread;
        # /upload raises its own. Early answers, header limits: handlers/connections.py.
        self.server = BridgeHTTPServer(
            self.app, xheaders=False, idle_connection_timeout=self.settings.header_timeout,
            body_silence=self.settings.body_timeout, max_body_size=SERVER_MAX_BODY)
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        for alias, reason in self.catalog.load_errors().items():
            log.error("workflow '%s' is not available: %s", alias, reason)
        log.info("bridge listening on %s:%d with backends %s", self.settings.host, self.port,
                 ", ".join(self.settings.comfyui_servers))
        return self.port

    def sweep(self) -> asyncio.Future:
        """Expired jobs first (in memory), then the disk, off the loop."""
        now = time.time()
        self.service.sweep_expired(now)
        self.v2.sweep(now)
        keep_uploads, keep_results = self.service.files_in_use()
        return asyncio.get_running_loop().run_in_executor(None, functools.partial(
            sweep_disk, self.uploads, self.results, upload_ttl=self.settings.upload_ttl,
            result_ttl=self.settings.result_ttl, keep_uploads=keep_uploads, keep_results=keep_results, now=now))

    async def stop(self) -> None:
        self.metrics.close()
        self.refusals.close()
        for periodic in (self._sweeper, self._queue_watch):
            if periodic is not None:
                periodic.stop()
        self.hub.stop()
        if self.server is not None:
            self.server.stop()
        await self.service.close()
        self.remote_inputs.close()
        await self.webhooks.close()
        await self.store.close()
        await self.state.flush()
        if self.server is not None:
            await self.server.close_all_connections()
        self.lock.release()


def settle_heap() -> int:
    """Once started: what exists now (modules, settings, catalog, backends) lives as long as
    the process, so the cyclic collector stops walking it. A full collection walks every
    tracked object and stops the loop meanwhile: measured up to 0.4 s with 300 backends and
    10,000 queued jobs, about half as long with start-up frozen. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def start_demo_backends(count: int = 2, tick_seconds: float = 0.1) -> list:
    from comfysim import SimulatedComfy  # the demo's only use of the simulator
    sims = []
    for i in range(count):
        sim = SimulatedComfy(name=f"sim-{chr(ord('a') + i)}", tick_seconds=tick_seconds)
        await sim.start(port=0)
        sims.append(sim)
    return sims


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(  # prog: "bridge.py", or "comfy-bridge" once installed
        description="ComfyUI bridge: a small API in front of ComfyUI servers. "
        "Options may also be set in .env or the environment under the names shown.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--demo", action="store_true",
                        help="run with two simulated ComfyUI backends in this process (no GPU needed); "
                             "listens on 127.0.0.1 unless HOST is given")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    add_arguments(parser)
    return parser.parse_args(argv)


async def serve(settings: Settings, demo: bool, lock: DataDirLock, sockets: list) -> None:
    # Signals first: a stop asked for while starting (or right after "listening on") is a
    # clean stop once started, not a kill by the default handler.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sims = []
    if demo:
        sims = await start_demo_backends()
        settings = settings.replace(comfyui_servers=tuple(sim.address for sim in sims))
        log.info("demo: simulated ComfyUI backends at %s", ", ".join(settings.comfyui_servers))
    bridge = Bridge(settings, lock)
    port = await bridge.start(sockets=sockets)
    settle_heap()
    if demo:
        print(demo_banner(settings, port), flush=True)
    await stop.wait()
    log.info("shutting down")
    await bridge.stop()
    for sim in sims:
        await sim.stop()


def demo_banner(settings: Settings, port: int) -> str:
    """What the demo says on start: where to open it, and who else can reach it."""
    host = settings.host
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    wildcard = host in ("", "0.0.0.0", "::")
    shown = "127.0.0.1" if wildcard else (f"[{host}]" if ":" in host else host)
    lines = [f"Demo bridge ready: open http://{shown}:{port}/ (API reference at /docs; Ctrl+C stops it)"]
    if loopback:
        lines.append(f"Listening on {host} only: other machines cannot reach it "
                     "(set HOST=0.0.0.0 and BRIDGE_API_KEY to share it).")
    else:
        lines.append(f"Listening on {host or 'every address'}: other machines on the network can reach it"
                     + (", and it asks for BRIDGE_API_KEY." if settings.api_keys else
                        " and use it WITHOUT A KEY (POST /free included); set BRIDGE_API_KEY."))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = overrides_from_args(args)
    if "BRIDGE_API_KEY" in overrides:
        print("bridge: warning: --bridge-api-key is visible to other users of this machine (ps, "
              "/proc/<pid>/cmdline); prefer BRIDGE_API_KEY in the environment or in .env", file=sys.stderr)
    if "BRIDGE_API_KEYS" in overrides and not Path(overrides["BRIDGE_API_KEYS"]).expanduser().is_file():
        print("bridge: warning: keys given inline to --bridge-api-keys are visible to other users of this "
              "machine; prefer --bridge-api-keys FILE (name:key lines)", file=sys.stderr)
    if args.demo:
        overrides.setdefault("COMFYUI_SERVERS", "127.0.0.1:1")  # replaced by the simulators
        if setting_source("HOST", overrides, os.environ, args.env_file) is None:
            overrides["HOST"] = "127.0.0.1"  # a demo has no key: this machine only, unless asked
        # Beside the checkout's other ignored data; installed, under the current folder like DATA_DIR.
        overrides.setdefault("DATA_DIR", str(ROOT / "data" / "demo" if is_checkout() else Path("data", "demo")))
        overrides.setdefault("WORKFLOW_DIR", str(workflows_dir()))
        overrides.setdefault("WORKFLOW_ALIAS", str(workflows_dir() / "aliases.json"))
    try:
        settings = load_settings(overrides, dotenv_path=args.env_file)
    except SettingsError as exc:
        print(f"bridge: bad setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging_level, list(settings.api_keys.values()))
    # Before anything starts: the data folder is ours, and so is the port.
    try:
        lock = DataDirLock(settings.data_dir).acquire()
    except DataDirInUse as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    try:
        sockets = bind_sockets(settings.port, settings.host)
    except OSError as exc:
        lock.release()
        print(f"bridge: cannot listen on HOST={settings.host} PORT={settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    asyncio.run(serve(settings, args.demo, lock, sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
