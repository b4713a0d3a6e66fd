"""One prompt's run on one backend: place its files, submit it, follow its events, collect its
results. A run reads its job but changes nothing of it: it tells the service what happens
through `RunEvents` and ends with an `Outcome`, which the service applies.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Protocol

from .affinity import loader_nodes
from .comfy import api
from .comfy.answers import (describe_execution_error, describe_rejection, entry_from_events,
                            is_out_of_memory, lost_input_file, outcome_from_history, output_files)
from .comfy.backend import Backend
from .comfy.files import download_to
from .comfy.http import BackendRejected, BackendUnavailable
from .comfy.watch import PromptWatch
from .jobs import INTERRUPTED, Job
from .progress import ProgressTracker

log = logging.getLogger("bridge.jobs")

HISTORY_POLL_INTERVAL = 2.0     # safety net for websocket events that never came
HISTORY_WRITE_GRACE = 10.0      # history is written just after execution_success
# A read the job's results depend on is tried again for this long while the backend is up:
# the job has run, and running it elsewhere would run it twice.
READ_PATIENCE = 60.0


class Ending(str, enum.Enum):
    DONE = "done"                     # results stored on the bridge's disk
    FAILED = "failed"                 # the prompt was refused or failed: the job ends in error
    OUT_OF_MEMORY = "out_of_memory"   # failed for lack of GPU memory: worth one more try
    LOST = "lost"                     # the backend failed under it: run it elsewhere
    REJECTED = "rejected"             # the backend answered 5xx to the prompt (or no answer): try another
    NOT_RESUMED = "not_resumed"       # after a restart, the backend no longer had the prompt


@dataclass
class Outcome:
    ending: Ending
    reason: str = ""
    results: list = field(default_factory=list)   # storage.results.ResultFile, for DONE
    stop_prompt: bool = False   # the prompt may still be on the backend: stop it there


class RunEvents(Protocol):
    def prompt_chosen(self, job: Job, prompt_id: str) -> Awaitable: ...   # resolves once persisted
    def started(self, job: Job) -> None: ...
    def progressed(self, job: Job, percent: float) -> None: ...
    def executed(self, job: Job, loads: dict[str, float]) -> None: ...   # the backend is done with it: its
    # slot may move on; `loads`: seconds its loader nodes ran, per model file
    def previewed(self, job: Job, node_id, content_type: str, image: bytes) -> None: ...


class PromptRun:
    def __init__(self, job: Job, backend: Backend, events: RunEvents, results, *,
                 deadline: float, execution_timeout: float):
        self.job = job
        self.backend = backend
        self.events = events
        self.results = results          # storage.results.ResultStore
        # time.monotonic() by which the prompt must have ended: given for the time it may wait in
        # the backend's queue, then EXECUTION_TIMEOUT from its execution_start.
        self.deadline = deadline
        self.execution_timeout = execution_timeout
        self._deadline_moved: asyncio.Future | None = None
        # What its loads cost: the time from a loader node's `executing` to the next node's.
        self.loaders = loader_nodes(job.graph)
        self.loads: dict[str, float] = {}    # model file -> seconds its loader node ran
        self._node: tuple[str, float] | None = None   # the node executing now, since when
        self.prompt_id: str | None = job.prompt_id
        self.tracker: ProgressTracker | None = None
        self.watch = PromptWatch(self._on_event)

    async def start(self, chosen: Awaitable | None = None) -> Outcome:
        """Run the job under `job.prompt_id` when the service chose it at dispatch; `chosen`
        resolves once the record carrying that id is on disk."""
        return await self._guarded(lambda: self._submit(chosen))

    async def resume(self, wait_up: float) -> Outcome:
        """After a bridge restart: follow the job's prompt if its backend still knows it."""
        async def resumed() -> Outcome | None:
            if not await self.backend.wait_up(wait_up) or not await self._find_prompt():
                return Outcome(Ending.NOT_RESUMED, f"backend {self.backend.address} no longer had its prompt")
            return None
        return await self._guarded(resumed)

    # ------------------------------------------------------------------ steps
    async def _guarded(self, begin) -> Outcome:
        try:
            early = await begin()
            if early is not None:
                return early
            return await self._follow()
        except BackendRejected as exc:
            return Outcome(Ending.FAILED, describe_rejection(exc.body, self.job.graph, exc.status))
        except BackendUnavailable as exc:
            return Outcome(Ending.LOST, f"backend {self.backend.address} failed: {exc}")
        finally:
            if self.prompt_id is not None:
                self.backend.unlisten(self.prompt_id)

    async def _submit(self, saving: Awaitable | None) -> Outcome | None:
        """Files first, then POST /prompt. A backend that restarted since it got our files
        refuses them at validation: upload them again, once, under a new prompt id."""
        job, backend = self.job, self.backend
        for attempt in (1, 2):
            if saving is not None and self.prompt_id is not None:
                self._listen(self.prompt_id)
            else:
                self._listen(str(uuid.uuid4()))
                saving = self.events.prompt_chosen(job, self.prompt_id)
            # On disk before the backend hears of it (a restart then finds the prompt rather
            # than running the job twice); the commit overlaps the uploads.
            chosen, saving = asyncio.ensure_future(saving), None
            try:
                graph = await self._place_files()
            except BaseException:
                chosen.add_done_callback(_retrieve)  # a failed write is the store's to log
                raise
            self.tracker = ProgressTracker(graph, backend.output_classes)
            await chosen
            try:
                answer = await api.submit_prompt(backend, graph, self.prompt_id)
            except BackendRejected as exc:
                if exc.status >= 500:
                    return Outcome(Ending.REJECTED, str(exc))
                if attempt == 1 and job.files and lost_input_file(exc.body, {k.split("/", 1)[0] for k in job.files}):
                    backend.files.forget(job.files.values())
                    continue
                raise
            except BackendUnavailable as exc:
                if exc.fatal or not backend.accepts_prompt_ids:
                    raise   # lost: requeued, and stopped there if that backend comes back with it
                # No answer in time: it may have been queued all the same.
                if await self._read(api.has_prompt, self.prompt_id):
                    answer = None
                    break
                return Outcome(Ending.REJECTED, f"no answer ({exc})", stop_prompt=True)
            break
        real = answer.get("prompt_id") if isinstance(answer, dict) else None
        if isinstance(real, str) and real and real != self.prompt_id:
            # The server made its own id (older servers ignore ours; see api.submit_prompt).
            self._listen(real)
            await self.events.prompt_chosen(job, real)
        if isinstance(answer, dict) and answer.get("node_errors"):
            # Accepted with some outputs dropped: the client asked for the whole graph.
            return Outcome(Ending.FAILED, describe_rejection(answer, job.graph), stop_prompt=True)
        return None

    async def _find_prompt(self) -> bool:
        self.tracker = ProgressTracker(self.job.graph, self.backend.output_classes)
        self._listen(self.prompt_id)
        entry = await self._read(api.history_entry, self.prompt_id)
        ended = outcome_from_history(entry) if entry is not None else None
        if ended is not None:
            self.watch.resolve(ended, entry)
            return True
        running, pending = await self._read(api.prompts_on_backend)
        if self.prompt_id in running:
            self.events.started(self.job)
        # Its events go to the old socket's id: the history poll will see the end.
        return self.prompt_id in running | pending

    async def _place_files(self) -> dict:
        """The job's graph with each file input renamed to the file's name on the backend."""
        graph = {nid: {**node, "inputs": dict(node.get("inputs", {}))} for nid, node in self.job.graph.items()}
        for key, path in self.job.files.items():
            node_id, name = key.split("/", 1)
            graph[node_id]["inputs"][name] = await self.backend.files.place(path)
        return graph

    async def _follow(self) -> Outcome:
        kind, data = await self._await_end()
        if kind == "timeout":
            return Outcome(Ending.FAILED, f"time out error: exceed {_seconds(self.execution_timeout)}s",
                           stop_prompt=True)
        if kind == "interrupted":
            return Outcome(Ending.FAILED, INTERRUPTED)
        if kind == "error":
            reason = describe_execution_error(data, self.job.graph)
            return Outcome(Ending.OUT_OF_MEMORY if is_out_of_memory(data) else Ending.FAILED, reason)
        # ComfyUI serves /history and /view while it runs the next prompt: hand the slot on
        # now, so the GPU does not wait for our downloads.
        self.events.executed(self.job, self.loads)
        return await self._collect()

    async def _await_end(self) -> tuple[str, dict]:
        """Wait for the prompt's end from the websocket, polling history as a safety net."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", {}
            self._deadline_moved = asyncio.get_running_loop().create_future()
            done, _ = await asyncio.wait({self.watch.outcome, self._deadline_moved},
                                         timeout=min(remaining, HISTORY_POLL_INTERVAL),
                                         return_when=asyncio.FIRST_COMPLETED)
            if self.watch.outcome in done:
                return self.watch.outcome.result()
            if done:
                continue  # it started: the time left is counted from now
            try:
                entry = await api.history_entry(self.backend, self.prompt_id)
            except BackendUnavailable:
                continue  # counted by the transport; the websocket may still tell the end
            ended = outcome_from_history(entry) if entry is not None else None
            if ended is not None:
                self.watch.resolve(ended, entry)

    async def _collect(self) -> Outcome:
        # The websocket's `executed` events name the files, which spares the round trip to
        # the history; it stays the source when they do not name them all.
        entry = self.watch.entry or entry_from_events(self.watch.outputs, self.job.graph,
                                                      self.backend.output_classes)
        if entry is None:
            entry = await self._history_after_end()
            if entry is None:
                return Outcome(Ending.FAILED, "the backend finished the job but kept no history of it")
        stored = []
        try:
            for index, item in enumerate(output_files(entry, self.job.graph)):
                target = self.results.file_path(self.job.id, index, item.filename)
                stored.append(await self._read(download_to, item, target, self.results.keep))
        except OSError as exc:   # the bridge's own disk (full, read-only): no backend is to blame
            log.error("job %s: could not store its results: %s", self.job.id, exc)
            return Outcome(Ending.FAILED, f"the bridge could not store the results: {exc.strerror or exc}")
        return Outcome(Ending.DONE, results=stored)

    async def _history_after_end(self) -> dict | None:
        """The prompt's history entry, which ComfyUI writes just after it says the prompt
        ended; None if none came within HISTORY_WRITE_GRACE."""
        entry = None
        give_up = time.monotonic() + HISTORY_WRITE_GRACE
        delay = 0.01
        while entry is None:
            entry = await self._read(api.history_entry, self.prompt_id)
            if entry is None:
                if time.monotonic() > give_up:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        return entry

    async def _read(self, call, *args):
        """`call(backend, *args)` through failures while the backend is up, for READ_PATIENCE
        (each failure is counted by the transport; a dead backend stops this run)."""
        give_up, delay = time.monotonic() + READ_PATIENCE, 0.1
        while True:
            try:
                return await call(self.backend, *args)
            except BackendUnavailable:
                if not self.backend.up or time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    # ------------------------------------------------------------------ events
    def _listen(self, prompt_id: str) -> None:
        if self.prompt_id is not None and self.prompt_id != prompt_id:
            self.backend.unlisten(self.prompt_id)
        self.prompt_id = prompt_id
        self.backend.listen(prompt_id, self.watch)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "executing" and self.loaders:
            self._time_loaders(data.get("node"))
        if kind == "execution_start":
            self.deadline = time.monotonic() + self.execution_timeout
            if self._deadline_moved is not None and not self._deadline_moved.done():
                self._deadline_moved.set_result(None)
            self.events.started(self.job)
        elif kind == "preview":
            self.events.previewed(self.job, data.get("node"), data["content_type"], data["image"])
            return
        if self.tracker is not None and self.tracker.on_event(kind, data):
            self.events.progressed(self.job, self.tracker.percent)


    def _time_loaders(self, node) -> None:
        now = time.monotonic()
        if self._node is not None and self._node[0] in self.loaders:
            files = self.loaders[self._node[0]]
            for model in files:
                self.loads[model] = self.loads.get(model, 0.0) + (now - self._node[1]) / len(files)
        self._node = (str(node), now) if node is not None else None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
