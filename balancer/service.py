"""The core: the bridge's job queue, the scheduler and each job's run on a backend.

Handlers call `submit`, `status`, `cancel`, `results_delivered`, `free`; everything else happens
here on the IOLoop. A backend only ever receives a job when it has a free slot, so the
bridge's queue is the only queue that matters and cancelling a queued job never touches a
backend.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from .backend import Backend, BackendRejected, BackendUnavailable
from .hub import StatusHub
from .jobs import INTERRUPTED, Job, JobState, StopReason, status_message
from .progress import ProgressTracker
from storage.catalog import CatalogError
from storage.results import ResultFile
from .prompts import describe_execution_error, describe_rejection, output_files
from .transfer import download_to, upload_file

log = logging.getLogger("bridge.jobs")

HISTORY_POLL_INTERVAL = 2.0     # safety net for websocket events that never came
HISTORY_WRITE_GRACE = 10.0      # history is written just after execution_success


class RequestError(Exception):
    """Refused request; `status` is the HTTP status, str(self) the reason for the client."""

    def __init__(self, reason: str, status: int = 400, headers: dict | None = None):
        super().__init__(reason)
        self.status = status
        self.headers = headers or {}


class _PromptWatch:
    """Receives one prompt's backend events: progress, and the outcome as a future."""

    def __init__(self, service: "JobService", job: Job):
        self.service = service
        self.job = job
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.error_seen: dict | None = None

    def on_backend_event(self, kind: str, data: dict) -> None:
        if self.outcome.done():
            return
        if kind == "execution_error" and data.get("exception_type") != "ExecutionBlocked":
            self.outcome.set_result(("error", data))
        elif kind == "execution_interrupted":
            self.outcome.set_result(("interrupted", data))
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            # Servers before mid-2024 only end a prompt with `executing {node: null}`.
            self.outcome.set_result(("success", data))
        else:
            if kind == "execution_start" and not self.job.executing:
                self.job.executing = True
                self.service._progress(self.job, started=True)
            if self.job.tracker is not None and self.job.tracker.on_event(kind, data):
                self.service._progress(self.job)

    def resolve(self, outcome: str, data: dict) -> None:
        if not self.outcome.done():
            self.outcome.set_result((outcome, data))


class JobService:
    def __init__(self, settings, catalog, uploads, results, state, hub: StatusHub, store):
        self.settings = settings
        self.catalog = catalog
        self.uploads = uploads
        self.results = results
        self.state = state
        self.hub = hub
        self.store = store  # storage.jobstore.JobStore: every job change is written there
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Job] = deque()
        self.backends = [
            Backend(address, index=i, request_timeout=settings.backend_timeout,
                    health_interval=settings.health_check_interval, on_up=self._backend_up, on_down=self._backend_down)
            for i, address in enumerate(settings.comfyui_servers)]
        self._round_robin = 0
        self._pump_scheduled = False
        self._closing = False
        self._background: set[asyncio.Task] = set()
        self.counters: Counter[str] = Counter()  # events worth counting (metrics, tests)
        # Called as observer(event, job, backend, detail) on every job transition.
        self.observers: list = []

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        for backend in self.backends:
            backend.start()

    async def close(self) -> None:
        self._closing = True
        for job in list(self.jobs.values()):
            if job.task is not None:
                job.task.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)

    def restore(self, records: list[dict]) -> None:
        """Jobs from before a restart: queued ones queue again in their order, running ones
        are looked up on their backend by prompt_id, ended ones wait for their client."""
        by_address = {b.address: b for b in self.backends}
        front = []
        for record in sorted(records, key=lambda r: r.get("created", 0)):
            try:
                job = Job.from_record(record, ResultFile)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("stored job %r unreadable, skipped: %s", record.get("client_id"), exc)
                continue
            self.jobs[job.client_id] = job
            backend = by_address.get(record.get("backend"))
            job.last_backend = backend  # /free?clientId= still finds it
            if job.state is JobState.QUEUED:
                self.queue.append(job)
            elif job.state is JobState.RUNNING and backend is not None and job.prompt_id:
                job.backend = job.last_backend = backend
                job.dispatched_at = time.monotonic()
                backend.in_flight.add(job.id)
                job.task = self._spawn(self._run(job, backend, resume=True))
            elif job.state is JobState.RUNNING:  # never reached a backend: run it first
                job.state, job.prompt_id = JobState.QUEUED, None
                front.append(job)
        self.queue.extendleft(reversed(front))
        if records:
            log.info("restored %d job(s): %d queued, %d running, %d ended", len(self.jobs), len(self.queue),
                     sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING),
                     sum(1 for j in self.jobs.values() if j.ended))
        self._schedule_pump()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ requests
    async def submit(self, client_id: str, body: dict) -> int:
        """Validate and queue a job; returns N of `queued / N` once the job is on disk."""
        current = self.jobs.get(client_id)
        if current is not None and current.active:
            raise RequestError(f"clientId '{client_id}' already has a job {current.state.value}; "
                               "wait for it to end or interrupt it")
        if current is not None and current.state is JobState.DONE:
            raise RequestError(f"clientId '{client_id}' has results waiting; fetch them with "
                               "GET /history first or use a new clientId")
        if len(self.queue) >= self.settings.max_queue:
            raise RequestError(f"the queue is full ({len(self.queue)} jobs waiting); retry later",
                               status=503, headers={"Retry-After": "5"})
        alias = body.get("workflow")
        if not isinstance(alias, str) or not alias:
            raise RequestError("field 'workflow' is required: the alias of a workflow (see GET /workflow-list)")
        try:
            workflow = self.catalog.get(alias)
            values = {k: v for k, v in body.items() if k != "workflow"}
            graph, file_values = workflow.build_prompt(values)
        except CatalogError as exc:
            raise RequestError(str(exc)) from None
        files = self._resolve_files(workflow, graph, file_values)
        for path in files.values():
            if path.parent == self.uploads.directory:
                _touch(path)  # UPLOAD_TTL counts from the last use
        self._check_runnable(workflow)
        if current is not None:
            self._forget(current)
        job = Job(client_id=client_id, alias=alias, graph=graph, files=files,
                  class_types=workflow.class_types,
                  allowed_backends=tuple(workflow.backends) if workflow.backends else None)
        self.jobs[client_id] = job
        self.queue.append(job)
        position = len(self.queue)
        saved = self._transition(job, "queued", queue=position)
        self._schedule_pump()
        await saved
        return position

    def _resolve_files(self, workflow, graph: dict, file_values: dict[str, str]) -> dict[str, Path]:
        """Map each file input to the local file the backend must receive before the prompt."""
        files: dict[str, Path] = {}
        for key, exposed in workflow.inputs.items():
            if not exposed.is_file:
                continue
            value = file_values.get(key, exposed.default)
            if key in file_values and value != exposed.default:
                if not isinstance(value, str) or not self.uploads.exists(value):
                    raise RequestError(f"input '{key}': file '{_clip(value)}' was never uploaded; "
                                       "upload it with POST /upload and pass the saved name")
                files[key] = self.uploads.path(value)
                continue
            # The workflow's own default: shipped beside the workflows, or already on the backend.
            asset = _asset_path(self.settings.workflow_dir, value)
            if asset is not None:
                files[key] = asset
        return files

    def _check_runnable(self, workflow) -> None:
        """400 when every backend whose node classes are known lacks one the workflow needs."""
        candidates = [b for b in self.backends
                      if workflow.backends is None or b.address in workflow.backends]
        if workflow.backends is not None and not candidates:
            raise RequestError(f"workflow '{workflow.alias}' names backends that are not configured: "
                               + ", ".join(workflow.backends))
        missing_everywhere = None
        for backend in candidates:
            if not backend.node_classes:
                return  # not known yet: let it queue
            missing = sorted(workflow.class_types - backend.node_classes)
            if not missing:
                return
            missing_everywhere = missing
        if missing_everywhere:
            raise RequestError(f"workflow '{workflow.alias}' needs node class "
                               f"{', '.join(missing_everywhere)}, which no backend has")

    def get(self, client_id: str) -> Job | None:
        return self.jobs.get(client_id)

    def queue_position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        for position, queued in enumerate(self.queue, start=1):
            if queued is job:
                return position
        return None

    def status(self, job: Job) -> dict:
        message = job.status(self.queue_position(job))
        if job.state is JobState.ERROR:
            job.error_reported = True
        return message

    def cancel(self, client_id: str, reason: str = INTERRUPTED) -> bool:
        """Cancel the client's queued or running job; False if there was none to cancel."""
        job = self.jobs.get(client_id)
        if job is None or not job.active:
            return False
        self._transition(job, "cancelled", was=job.state.value)
        if job.state is JobState.QUEUED:
            self._remove_from_queue(job)
        else:
            backend, prompt_id = job.backend, job.prompt_id
            job.stop_reason = StopReason.CANCEL
            self._release(job)
            if backend is not None and prompt_id is not None:
                self._spawn(self._stop_prompt(backend, prompt_id))
            if job.task is not None and job.task is not asyncio.current_task():
                job.task.cancel()
        self._fail(job, reason)
        self._schedule_pump()
        return True

    def results_delivered(self, job: Job) -> None:
        """GET /history sent everything: the job's life cycle ends here."""
        self._forget(job)

    def error_delivered(self, job: Job) -> None:
        self._forget(job)

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.client_id) is job:
            del self.jobs[job.client_id]
            self.store.save(job.client_id, None)
        if job.results:
            self._spawn(self._remove_results(job.id))
        job.results = []

    async def _remove_results(self, job_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.results.remove_job, job_id)

    async def free(self, client_id: str | None) -> None:
        if client_id is None:
            targets = [b for b in self.backends if b.up]
        else:
            job = self.jobs.get(client_id)
            backend = job and (job.backend or job.last_backend)
            if backend is None:
                raise RequestError(f"clientId '{client_id}' has no job on a backend to free")
            targets = [backend]
        await asyncio.gather(*(self._free_backend(b) for b in targets))

    async def _free_backend(self, backend: Backend) -> None:
        try:
            await backend.call("POST", "/free", {"unload_models": True, "free_memory": True})
            self.counters["free_sent"] += 1
            backend.stats.since_free = 0
            log.info("backend %s asked to free memory", backend.address)
        except (BackendUnavailable, BackendRejected) as exc:
            log.warning("free on %s failed: %s", backend.address, exc)

    # ------------------------------------------------------------------ scheduling
    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closing:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Give every queued job that some backend can take now to the best such backend."""
        self._pump_scheduled = False
        limit = self.settings.max_inflight_per_server
        free = sum(limit - len(b.in_flight) for b in self.backends if b.up and len(b.in_flight) < limit)
        if not free or not self.queue:
            return  # the common case under load: O(1), not a scan of the whole queue
        taken = []
        for job in self.queue:
            backend = self._pick_backend(job)
            if backend is None:
                continue
            taken.append(job)
            self._dispatch(job, backend)
            free -= 1
            if not free:
                break
        for job in taken:
            self._remove_from_queue(job)

    def _pick_backend(self, job: Job) -> Backend | None:
        limit = self.settings.max_inflight_per_server
        count = len(self.backends)
        best, best_key = None, None
        for backend in self.backends:
            if not backend.up or len(backend.in_flight) >= limit:
                continue
            if job.allowed_backends is not None and backend.address not in job.allowed_backends:
                continue
            if backend.node_classes and not job.class_types <= backend.node_classes:
                continue
            recent = backend.stats.mean_duration(job.alias)
            key = (len(backend.in_flight), recent or 0.0, (backend.index - self._round_robin) % count)
            if best_key is None or key < best_key:
                best, best_key = backend, key
        return best

    def _remove_from_queue(self, job: Job) -> None:
        try:
            self.queue.remove(job)
        except ValueError:
            pass

    def _dispatch(self, job: Job, backend: Backend) -> None:
        self._round_robin = (backend.index + 1) % len(self.backends)
        job.state = JobState.RUNNING
        job.backend = job.last_backend = backend
        job.stop_reason = None
        job.attempts += 1
        job.dispatched_at = time.monotonic()
        backend.in_flight.add(job.id)
        self._transition(job, "dispatched", backend, waited=time.time() - job.created)
        job.task = self._spawn(self._run(job, backend))

    def _release(self, job: Job) -> None:
        backend = job.backend
        if backend is not None:
            backend.in_flight.discard(job.id)
            if job.prompt_id is not None:
                backend.unlisten(job.prompt_id)
        job.backend = None
        self._schedule_pump()

    def _backend_up(self, backend: Backend) -> None:
        if backend.abandoned:
            prompts, backend.abandoned = backend.abandoned, set()
            self._spawn(self._clean_abandoned(backend, prompts))
        self._schedule_pump()

    async def _clean_abandoned(self, backend: Backend, prompts: set[str]) -> None:
        """Prompts whose jobs moved elsewhere must not run (or be kept) here as well."""
        for prompt_id in prompts:
            await self._stop_prompt(backend, prompt_id)
        await self._forget_on_backend(backend, sorted(prompts))

    def _backend_down(self, backend: Backend) -> None:
        """Its jobs go back to the front of the queue; their tasks stop where they are."""
        for job in [j for j in self.jobs.values() if j.backend is backend and j.state is JobState.RUNNING]:
            job.stop_reason = StopReason.BACKEND_LOST
            if job.task is not None and job.task is not asyncio.current_task():
                job.task.cancel()
                self._requeue_or_fail(job, f"backend {backend.address} was lost")

    def _requeue_or_fail(self, job: Job, why: str, counted: bool = True) -> None:
        if job.backend is not None and job.prompt_id is not None:
            # If that backend comes back still holding the prompt, it is stopped there.
            job.backend.abandoned.add(job.prompt_id)
        self._release(job)
        job.prompt_id = None
        if counted and job.requeues >= self.settings.max_retries:
            self._fail(job, f"{why}; gave up after {job.attempts} attempts")
            return
        job.requeues += counted
        job.state, job.executing = JobState.QUEUED, False
        self.queue.appendleft(job)
        self._transition(job, "requeued", reason=why)
        self._schedule_pump()

    # ------------------------------------------------------------------ one run
    async def _run(self, job: Job, backend: Backend, resume: bool = False) -> None:
        watch = _PromptWatch(self, job)
        try:
            if not resume:
                await self._submit_prompt(job, backend, watch)
            elif not await self._resume_prompt(job, backend, watch):
                self._requeue_or_fail(job, f"backend {backend.address} no longer had its prompt", counted=False)
                return
            outcome, data = await self._await_outcome(job, backend, watch)
            if outcome == "success":
                # ComfyUI serves /history and /view while it runs the next prompt: hand the
                # slot on now, so the GPU does not wait for our downloads.
                backend.in_flight.discard(job.id)
                self._schedule_pump()
            if outcome == "error":
                await self._execution_failed(job, backend, data)
                return
            if outcome == "interrupted":
                raise _JobFailed(INTERRUPTED)
            await self._collect_results(job, backend)
        except asyncio.CancelledError:
            if job.stop_reason is None:
                raise  # shutting down
        except _JobFailed as failure:
            self._release(job)
            backend.stats.failed += 1
            self._fail(job, str(failure))
        except BackendRejected as exc:
            self._release(job)
            backend.stats.failed += 1
            self._fail(job, describe_rejection(exc.body, job.graph, exc.status))
        except BackendUnavailable as exc:
            if job.state is JobState.RUNNING and job.stop_reason in (None, StopReason.BACKEND_LOST):
                self._requeue_or_fail(job, f"backend {backend.address} failed: {exc}")

    async def _submit_prompt(self, job: Job, backend: Backend, watch: _PromptWatch) -> None:
        """Files first, then POST /prompt. A backend that restarted since it got our files
        refuses them at validation: upload them again, once."""
        for attempt in (1, 2):
            graph = await self._place_files(job, backend)
            job.prompt_id = str(uuid.uuid4())  # canonical form: current ComfyUI refuses others
            job.tracker = ProgressTracker(graph, backend.output_classes)
            backend.listen(job.prompt_id, watch)
            # Written before the backend hears of it, so a restart knows where to look.
            await self.store.save(job.client_id, job.to_record())
            try:
                answer = await backend.call("POST", "/prompt", {
                    "prompt": graph, "client_id": backend.ws_client_id, "prompt_id": job.prompt_id})
            except BackendRejected as exc:
                backend.unlisten(job.prompt_id)
                if attempt == 1 and job.files and _lost_input_file(exc.body, job.files):
                    log.warning("backend %s lost input files of job %s; uploading them again",
                                backend.address, job.id)
                    for path in job.files.values():
                        backend.uploaded.pop(str(path), None)
                    continue
                raise
            self._adopt_prompt_id(job, backend, watch, answer)
            if isinstance(answer, dict) and answer.get("node_errors"):
                # Accepted with some outputs dropped: the client asked for the whole graph.
                self._spawn(self._stop_prompt(backend, job.prompt_id))
                raise _JobFailed(describe_rejection(answer, job.graph))
            return

    async def _resume_prompt(self, job: Job, backend: Backend, watch: _PromptWatch) -> bool:
        """After a bridge restart: is the job's prompt still known to its backend?"""
        if not await backend.wait_up(max(self.settings.backend_timeout, 10.0)):
            return False
        job.tracker = ProgressTracker(job.graph, backend.output_classes)
        backend.listen(job.prompt_id, watch)
        entry = await self._history_entry(backend, job.prompt_id)
        if entry is not None:
            outcome = _outcome_from_history(entry)
            if outcome is not None:
                watch.resolve(*outcome)
                return True
        running, pending = await _backend_queue(backend)
        if job.prompt_id in running | pending:
            job.executing = job.prompt_id in running
            return True  # its events go to the old socket's id: the history poll will see the end
        backend.unlisten(job.prompt_id)
        return False

    def _adopt_prompt_id(self, job: Job, backend: Backend, watch: _PromptWatch, answer) -> None:
        """Servers before mid-2025 ignore a client-chosen prompt_id and make their own."""
        real = answer.get("prompt_id") if isinstance(answer, dict) else None
        if isinstance(real, str) and real and real != job.prompt_id:
            backend.unlisten(job.prompt_id)
            job.prompt_id = real
            backend.listen(real, watch)

    async def _place_files(self, job: Job, backend: Backend) -> dict:
        """Put the job's input files on the backend (once per file and backend), rewrite names."""
        graph = {nid: {**node, "inputs": dict(node.get("inputs", {}))} for nid, node in job.graph.items()}
        for key, path in job.files.items():
            node_id, name = key.split("/", 1)
            graph[node_id]["inputs"][name] = await self._file_on_backend(backend, path)
        return graph

    async def _file_on_backend(self, backend: Backend, path: Path) -> str:
        """The file's name on the backend; concurrent jobs share one upload of it."""
        key = str(path)
        if key in backend.uploaded:
            return backend.uploaded[key]
        pending = backend.uploading.get(key)
        if pending is None:
            pending = backend.uploading[key] = asyncio.ensure_future(upload_file(backend, path))
            pending.add_done_callback(lambda _: backend.uploading.pop(key, None))
        remote = await asyncio.shield(pending)
        backend.uploaded[key] = remote
        return remote

    async def _await_outcome(self, job: Job, backend: Backend, watch: _PromptWatch):
        """Wait for the prompt's end from the websocket, polling history as a safety net."""
        deadline = job.dispatched_at + self.settings.execution_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._spawn(self._stop_prompt(backend, job.prompt_id))
                raise _JobFailed(f"time out error: exceed {_seconds(self.settings.execution_timeout)}s")
            done, _ = await asyncio.wait({watch.outcome}, timeout=min(remaining, HISTORY_POLL_INTERVAL))
            if done:
                return watch.outcome.result()
            entry = await self._history_entry(backend, job.prompt_id)
            if entry is not None:
                outcome = _outcome_from_history(entry)
                if outcome is not None:
                    watch.resolve(*outcome)

    async def _history_entry(self, backend: Backend, prompt_id: str) -> dict | None:
        answer = await backend.call("GET", f"/history/{prompt_id}")
        if isinstance(answer, dict) and isinstance(answer.get(prompt_id), dict):
            return answer[prompt_id]
        return None

    async def _execution_failed(self, job: Job, backend: Backend, data: dict) -> None:
        backend.stats.failed += 1
        reason = describe_execution_error(data, job.graph)
        if _is_out_of_memory(data) and not job.oom_retried:
            job.oom_retried = True
            log.warning("out of memory on %s for job %s: freeing it and retrying once", backend.address, job.id)
            await self._free_backend(backend)
            self._release(job)
            job.prompt_id = None
            job.state, job.executing = JobState.QUEUED, False
            self.queue.appendleft(job)
            self._transition(job, "requeued", backend, reason="out of memory; retrying once after /free")
            self._schedule_pump()
            return
        self._release(job)
        self._fail(job, reason)

    async def _collect_results(self, job: Job, backend: Backend) -> None:
        entry = None
        give_up = time.monotonic() + HISTORY_WRITE_GRACE
        delay = 0.01
        while entry is None:
            entry = await self._history_entry(backend, job.prompt_id)
            if entry is None:
                if time.monotonic() > give_up:
                    raise _JobFailed("the backend finished the job but kept no history of it")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        files = output_files(entry, job.graph)
        stored = []
        for index, item in enumerate(files):
            target = self.results.file_path(job.id, index, item.filename)
            stored.append(await download_to(backend, item, target))
        await self._finish(job, backend, stored)
        # Only once the results are safely ours: a crash before this point finds them again.
        self._spawn(self._forget_on_backend(backend, [job.prompt_id]))

    async def _forget_on_backend(self, backend: Backend, prompt_ids: list[str]) -> None:
        try:
            await backend.call("POST", "/history", {"delete": prompt_ids})
        except (BackendUnavailable, BackendRejected):
            pass

    async def _finish(self, job: Job, backend: Backend, stored: list) -> None:
        duration = time.monotonic() - job.dispatched_at
        backend.stats.completed += 1
        backend.stats.since_free += 1
        backend.stats.record_duration(job.alias, duration)
        self._release(job)
        job.results = stored
        job.state = JobState.DONE
        job.percent = 100.0
        job.finished_at = time.time()
        count = self.state.increment()
        saved = self._transition(job, "done", backend, count=count, duration=duration, files=len(stored))
        n = self.settings.free_after_n_generations
        if n and backend.stats.since_free >= n:
            backend.stats.since_free = 0
            self._spawn(self._free_backend(backend))
        await saved  # `closed` promises the results are there, even across a crash
        self.hub.publish(job.client_id, job.status(), final=True)

    def _fail(self, job: Job, reason: str) -> None:
        job.state = JobState.ERROR
        job.error = reason
        job.finished_at = time.time()
        if job.tracker is not None:
            job.tracker = None
        self._transition(job, "failed", job.last_backend, reason=reason)
        if self.hub.publish(job.client_id, status_message("error", reason), final=True):
            job.error_reported = True

    def _progress(self, job: Job, started: bool = False) -> None:
        """Tell the client when its job starts and whenever its percent moves."""
        percent = job.tracker.percent if job.tracker is not None else job.percent
        if percent > job.percent or started:
            job.percent = max(percent, job.percent)
            job.executing = True
            self.hub.publish(job.client_id, job.status())

    async def _stop_prompt(self, backend: Backend, prompt_id: str) -> None:
        """Stop one prompt and nothing else: delete it if still waiting, interrupt it if running."""
        try:
            running, pending = await _backend_queue(backend)
            if prompt_id in pending:
                await backend.call("POST", "/queue", {"delete": [prompt_id]})
            elif prompt_id in running:
                # Only when it runs now: servers older than 2025-09 ignore the prompt_id and
                # interrupt whatever runs, which is then this prompt.
                await backend.call("POST", "/interrupt", {"prompt_id": prompt_id})
        except (BackendUnavailable, BackendRejected) as exc:
            log.warning("could not stop prompt %s on %s: %s", prompt_id, backend.address, exc)

    def snapshot(self, now: float) -> dict:
        """What GET /status shows: each backend, the queue, the jobs."""
        oldest = min((job.created for job in self.queue), default=None)
        states: dict[str, int] = {}
        for job in self.jobs.values():
            states[job.state.value] = states.get(job.state.value, 0) + 1
        return {
            "backends": [{
                "address": b.address,
                "up": b.up,
                "since": round(b.state_since, 3),
                "in_flight": len(b.in_flight),
                "completed": b.stats.completed,
                "failed": b.stats.failed,
                "last_error": b.stats.last_error,
                "mean_duration": _rounded(b.stats.mean_duration()),
            } for b in self.backends],
            "queue": {"length": len(self.queue),
                      "oldest_wait": round(now - oldest, 3) if oldest else 0.0},
            "jobs": states,
            "generation_count": self.state.generation_count,
        }

    # ------------------------------------------------------------------ observation
    def _transition(self, job: Job, event: str, backend: Backend | None = None, count: int | None = None,
                    **detail) -> asyncio.Future:
        """One log line per job transition, the same facts to observers (metrics), and the
        job's new state on disk (the returned future resolves once it is written)."""
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
        level = logging.WARNING if event == "requeued" else logging.INFO
        if job.dispatched_at is not None and event in ("failed", "cancelled") and "duration" not in detail:
            detail["duration"] = time.monotonic() - job.dispatched_at
        log.log(level, "job %s clientId=%s job=%s workflow=%s prompt=%s backend=%s %s", event, job.client_id,
                job.id, job.alias, job.prompt_id or "-", backend.address if backend else "-", extra)
        for observer in self.observers:
            observer(event, job, backend, detail)
        if event == "expired":  # _forget deletes the row
            return asyncio.get_running_loop().create_future()
        return self.store.save(job.client_id, job.to_record(), count)

    # ------------------------------------------------------------------ upkeep
    def sweep_expired(self, now: float | None = None) -> list[str]:
        """Drop ended jobs whose results or errors waited longer than RESULT_TTL."""
        now = now or time.time()
        expired = [job for job in self.jobs.values()
                   if job.ended and job.finished_at and now - job.finished_at > self.settings.result_ttl]
        for job in expired:
            self._transition(job, "expired", was=job.state.value)
            self._forget(job)
        return [job.client_id for job in expired]


class _JobFailed(Exception):
    pass


async def _backend_queue(backend: Backend) -> tuple[set[str], set[str]]:
    """Prompt ids running and waiting on a backend (GET /queue items are [number, id, ...])."""
    answer = await backend.call("GET", "/queue")
    answer = answer if isinstance(answer, dict) else {}

    def ids(key: str) -> set[str]:
        items = answer.get(key)
        return {item[1] for item in items if isinstance(item, list) and len(item) > 1} if isinstance(items, list) else set()
    return ids("queue_running"), ids("queue_pending")


def _outcome_from_history(entry: dict):
    status = entry.get("status") or {}
    if status.get("completed") and status.get("status_str") == "success":
        return "success", {}
    if status.get("status_str") == "error":
        for kind, data in status.get("messages") or ():
            if kind in ("execution_error", "execution_interrupted"):
                return ("error" if kind == "execution_error" else "interrupted"), data
        return "error", {"exception_message": "execution failed"}
    return None


def _lost_input_file(body, files: dict[str, Path]) -> bool:
    """A 400 from /prompt that says one of the job's file inputs is not there."""
    file_nodes = {key.split("/", 1)[0] for key in files}
    for node_id, info in ((body or {}).get("node_errors") or {}).items() if isinstance(body, dict) else ():
        if node_id in file_nodes and any(
                isinstance(e, dict) and e.get("type") == "custom_validation_failed"
                for e in (info or {}).get("errors") or ()):
            return True
    return False


def _is_out_of_memory(data: dict) -> bool:
    text = f"{data.get('exception_type', '')} {data.get('exception_message', '')}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _asset_path(workflow_dir: Path, name) -> Path | None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = Path(workflow_dir) / name
    return path if path.is_file() else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _clip(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
