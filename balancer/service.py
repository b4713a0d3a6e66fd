"""The core: the bridge's jobs, its queue, and the one place where what happens to a job is
applied (state, queue, persistence, client messages).

Handlers call `submit`, `wait_for_end`, `status_of`, `cancel`, `interrupt`, `history`,
`results_sent`, `free` and `snapshot`. The scheduler (`scheduler.py`) decides where a queued
job runs; a run (`run.py`) carries one prompt on one backend and ends with an outcome, applied
here. A backend receives a job only when it has a free slot (MAX_INFLIGHT_PER_SERVER: the
prompt it runs and those waiting in its own queue, scheduler.py), so cancelling a job still in
the bridge's queue never touches a backend.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from logs import log_job_event
from .comfy import api
from .comfy.backend import Backend
from .errors import Busy, JobFailed, Refused, ResultsWaiting, TenantBusy, UnknownClient
from .hub import StatusHub
from .intake import JobIntake
from .queue import JobQueue
from .jobs import CONNECTED_DETAIL, DEFAULT_TENANT, INTERRUPTED, Job, JobState, StopReason, status_message
from .restore import plan_restore
from .run import Ending, Outcome, PromptRun
from .scheduler import Placement, Scheduler, can_run, given_up, waiting_reason
from .snapshot import service_snapshot

log = logging.getLogger("bridge.jobs")
RESUME_WAIT = 10.0   # seconds a restored job waits for its backend to come back
RETRY_AFTER = 5      # seconds a client refused for a full queue (or its tenant's) is told to wait


@dataclass
class SchedulingCost:
    """What the dispatcher spent: runs of `_pump`, seconds in them, jobs they dispatched (/metrics)."""
    runs: int = 0
    seconds: float = 0.0        # choosing (Scheduler.plan) and dispatching
    plan_seconds: float = 0.0   # choosing only
    placed: int = 0


class JobService:
    def __init__(self, settings, catalog, uploads, results, state, hub: StatusHub, store, webhooks=None):
        self.settings = settings
        self.results = results          # storage.results.ResultStore
        self.state = state              # storage.state.StateFile: the generation count
        self.hub = hub
        self.store = store              # storage.jobstore.JobStore: every job change is written there
        self.webhooks = webhooks        # balancer.webhooks.WebhookSender (checks the `webhook` option)
        self.intake = JobIntake(catalog, uploads, settings.workflow_dir)
        self.scheduler = Scheduler(settings.max_inflight_per_server)
        self.jobs: dict[str, Job] = {}
        self._running: dict[str, set[Job]] = {}   # tenant -> its jobs in state RUNNING (_count_running)
        # Fair shares between tenants live in the queue's order (balancer/queue.py).
        self.queue = JobQueue(settings.tenant_max_running, self.running_of)
        self.backends = [
            Backend(address, request_timeout=settings.backend_timeout, health_interval=settings.health_check_interval,
                    on_up=self._backend_up, on_down=self._backend_down, models_kept=settings.models_kept_per_server)
            for address in settings.comfyui_servers]
        self._pump_scheduled = False
        self.scheduling = SchedulingCost()
        self._closing = False
        self._background: set[asyncio.Task] = set()
        self.cleanup = api.HistoryCleanup()   # history entries of stored results, deleted in batches
        self.counters: Counter[str] = Counter()  # events worth counting (metrics, tests)
        self._end_waiters: dict[str, list[asyncio.Future]] = {}   # job id -> `wait_for_end` callers
        # Called as observer(event, job, backend, detail) on every job transition.
        self.observers: list = [log_job_event]
        self.preview_listeners: list = []   # called as listener(job, node_id, content_type, image)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        for backend in self.backends:
            backend.start()

    async def close(self) -> None:
        self._closing = True
        for job_id in list(self._end_waiters):  # held requests answer now, before their connections go
            self._wake(job_id)
        for job in list(self.jobs.values()):
            if job.task is not None:
                job.task.cancel()
        for task in list(self._background):
            task.cancel()
        self.cleanup.close()
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)

    def restore(self, records: list[dict]) -> None:
        """Carry on with the jobs of the job database (see restore.plan_restore)."""
        plan = plan_restore(records, self.backends)
        self.jobs.update((job.client_id, job) for job in plan.jobs)
        for job in plan.queue:
            self.queue.append(job)
        for job in plan.resume:
            self._count_running(job)
            job.dispatched_at = time.monotonic()
            job.backend.take_slot(job.id, job.alias)
            job.task = self._spawn(self._run(job, job.backend, resume=True))
        if plan.jobs:
            log.info("restored %d job(s): %d queued, %d running, %d ended", len(plan.jobs), len(plan.queue),
                     len(plan.resume), sum(1 for j in plan.jobs if j.ended))
        self._schedule_pump()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ requests
    async def submit(self, client_id: str, alias: str, values: dict, webhook=None,
                     tenant: str = DEFAULT_TENANT, priority: int = 0) -> int:
        """Queue a job; returns its place in the queue once the job is on disk. `webhook`: a URL
        `check_webhook` accepted, the job's end is posted to (else WEBHOOK_URL, if set); `tenant`:
        whose job it is (its API key's name); `priority`: its order among the tenant's own jobs
        (higher first)."""
        current = self.check_can_submit(client_id, tenant)
        job = self.intake.build(client_id, alias, values, self.backends)
        job.webhook = webhook or self.settings.webhook_url or None
        job.tenant, job.priority = tenant, priority
        if current is not None:
            self._forget(current)
        position, saved = self._enqueue(job)
        waiting = self.waiting_for(job)
        if waiting is not None:  # its socket (if open) learns why nothing happens
            self.hub.publish(client_id, job.status(position, waiting))
        await saved
        return position

    async def check_webhook(self, webhook) -> str | None:
        """A generate's `webhook` option, checked (it may await DNS): the URL to post to, or
        Refused. Before anything a refusal would waste (fetching inputs given by URL)."""
        if webhook is None:
            return None
        if self.webhooks is None:
            raise Refused("webhook: this bridge sends no webhooks")
        return await self.webhooks.check(webhook)

    def submit_job(self, job: Job) -> asyncio.Future:
        """Queue a job built elsewhere (the v2 surface builds one from a whole graph) under the
        same refusals, queue and persistence as `submit`; its clientId must be new. Returns the
        future of its commit: what the caller saves before awaiting it joins the same commit."""
        if job.client_id in self.jobs:
            raise Refused(f"clientId '{job.client_id}' already has a job")
        self._check_room(job.tenant)
        return self._enqueue(job)[1]

    def _enqueue(self, job: Job) -> tuple[int, asyncio.Future]:
        """Queue a checked job: (its place, the future of its `queued` commit)."""
        self.jobs[job.client_id] = job
        self.queue.append(job)
        position = self.queue.position(job)
        facts = {"queue": position}
        if job.tenant != DEFAULT_TENANT:  # whose job and its priority, in its log line, when not the defaults
            facts["tenant"] = job.tenant
        if job.priority:
            facts["priority"] = job.priority
        saved = self._transition(job, "queued", **facts)
        self._schedule_pump()
        return position, saved

    def check_can_submit(self, client_id: str, tenant: str = DEFAULT_TENANT) -> Job | None:
        """What `submit` refuses before it looks at the request's values (a clientId with a job
        still going or results waiting, or another tenant's; a full queue); the clientId's
        current job otherwise. Also called before work a refusal would waste (fetching inputs
        given by URL)."""
        if self.holder(client_id) not in (None, tenant):
            # Said as for any clientId taken: nothing of the other tenant or its job.
            raise Refused(f"clientId '{client_id}' is in use; use a new clientId (a uuid4 is recommended)")
        current = self.jobs.get(client_id)
        if current is not None and current.active:
            raise Refused(f"clientId '{client_id}' already has a job {current.state.value}; "
                          "wait for it to end or interrupt it")
        if current is not None and current.state is JobState.DONE:
            raise ResultsWaiting(client_id)
        self._check_room(tenant)
        return current

    def refuse_if_full(self, client_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """Busy when `submit` would answer so, before the request's body is read: the queue (or
        the tenant's share of it) is full and the clientId has no job (whose refusal, a 400,
        comes first)."""
        if client_id not in self.jobs:
            self._check_room(tenant)

    def _check_room(self, tenant: str) -> None:
        if len(self.queue) >= self.settings.max_queue:
            raise Busy(f"the queue is full ({len(self.queue)} jobs waiting); retry later", retry_after=RETRY_AFTER)
        limit, waiting = self.settings.tenant_max_queued, self.queue.waiting_of(tenant)
        if limit and waiting >= limit:
            raise TenantBusy(tenant, waiting, limit, retry_after=RETRY_AFTER)

    def get(self, client_id: str, tenant: str | None = None) -> Job | None:
        """The clientId's job; with `tenant`, only if it is that tenant's."""
        job = self.jobs.get(client_id)
        return job if job is not None and tenant in (None, job.tenant) else None

    def holder(self, client_id: str) -> str | None:
        """The tenant a clientId belongs to while it has a job or an open socket, else None. To
        another tenant that clientId is as unknown as one never used, and it cannot take it."""
        job = self.jobs.get(client_id)
        return job.tenant if job is not None else self.hub.owner(client_id)

    def status(self, job: Job) -> dict:
        if job.state is not JobState.QUEUED:
            return job.status()
        return job.status(self.queue.position(job), self.waiting_for(job))

    def waiting_for(self, job: Job) -> str | None:
        return waiting_reason(job, self.backends)

    def expire_waiting(self, now: float) -> None:
        """QUEUE_TIMEOUT: fail queued jobs that no backend could take for that long."""
        limit = self.settings.queue_timeout
        if not limit or all(b.up for b in self.backends):
            return
        for job in [j for j in self.queue.every_job() if given_up(j, self.backends, now, limit)]:
            self.queue.remove(job)
            self._fail(job, f"{self.waiting_for(job)}; gave up after {limit:g}s", queue_timeout=True)

    def status_of(self, client_id: str, tenant: str = DEFAULT_TENANT) -> dict:
        """The client's job status; `connected` for a socket that has not generated yet."""
        if self.holder(client_id) != tenant:
            raise UnknownClient(client_id)
        job = self.jobs.get(client_id)
        return self.status(job) if job is not None else status_message("connected", CONNECTED_DETAIL)

    def cancel(self, client_id: str, reason: str = INTERRUPTED, tenant: str | None = None) -> bool:
        """Cancel the client's queued or running job (with `tenant`: only that tenant's); False if
        there was none to cancel."""
        job = self.get(client_id, tenant)
        if job is None or not job.active or self._closing:
            return False  # (shutting down: jobs are kept for the restart, not cancelled)
        self._transition(job, "cancelled", was=job.state.value)
        if job.state is JobState.QUEUED:
            self.queue.remove(job)
        else:
            backend, prompt_id = job.backend, job.prompt_id
            job.stop_reason = StopReason.CANCEL
            self._release(job)
            if backend is not None and prompt_id is not None:
                self._spawn(api.stop_prompt(backend, prompt_id))
            if job.task is not None and job.task is not asyncio.current_task():
                job.task.cancel()
        self._fail(job, reason, cancelled=True)   # observers count the end once: it was a cancel
        self._schedule_pump()
        return True

    def interrupt(self, client_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """POST /interrupt: cancel the job if it still waits or runs; an ended one is left as is."""
        if self.get(client_id, tenant) is None:
            raise UnknownClient(client_id)
        self.cancel(client_id, tenant=tenant)

    def history(self, client_id: str, tenant: str = DEFAULT_TENANT) -> Job | None:
        """The client's finished job with its results, or None while it waits or runs. A job
        that failed is reported once (JobFailed) and forgotten."""
        job = self.get(client_id, tenant)
        if job is None:
            raise UnknownClient(client_id)
        if job.state is JobState.ERROR:
            self._forget(job)
            raise JobFailed(job.error)
        return job if job.state is JobState.DONE else None

    async def wait_for_end(self, job: Job, timeout: float) -> bool:
        """Wait until the job has ended (results stored, or its error set) or `timeout` passed;
        True when it has ended. For generate's `wait=`."""
        if job.active and not self._closing:
            waiter = asyncio.get_running_loop().create_future()
            self._end_waiters.setdefault(job.id, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._end_waiters.get(job.id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._end_waiters[job.id]
        return job.ended

    def _wake(self, job_id: str) -> None:
        for waiter in self._end_waiters.pop(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def results_sent(self, job: Job, complete: bool) -> None:
        """The results went out; only a complete send ends the job (a broken one may be retried)."""
        if complete:
            self._forget(job)
        else:
            self.counters["history_broken"] += 1

    async def free(self, client_id: str | None, tenant: str = DEFAULT_TENANT) -> None:
        """Ask every backend that is up, or the one that ran the client's job, to free memory."""
        if client_id is None:
            targets = [b for b in self.backends if b.up]
        else:
            job = self.get(client_id, tenant)
            if job is None:
                raise UnknownClient(client_id)
            backend = job.backend or job.last_backend
            if backend is None:
                raise Refused(f"clientId '{client_id}' has no job on a backend to free")
            targets = [backend]
        await asyncio.gather(*(self._free(b) for b in targets))

    async def _free(self, backend: Backend) -> None:
        backend.gpu.forget()  # whether or not it answers: a model we believe loaded may not be
        if await api.free_memory(backend):
            self.counters["free_sent"] += 1

    def describe(self, workflow) -> dict:
        """GET /workflow-info: the workflow's inputs with the limits the backends report."""
        return self.intake.describe(workflow, self.backends)

    def snapshot(self, now: float) -> dict:
        return service_snapshot(self, now)

    # ------------------------------------------------------------------ scheduling
    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closing:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Give every queued job that some backend can take now to the scheduler's choice."""
        self._pump_scheduled = False
        began = time.perf_counter()
        placed = self.scheduler.plan(self.queue, self.backends, time.monotonic())
        planned = time.perf_counter()
        for placement in placed:
            self._dispatch(placement)
        for placement in placed:
            self.queue.remove(placement.job)
        cost = self.scheduling
        cost.runs += 1
        cost.placed += len(placed)
        cost.seconds += time.perf_counter() - began
        cost.plan_seconds += planned - began

    def _dispatch(self, placement: Placement) -> None:
        job, backend = placement.job, placement.backend
        job.state = JobState.RUNNING
        job.backend = job.last_backend = backend
        job.stop_reason = None
        job.attempts += 1
        job.dispatched_at = time.monotonic()
        job.started_at = None
        # Chosen here, so the record written for the dispatch carries it: one commit (often the
        # same as the job's `queued` one) puts it on disk before POST /prompt.
        job.prompt_id = str(uuid.uuid4())
        backend.take_slot(job.id, job.alias, placement.cold, placement.expected)
        backend.gpu.loaded(job.models)  # by the time the next prompt there runs, they are
        saved = self._transition(job, "dispatched", backend, waited=time.time() - job.created,
                                 expected=round(placement.expected, 3), warm=placement.warm)
        ahead = backend.load - 1   # prompts sent there before it, which it may wait behind
        job.task = self._spawn(self._run(job, backend, chosen=saved, prompts_ahead=ahead))

    def _release(self, job: Job) -> None:
        if job.backend is not None:
            job.backend.release_slot(job.id)
        job.backend = None
        self._schedule_pump()

    def _backend_up(self, backend: Backend) -> None:
        backend.gpu.forget()  # perhaps restarted: its GPU holds nothing we know of
        abandoned = backend.take_abandoned()
        if abandoned:  # their jobs moved elsewhere: they must not run (or be kept) here as well
            self._spawn(api.stop_and_forget(backend, sorted(abandoned)))
        self._schedule_pump()

    def _backend_down(self, backend: Backend) -> None:
        """Its jobs go back to the front of the queue, in the order they were sent (the one it ran
        first, then the one waiting behind it); their tasks stop where they are."""
        backend.gpu.forget()
        lost = [j for j in self.jobs.values() if j.backend is backend and j.state is JobState.RUNNING]
        for job in sorted(lost, key=lambda j: j.dispatched_at or 0.0, reverse=True):
            job.stop_reason = StopReason.BACKEND_LOST
            if job.task is not None and job.task is not asyncio.current_task():
                job.task.cancel()
                self._requeue_or_fail(job, f"backend {backend.address} was lost")

    def _requeue_or_fail(self, job: Job, why: str, counted: bool = True) -> None:
        backend = job.backend
        if backend is not None and job.prompt_id is not None:
            # Its prompt must not run there as well: stopped now, or when that backend is back.
            if backend.up:
                self._spawn(api.stop_and_forget(backend, [job.prompt_id]))
            else:
                backend.abandon(job.prompt_id)
        if counted and job.requeues >= self.settings.max_retries:
            self._release(job)
            self._fail(job, f"{why}; gave up after {job.attempts} attempts")
            return
        job.requeues += counted
        self._requeue(job, why)

    def _requeue(self, job: Job, why: str) -> None:
        self._release(job)
        job.prompt_id = job.started_at = None
        job.state, job.executing = JobState.QUEUED, False
        self.queue.push_front(job)
        self._transition(job, "requeued", reason=why)
        self._schedule_pump()

    # ------------------------------------------------------------------ runs and their outcomes
    async def _run(self, job: Job, backend: Backend, resume: bool = False, chosen=None, prompts_ahead: int = 0) -> None:
        # Until it starts, it may wait behind the prompts sent there before it, each of which
        # has EXECUTION_TIMEOUT from its own start.
        timeout = self.settings.execution_timeout
        run = PromptRun(job, backend, self, self.results, execution_timeout=timeout,
                        deadline=job.dispatched_at + timeout * (1 + prompts_ahead))
        try:
            outcome = await (run.resume(max(self.settings.backend_timeout, RESUME_WAIT)) if resume else run.start(chosen))
        except asyncio.CancelledError:
            if job.stop_reason is None:
                raise  # shutting down
            return     # cancelled or moved: already applied
        except Exception as exc:  # a fault of the bridge's own: the job still ends, its slot is freed
            log.exception("job %s: its run on %s failed", job.id, backend.address)
            outcome = Outcome(Ending.FAILED, f"the bridge failed while running the job ({type(exc).__name__})",
                              stop_prompt=True)
        if outcome.stop_prompt and run.prompt_id is not None:
            self._spawn(api.stop_prompt(backend, run.prompt_id))
        await self._apply(job, backend, outcome, run.prompt_id)

    async def _apply(self, job: Job, backend: Backend, outcome: Outcome, prompt_id: str | None) -> None:
        ending = outcome.ending
        if ending is Ending.DONE:
            await self._finish(job, backend, outcome.results)
            # Only once the results are safely ours: a crash before this point finds them again.
            if prompt_id is not None:
                self.cleanup.forget(backend, prompt_id)
        elif ending is Ending.LOST:
            if job.state is JobState.RUNNING and job.stop_reason in (None, StopReason.BACKEND_LOST):
                self._requeue_or_fail(job, outcome.reason)
        elif ending is Ending.REJECTED:
            self._refused(job, backend, outcome.reason)
        elif ending is Ending.NOT_RESUMED:
            self._requeue_or_fail(job, outcome.reason, counted=False)
        elif ending is Ending.OUT_OF_MEMORY and not job.oom_retried:
            backend.record_failed()
            job.oom_retried = True
            log.warning("out of memory on %s for job %s: freeing it and retrying once", backend.address, job.id)
            await self._free(backend)
            self._requeue(job, "out of memory; retrying once after /free")
        else:
            backend.record_failed()
            self._release(job)
            self._fail(job, outcome.reason)

    def _refused(self, job: Job, backend: Backend, answer: str) -> None:
        """A backend refused the prompt with a 5xx: one other backend may try it, no more, and
        nothing else is moved or marked down because of it (a poison prompt fails alone)."""
        job.refused_by[backend.address] = answer
        can_try = any(can_run(job, b) for b in self.backends)
        if len(job.refused_by) < 2 and can_try:
            self._requeue(job, f"backend {backend.address} refused the prompt: {answer}")
            return
        names = " and ".join(job.refused_by)
        self._release(job)
        self._fail(job, f"rejected by backend{'s' if len(job.refused_by) > 1 else ''} {names}: "
                        + "; ".join(job.refused_by.values()))

    async def _finish(self, job: Job, backend: Backend, results: list) -> None:
        duration = time.monotonic() - job.dispatched_at
        backend.record_completed(job.alias, duration)
        self._release(job)
        job.results = results
        job.state = JobState.DONE
        job.percent = 100.0
        job.finished_at = time.time()
        count = self.state.increment()
        saved = self._transition(job, "done", backend, count=count, duration=duration, files=len(results))
        n = self.settings.free_after_n_generations
        if n and backend.stats.since_free >= n:
            backend.record_freed()  # at once: the next job's end must not send a second /free
            self._spawn(self._free(backend))
        await saved  # `closed` promises the results are there, even across a crash
        self.hub.publish(job.client_id, job.status(), final=True)
        self._wake(job.id)

    def _fail(self, job: Job, reason: str, **detail) -> None:
        job.state = JobState.ERROR
        job.error = reason
        job.finished_at = time.time()
        self._transition(job, "failed", job.last_backend, reason=reason, **detail)
        self.hub.publish(job.client_id, status_message("error", reason), final=True)
        self._wake(job.id)

    # What runs tell the service while they go on (run.RunEvents). A run whose job was
    # cancelled or moved may still speak before its task stops: only a running job listens.
    def prompt_chosen(self, job: Job, prompt_id: str) -> asyncio.Future:
        job.prompt_id = prompt_id
        return self.store.save(job.client_id, job.to_record())

    def started(self, job: Job) -> None:
        if job.state is not JobState.RUNNING:
            return
        if job.started_at is None:
            job.started_at = time.monotonic()
            if job.backend is not None:
                job.backend.slot_started(job.id, job.started_at)
        if not job.executing:
            job.executing = True
            self.hub.publish(job.client_id, job.status())

    def progressed(self, job: Job, percent: float) -> None:
        if job.state is JobState.RUNNING and percent > job.percent:
            job.percent = percent
            job.executing = True
            self.hub.publish(job.client_id, job.status())

    def previewed(self, job: Job, node_id, content_type: str, image: bytes) -> None:
        """A preview image from the backend, for whoever shows previews (kept by none here)."""
        if job.state is JobState.RUNNING:
            for listener in self.preview_listeners:
                listener(job, node_id, content_type, image)

    def executed(self, job: Job, loads: dict[str, float]) -> None:
        """The prompt ended well: learn how long it ran (`loads`: seconds its loader nodes spent,
        per model file), and hand its slot on."""
        backend = job.backend
        if backend is not None:
            for model, seconds in loads.items():
                backend.gpu.record_load(model, seconds)
            if job.started_at is not None:
                ran = time.monotonic() - job.started_at - sum(loads.values())
                backend.gpu.record(job.alias, not loads, max(ran, 0.0))
            backend.release_slot(job.id)
        self._schedule_pump()

    # ------------------------------------------------------------------ observation and upkeep
    def _transition(self, job: Job, event: str, backend: Backend | None = None, count: int | None = None,
                    persist: bool = True, **detail) -> asyncio.Future | None:
        """Tell the observers (the job log, metrics) and write the job's new state to disk; the
        returned future resolves once it is written."""
        if job.dispatched_at is not None and event in ("failed", "cancelled") and "duration" not in detail:
            detail["duration"] = time.monotonic() - job.dispatched_at
        self._count_running(job)
        for observer in self.observers:
            observer(event, job, backend, detail)
        return self.store.save(job.client_id, job.to_record(), count) if persist else None

    # ------------------------------------------------------------------ tenants
    def running_of(self, tenant: str) -> int:
        """The tenant's jobs running now (what TENANT_MAX_RUNNING limits)."""
        return len(self._running.get(tenant, ()))

    def tenant_counts(self) -> dict[str, dict[str, int]]:
        """Queued and running jobs per tenant: the configured tenants and any that has jobs."""
        waiting = self.queue.waiting_by_tenant()
        names = dict.fromkeys([*self.settings.tenants, *sorted(set(waiting) | set(self._running))])
        return {name: {"queued": waiting.get(name, 0), "running": self.running_of(name)} for name in names}

    def _count_running(self, job: Job) -> None:
        """Keep the running jobs per tenant in step with the job's state (called on every
        transition). A job that starts running was its tenant's turn: the queue's round-robin
        goes on after that tenant."""
        running = self._running.setdefault(job.tenant, set())
        if job.state is JobState.RUNNING:
            if job not in running:
                running.add(job)
                self.queue.served(job.tenant)
        else:
            running.discard(job)
            if not running:
                del self._running[job.tenant]

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.client_id) is job:
            del self.jobs[job.client_id]
            self.store.save(job.client_id, None)
        if job.results:
            self.results.release(job.results)
            self._spawn(self._remove_results(job.id, job.results))
        job.results = []

    async def _remove_results(self, job_id: str, files: list) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.results.remove_results, job_id, files)

    def sweep_expired(self, now: float | None = None) -> list[str]:
        """Drop ended jobs whose results or errors waited longer than RESULT_TTL."""
        now = now or time.time()
        expired = [job for job in self.jobs.values()
                   if job.ended and job.finished_at and now - job.finished_at > self.settings.result_ttl]
        for job in expired:
            self._transition(job, "expired", persist=False, was=job.state.value)
            self._forget(job)  # deletes its row
        return [job.client_id for job in expired]

    def files_in_use(self) -> tuple[set[str], set[str]]:
        """What the disk sweep must keep: upload names active jobs need, job ids with results."""
        uploads = {path.name for job in self.jobs.values() if job.active for path in job.files.values()}
        results = {job.id for job in self.jobs.values() if job.results or job.active}
        return uploads, results
