"""SimulatedComfy: life cycle, test knobs and the prompt worker of one simulated ComfyUI server."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import tornado.httpserver
import tornado.netutil
import tornado.web

from . import faults, protocol
from .execution import Executor
from .files import Folders
from .models import DEFAULT_MODEL_FILES, GpuMemory, checked_model_files
from .profiles import Profile, resolve
from .routes import make_app
from .state import Hub, PromptQueue

log = logging.getLogger("comfysim")


class Runtime:
    """Everything a real ComfyUI process keeps in memory; a crash replaces it with a fresh one."""

    def __init__(self, sim: "SimulatedComfy"):
        self.hub = Hub(sim._gate, sim.spec, sim._drop_events)
        self.queue = PromptQueue(self.hub, sim.spec)
        self.gpu = GpuMemory(sim)
        self.executor = Executor(sim, self.hub, sim.folders, self.gpu)
        self.dead = asyncio.Event()   # set when this process "dies": releases hung requests
        self.tasks: list[asyncio.Task] = []


class _PromptTimes(NamedTuple):
    prompt_id: str
    started: float   # time.time() seconds
    ended: float
    success: bool


class PromptTime(_PromptTimes):
    """One entry of `prompt_times`: still unpacks as the 4-tuple it always was; the model
    files the run loaded ride beside it as `models_loaded`."""

    def __new__(cls, prompt_id, started, ended, success, models_loaded=()):
        entry = super().__new__(cls, prompt_id, started, ended, success)
        entry.models_loaded = tuple(models_loaded)
        return entry


@dataclass
class Execution:
    """One run of a prompt that executed at least one node (see SimulatedComfy.executions)."""
    prompt_id: str
    prompt: dict                                    # the graph as queued (widget values coerced)
    extra_data: dict                                # what the nodes saw (split-off keys included)
    nodes: list[str] = field(default_factory=list)  # node ids actually run, in order


class SimulatedComfy:
    """An in-process ComfyUI look-alike speaking the real HTTP + websocket protocol of the
    version named by `profile` ("legacy", "0.3.64" or "current", the default).

    Fault knobs (all reset by clear_faults(); they survive crash()/restart()):

    fail_prompts_containing = "POISON"   (str, a tuple of str, or None)
        POST /prompt whose body contains the marker is answered 500 with aiohttp's text
        page ("500 Internal Server Error\n\nServer got itself in trouble"), as when an
        exception escapes a handler; nothing is queued, the prompt counter does not move.
    fail_every = {"history": 3, "view": 2}
        every N-th request of that route (counted per key from the moment fail_every is
        assigned) is answered 500 the same way, before the route does anything. A key is
        a route name (`faults.ROUTES`: "history" = /history and /history/{id}, "view",
        "prompt", "queue", "upload", "jobs", ...; /api prefixes do not matter), optionally
        with a method: "GET history" counts only GETs. `fault_counts[key]` = calls seen.
    stall_next(route, seconds=5, count=1)
        the next `count` requests of that route (same keys) wait `seconds` before they are
        handled (they see the state of when they resume); the IOLoop keeps running. A
        crash()/stop() during a stall drops the connection. `stalling` = requests waiting now;
        release_stalls() lets them go at once (so a test can stall "until" something happened).
    drop_events = {"executed"}
        websocket events of those types are never sent (as when a socket misses them, or a
        version that does not send them for cached nodes).
    fault_log
        (kind, method, uri) for every fault applied: "poison", "fail_every", "stall"
        (logged when the stall starts).

    Execution counter (kept across crash()/restart()):

    executions
        prompt ids in the order their runs started executing a node: one entry per run
        that actually ran at least one node (a run served entirely from cache, or a
        prompt deleted or lost before it started, adds nothing; a run that fails or is
        interrupted after starting a node counts). `executions.count(pid)` = how often it ran.
    execution_records
        the same runs as Execution(prompt_id, prompt, extra_data, nodes) records (extra_data as
        the nodes saw it, sensitive keys included; nodes = the node ids run, in order).
    executions_containing(marker)
        the prompt ids in `executions` whose graph (as JSON) contains the marker.

    GPU memory (models.py; the knobs may change at run time, the held files are lost by crash()):

    models_kept (K, default 3)
        how many model files the GPU holds (the last K loaded, LRU); lowering it evicts at once.
    model_load_seconds (default 0.5)
        what a loader node waits for each file the GPU does not hold (not divided by speed).
    model_files
        {folder: [file names]} the loader nodes offer and accept (default models.DEFAULT_MODEL_FILES).
    loaded_models
        the files held now, least recently used first.
    model_loads
        loads so far (kept across crash()/restart()); each `prompt_times` entry's
        `models_loaded` names the files that run loaded.

    See the package docstring for the other knobs and observations.
    """

    def __init__(self, name: str = "sim", tick_seconds: float = 0.05, data_dir: Path | str | None = None,
                 startup_delay: float = 0.0, speed: float = 1.0, max_upload_size: int = protocol.DEFAULT_MAX_UPLOAD_SIZE,
                 legacy: bool = False, profile: str | Profile | None = None, models_kept: int = 3,
                 model_load_seconds: float = 0.5, model_files: dict[str, list[str]] | None = None):
        self.name = name
        self._rt: Runtime | None = None
        # legacy=True is the old spelling of profile="legacy"
        self.spec: Profile = resolve(profile, legacy)
        self.tick_seconds = tick_seconds
        self.startup_delay = startup_delay
        self.speed = speed
        self.max_upload_size = max_upload_size
        self._own_dir = data_dir is None
        root = Path(tempfile.mkdtemp(prefix=f"comfysim-{name}-")) if data_dir is None else Path(data_dir)
        self.folders = Folders(root)
        self.model_files = DEFAULT_MODEL_FILES if model_files is None else model_files
        self.models_kept = models_kept
        self.model_load_seconds = model_load_seconds
        self.model_loads = 0
        self.host = "127.0.0.1"
        self.port: int | None = None
        # observations for tests; they survive crash()/restart()
        self.executed_prompts: list[str] = []
        self.requests_log: list[tuple[str, str, object]] = []
        self.interrupt_calls: list[str | None] = []
        # (prompt_id, started, ended, success) per executed prompt, wall-clock seconds (time.time)
        self.prompt_times: list[PromptTime] = []
        self.executions: list[str] = []
        self.execution_records: list[Execution] = []
        self.cancel_calls: list[tuple[str, str]] = []
        # fault knobs
        self.fail_prompts_containing: str | tuple[str, ...] | None = None
        self._fail_every: dict[str, int] = {}
        self.fault_counts: Counter = Counter()
        self._stalls: dict[str, deque] = {}
        self.stalling = 0
        self._stall_releases: set[asyncio.Event] = set()
        self.fault_log: list[tuple[str, str, str]] = []
        self._drop_events: set[str] = set()   # shared with every Runtime's hub
        self._oom_remaining = 0
        self._interrupt_flag = False
        self._unhung = asyncio.Event()
        self._unhung.set()
        self._server: tornado.httpserver.HTTPServer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._listening = asyncio.Event()
        self._listen_task: asyncio.Task | None = None

    # -- public API -------------------------------------------------------------------------
    @property
    def profile(self) -> str:
        """The imitated version: "legacy", "0.3.64" or "current"."""
        return self.spec.name

    @property
    def legacy(self) -> bool:
        return self.spec.name == "legacy"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Start serving; returns the port. With startup_delay the port refuses connections for that long."""
        self.host = host
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"comfysim-{self.name}")
        await self._offload(self.folders.create)
        await self._offload(self.folders.wipe, "temp")  # ComfyUI wipes its temp dir on start
        sockets = tornado.netutil.bind_sockets(port, host)
        self.port = sockets[0].getsockname()[1]
        self._boot()
        if self.startup_delay > 0:
            for s in sockets:
                s.close()  # like a process still importing its nodes: nothing listens yet
            self._listen_task = asyncio.ensure_future(self._listen_later(self.startup_delay))
        else:
            self._listen(sockets)
        return self.port

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self) -> None:
        """Wait until the port accepts connections (only matters with startup_delay)."""
        await self._listening.wait()

    async def stop(self) -> None:
        """Shut down for good (as after SIGTERM) and remove the data dir if it was a temporary one."""
        await self._die()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._own_dir:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: shutil.rmtree(self.folders.root, ignore_errors=True))

    async def crash(self) -> None:
        """Die mid-job: stop listening, drop every websocket without a close frame, and lose the
        queue, history, caches and input files (the next process starts empty)."""
        await self._die()
        await self._offload(self.folders.wipe, "input", "temp")

    async def restart(self) -> int:
        """Come back on the same port with fresh state (after crash())."""
        await self._die()
        await self._offload(self.folders.wipe, "temp")
        self._boot()
        self._listen(tornado.netutil.bind_sockets(self.port, self.host))
        return self.port

    def hang(self, hung: bool = True) -> None:
        """While hung: TCP connections are accepted but no HTTP request is answered (they wait),
        no websocket frame is sent and the executor makes no progress."""
        if hung:
            self._unhung.clear()
        else:
            self._unhung.set()

    @property
    def hung(self) -> bool:
        return not self._unhung.is_set()

    def fail_next_oom(self, n: int = 1) -> None:
        """The next n prompts that execute a node fail there with torch.OutOfMemoryError."""
        self._oom_remaining += n

    def interrupt(self) -> None:
        """Set the global interrupt flag, as POST /interrupt without a body does."""
        self._interrupt_flag = True

    # -- fault knobs ------------------------------------------------------------------------
    @property
    def fail_every(self) -> dict[str, int]:
        return dict(self._fail_every)

    @fail_every.setter
    def fail_every(self, rules: dict[str, int] | None) -> None:
        rules = dict(rules or {})
        for key, n in rules.items():
            faults.parse_key(key)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"fail_every[{key!r}] must be an int >= 1, not {n!r}")
        self._fail_every = rules
        self.fault_counts = Counter()

    @property
    def drop_events(self) -> frozenset[str]:
        return frozenset(self._drop_events)

    @drop_events.setter
    def drop_events(self, events) -> None:
        self._drop_events.clear()
        self._drop_events.update(events or ())

    @property
    def models_kept(self) -> int:
        return self._models_kept

    @models_kept.setter
    def models_kept(self, count: int) -> None:
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"models_kept must be an int >= 0, not {count!r}")
        self._models_kept = count
        if self._rt is not None:
            self._rt.gpu.trim()

    @property
    def model_load_seconds(self) -> float:
        return self._model_load_seconds

    @model_load_seconds.setter
    def model_load_seconds(self, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"model_load_seconds must be a number >= 0, not {seconds!r}")
        self._model_load_seconds = float(seconds)

    @property
    def model_files(self) -> dict[str, list[str]]:
        return {folder: list(names) for folder, names in self.folders.model_files.items()}

    @model_files.setter
    def model_files(self, files: dict[str, list[str]]) -> None:
        self.folders.model_files = checked_model_files(files)

    @property
    def loaded_models(self) -> list[str]:
        """Model files the GPU holds now, least recently used first."""
        return self._rt.gpu.held if self._rt else []

    def stall_next(self, route: str, seconds: float = 5.0, count: int = 1) -> None:
        """The next `count` requests of `route` wait `seconds` before they are handled."""
        faults.parse_key(route)
        self._stalls.setdefault(route, deque()).extend([float(seconds)] * count)

    def release_stalls(self) -> None:
        """End the stalls under way now: those requests are handled at once."""
        for released in list(self._stall_releases):
            released.set()

    def clear_faults(self) -> None:
        """Switch every fault knob off (pending stalls included; running ones finish)."""
        self.fail_prompts_containing = None
        self.fail_every = {}
        self._stalls.clear()
        self.drop_events = ()

    def executions_containing(self, marker: str) -> list[str]:
        """Prompt ids of the executions whose graph (as JSON) contains `marker`."""
        return [r.prompt_id for r in self.execution_records
                if marker in json.dumps(r.prompt, ensure_ascii=False)]

    @property
    def queue_remaining(self) -> int:
        return self._rt.queue.remaining() if self._rt else 0

    @property
    def websocket_count(self) -> int:
        """Open websocket connections, registered or not (zombies count)."""
        return len(self._rt.hub.open_handlers) if self._rt else 0

    @property
    def registered_client_ids(self) -> list[str]:
        return list(self._rt.hub.sockets) if self._rt else []

    # -- internals used by handlers / executor ----------------------------------------------
    def _boot(self) -> None:
        self._rt = Runtime(self)
        self._interrupt_flag = False
        self._rt.tasks = [asyncio.ensure_future(self._rt.hub.publish_forever()),
                          asyncio.ensure_future(self._worker(self._rt))]

    def _listen(self, sockets) -> None:
        self._server = tornado.httpserver.HTTPServer(
            make_app(self), max_body_size=self.max_upload_size + (1 << 20), xheaders=False)
        self._server.add_sockets(sockets)
        self._listening.set()

    async def _listen_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._listen(tornado.netutil.bind_sockets(self.port, self.host))

    async def _die(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            self._listen_task = None
        self._listening.clear()
        rt, self._rt = self._rt, None
        if self._server is not None:
            self._server.stop()
        if rt is not None:
            rt.hub.close_all_abruptly()
            for task in rt.tasks:
                task.cancel()
            await asyncio.gather(*rt.tasks, return_exceptions=True)
        if self._server is not None:
            server, self._server = self._server, None
            await server.close_all_connections()  # drops connections, hung requests included
        if rt is not None:
            rt.dead.set()  # only now wake hung handlers: their connection is gone, they answer nothing

    async def _gate(self) -> None:
        """Wait while hung."""
        if not self._unhung.is_set():
            await self._unhung.wait()

    async def _offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _sleep_tick(self) -> None:
        await asyncio.sleep(self.tick_seconds / (self.speed or 1.0))
        await self._gate()

    def _node_started(self, run, node_id: str) -> None:
        """The executor runs a (non-cached) node of `run`: count the run once, at its first node."""
        record = getattr(run, "record", None)
        if record is None:
            record = run.record = Execution(run.prompt_id, run.prompt, run.extra_data)
            self.execution_records.append(record)
            self.executions.append(run.prompt_id)
        record.nodes.append(node_id)

    def _take_oom(self) -> bool:
        if self._oom_remaining > 0:
            self._oom_remaining -= 1
            return True
        return False

    def _apply_flags(self, rt: Runtime) -> None:
        flags = rt.queue.take_flags()
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):   # as ComfyUI's worker reads them
            rt.gpu.unload_all()
        if free_memory:
            rt.executor.reset()

    async def _worker(self, rt: Runtime) -> None:
        """ComfyUI's prompt_worker: one prompt at a time, /free flags applied between prompts."""
        queue, hub = rt.queue, rt.hub
        while True:
            await self._gate()
            queue.wakeup.clear()
            popped = queue.pop()
            if popped is None:
                self._apply_flags(rt)
                await queue.wakeup.wait()
                continue
            item, task_id = popped
            prompt_id = item[1]
            started = time.time()
            rt.executor.last_models_loaded = ()
            try:
                success, messages, result = await rt.executor.execute(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # a simulator bug must not kill the worker
                log.exception("comfysim %s: executor failed on %s", self.name, prompt_id)
                success, messages, result = False, [], {"outputs": {}, "meta": {}}
                hub.last_node_id = None
            self.prompt_times.append(PromptTime(prompt_id, started, time.time(), success,
                                                rt.executor.last_models_loaded))
            queue.task_done(task_id, result, {
                "status_str": "success" if success else "error", "completed": success, "messages": messages})
            if hub.client_id is not None:
                hub.send("executing", {"node": None, "prompt_id": prompt_id}, hub.client_id)
            if success:
                self.executed_prompts.append(prompt_id)
            self._apply_flags(rt)

    def system_stats(self) -> dict:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            total = free = 16 << 30
        stats = {
            "system": {
                "os": os.name, "ram_total": total, "ram_free": free,
                "comfyui_version": self.spec.comfyui_version, "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                "python_version": sys.version, "pytorch_version": "2.13.0+cpu", "embedded_python": False,
                "argv": ["main.py", "--cpu", "--listen", self.host, "--port", str(self.port), "--name", self.name],
            },
            "devices": [{"name": f"cpu (comfysim {self.name})", "type": "cpu", "index": None,
                         "vram_total": total, "vram_free": free, "torch_vram_total": total, "torch_vram_free": free}],
        }
        if self.spec.name == "current":
            # today's server: sys.platform, and the comfy* packages of its requirements
            system = stats["system"]
            system["os"] = sys.platform
            system["comfy_package_versions"] = [
                {"name": "comfyui-frontend-package", "installed": "1.27.10", "required": "1.27.10"},
                {"name": "comfyui-workflow-templates", "installed": "0.1.95", "required": "0.1.95"}]
        return stats
