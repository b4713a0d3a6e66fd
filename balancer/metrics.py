"""Prometheus metrics of one bridge, served at GET /metrics.

Each bridge has its own `CollectorRegistry` (never the process-wide one), so several bridges
in one process (the tests) do not clash. Two kinds of series:

- counted as things happen: job transitions arrive through `JobService.observers`; uploads,
  /free calls and HTTP requests are counted by their handlers and the request log;
- read at scrape time from the objects that already hold the state (queue, backends, status
  hub, state file), so nothing is kept twice and nothing can drift.
"""
from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("bridge.metrics")

# A job runs for seconds to many minutes (EXECUTION_TIMEOUT defaults to 300 s).
DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# Waiting in the bridge's queue: nothing with an idle backend, minutes under load.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# How late a callback runs after its time: ~0 on an idle loop; tens of ms is a stall clients feel.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LAG_PROBE_INTERVAL = 0.05  # seconds between probes: 20 cheap callbacks a second
OUTCOMES = ("done", "failed", "cancelled")


class BridgeMetrics:
    """The bridge's series; `on_job_event` is registered as a `JobService` observer."""

    def __init__(self, service, hub, state, registry: CollectorRegistry | None = None, webhooks=None):
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_submitted = Counter(
            "bridge_jobs_submitted", "Jobs accepted into the bridge's queue.", ["workflow"], registry=r)
        self.jobs = Counter(
            "bridge_jobs", "Jobs that ended, once each: done (results stored), failed (execution "
            "error, timeout, backend lost too often), cancelled (interrupt or websocket closed).",
            ["workflow", "outcome"], registry=r)
        self.jobs_requeued = Counter(
            "bridge_jobs_requeued", "Running jobs put back in the queue because their backend was lost.",
            ["workflow"], registry=r)
        self.jobs_expired = Counter(
            "bridge_jobs_expired", "Ended jobs removed after RESULT_TTL because nobody collected "
            "their results (state=done) or error (state=error).", ["workflow", "state"], registry=r)
        self.dispatches = Counter(
            "bridge_jobs_dispatched", "Prompts sent to a backend, by whether the job's models were "
            "expected loaded there (warm=true) or had to be loaded first (warm=false).",
            ["workflow", "warm"], registry=r)
        self.queue_wait = Histogram(
            "bridge_queue_wait_seconds", "Time from a job's submit to its first dispatch to a backend.",
            buckets=WAIT_BUCKETS, registry=r)
        self.job_duration = Histogram(
            "bridge_job_duration_seconds", "Time a job held a backend slot, from dispatch to its "
            "results stored (done) or to its end (failed, cancelled).",
            ["workflow", "backend", "outcome"], buckets=DURATION_BUCKETS, registry=r)
        self.upload_bytes = Counter(
            "bridge_upload_bytes", "Bytes of uploaded files accepted and stored.", registry=r)
        self.upload_files = Counter(
            "bridge_upload_files", "Uploaded files accepted and stored.", registry=r)
        self.free_calls = Counter(
            "bridge_free_calls", "POST /free requests answered; scope=all (every backend) or client "
            "(the backend of one clientId).", ["scope"], registry=r)
        self.http_requests = Counter(
            "bridge_http_requests", "HTTP requests answered, by handler, method and status code.",
            ["handler", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "bridge_http_request_duration_seconds", "Time to answer an HTTP request (websockets: "
            "the upgrade only).", ["handler"], registry=r)
        self.loop_lag = Histogram(
            "bridge_event_loop_lag_seconds", f"How late a callback scheduled every {LAG_PROBE_INTERVAL:g} s "
            "ran: the time everything else on the event loop made it wait.", buckets=LAG_BUCKETS, registry=r)
        self.lag_probe = LoopLagProbe(self.loop_lag.observe)
        r.register(_StateCollector(service, hub, state))
        if webhooks is not None:
            r.register(_WebhookCollector(webhooks))
        service.observers.append(self.on_job_event)

    def start(self) -> None:
        self.lag_probe.start()

    def close(self) -> None:
        self.lag_probe.stop()
        try:
            self.service.observers.remove(self.on_job_event)
        except ValueError:
            pass

    # ------------------------------------------------------------------ job transitions
    def on_job_event(self, event: str, job, backend, detail: dict) -> None:
        """Never raises: a metrics bug must not break a job's transition."""
        try:
            self._count(event, job, backend, detail)
        except Exception:  # noqa: BLE001 - see docstring
            log.exception("metrics: could not count job event %s of %s", event, getattr(job, "id", "?"))

    def _count(self, event: str, job, backend, detail: dict) -> None:
        workflow = job.alias
        if event == "queued":
            self.jobs_submitted.labels(workflow).inc()
        elif event == "dispatched":
            self.dispatches.labels(workflow, "true" if detail.get("warm", True) else "false").inc()
            if job.attempts == 1:  # later dispatches (requeue, OOM retry) would count the run too
                self.queue_wait.observe(max(0.0, float(detail.get("waited", 0.0))))
        elif event == "requeued":
            self.jobs_requeued.labels(workflow).inc()
        elif event == "done":
            self.jobs.labels(workflow, "done").inc()
            self._observe_duration(job, backend, "done", detail.get("duration"))
        elif event == "cancelled":
            self.jobs.labels(workflow, "cancelled").inc()
            if detail.get("was") == "running":
                self._observe_duration(job, job.backend or job.last_backend, "cancelled")
        elif event == "failed":
            if detail.get("cancelled"):
                return  # the end of a cancel, counted at its "cancelled"
            self.jobs.labels(workflow, "failed").inc()
            self._observe_duration(job, backend or job.last_backend, "failed")
        elif event == "expired":
            self.jobs_expired.labels(workflow, str(detail.get("was", "unknown"))).inc()

    def _observe_duration(self, job, backend, outcome: str, seconds: float | None = None) -> None:
        if backend is None:
            return  # never reached a backend (e.g. refused before dispatch)
        if seconds is None:
            if job.dispatched_at is None:
                return
            seconds = time.monotonic() - job.dispatched_at
        self.job_duration.labels(job.alias, backend.address, outcome).observe(max(0.0, seconds))

    # ------------------------------------------------------------------ handlers
    def count_upload(self, sizes: list[int]) -> None:
        self.upload_files.inc(len(sizes))
        self.upload_bytes.inc(sum(sizes))

    def count_free(self, client_id: str | None) -> None:
        self.free_calls.labels("all" if client_id is None else "client").inc()

    def count_request(self, handler_name: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(handler_name, method, str(status)).inc()
        if status != 101:
            self.http_duration.labels(handler_name).observe(seconds)


class LoopLagProbe:
    """Schedules itself every `interval` seconds and reports how late it ran (`observe(seconds)`)."""

    def __init__(self, observe, interval: float = LAG_PROBE_INTERVAL):
        self.observe = observe
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop=None) -> None:
        loop = loop or asyncio.get_running_loop()
        self._schedule(loop, loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop, now: float) -> None:
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._fire, loop)

    def _fire(self, loop) -> None:
        now = loop.time()
        self.observe(max(0.0, now - self._due))  # asyncio may run a timer up to its clock resolution early
        self._schedule(loop, now)


class _WebhookCollector(Collector):
    """Webhook deliveries, read at scrape time from the sender's own counts."""

    def __init__(self, webhooks):
        self.webhooks = webhooks

    def collect(self):
        outcomes = CounterMetricFamily(
            "bridge_webhook_deliveries", "Webhook delivery attempts by outcome: delivered (2xx), retried "
            "(failed, another attempt follows), gave_up (WEBHOOK_RETRY_FOR ran out), gone (410).",
            labels=["outcome"])
        for outcome, count in sorted(self.webhooks.counters.items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield GaugeMetricFamily("bridge_webhook_pending", "Webhook deliveries not yet ended.",
                                value=len(self.webhooks.pending))


class _StateCollector(Collector):
    """Series read at scrape time from the objects that hold the state."""

    def __init__(self, service, hub, state):
        self.service = service
        self.hub = hub
        self.state = state

    def collect(self):
        service = self.service
        queue = list(service.queue.every_job())
        yield GaugeMetricFamily("bridge_queue_length", "Jobs waiting in the bridge's queue.",
                                value=len(queue))
        now = time.time()
        oldest = min((job.created for job in queue), default=None)
        yield GaugeMetricFamily("bridge_queue_oldest_wait_seconds",
                                "How long the oldest queued job has waited (0 when the queue is empty).",
                                value=max(0.0, now - oldest) if oldest is not None else 0.0)

        states = GaugeMetricFamily("bridge_jobs_current", "Jobs the bridge holds now, by state "
                                   "(done/error: waiting for GET /history).", labels=["state"])
        counts = {name: 0 for name in ("queued", "running", "done", "error")}
        for job in list(service.jobs.values()):
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        for name, count in counts.items():
            states.add_metric([name], count)
        yield states

        queued = GaugeMetricFamily("bridge_tenant_queued_jobs", "Jobs of the tenant (API key name) waiting "
                                   "in the bridge's queue.", labels=["tenant"])
        running = GaugeMetricFamily("bridge_tenant_running_jobs", "Jobs of the tenant running on a backend.",
                                    labels=["tenant"])
        for tenant, counts in service.tenant_counts().items():
            queued.add_metric([tenant], counts["queued"])
            running.add_metric([tenant], counts["running"])
        yield from (queued, running)

        up = GaugeMetricFamily("bridge_backend_up", "1 when the backend answers and takes jobs, else 0.",
                               labels=["backend"])
        in_flight = GaugeMetricFamily("bridge_backend_in_flight", "Jobs holding a slot on the backend.",
                                      labels=["backend"])
        runs = CounterMetricFamily("bridge_backend_runs", "Runs a backend finished since the bridge "
                                   "started, by result (completed, failed).", labels=["backend", "result"])
        in_a_row = GaugeMetricFamily("bridge_backend_consecutive_failures", "Calls to the backend that "
                                     "failed since its last answer (down at 5, or at once on a lost connection).",
                                     labels=["backend"])
        failures = CounterMetricFamily("bridge_backend_call_failures", "Calls to the backend that failed "
                                       "(after retries for reads): no answer, timeout or 5xx.", labels=["backend"])
        backlog = GaugeMetricFamily("bridge_backend_backlog_seconds", "Expected seconds of work ahead of the "
                                    "backend's GPU: the rest of what runs and what waits in its queue.",
                                    labels=["backend"])
        models = GaugeMetricFamily("bridge_backend_models_loaded", "Model files the scheduler believes loaded "
                                   "on the backend (the last ones its jobs used).", labels=["backend"])
        now = time.monotonic()
        for backend in service.backends:
            up.add_metric([backend.address], 1 if backend.up else 0)
            in_flight.add_metric([backend.address], backend.load)
            runs.add_metric([backend.address, "completed"], backend.stats.completed)
            runs.add_metric([backend.address, "failed"], backend.stats.failed)
            in_a_row.add_metric([backend.address], backend.stats.consecutive_failures)
            failures.add_metric([backend.address], backend.stats.call_failures)
            backlog.add_metric([backend.address], backend.backlog(now))
            models.add_metric([backend.address], len(backend.gpu.models))
        yield from (up, in_flight, runs, in_a_row, failures, backlog, models)

        cost = service.scheduling
        yield CounterMetricFamily("bridge_scheduler_runs", "Times the dispatcher asked the scheduler which "
                                  "queued jobs can start (on every submit, slot freed, backend up).", value=cost.runs)
        yield CounterMetricFamily("bridge_scheduler_seconds", "Time spent in those runs, choosing and "
                                  "dispatching (divide by bridge_scheduler_placed for the cost of one decision).",
                                  value=cost.seconds)
        yield CounterMetricFamily("bridge_scheduler_plan_seconds", "The part of bridge_scheduler_seconds spent "
                                  "choosing (Scheduler.plan), without dispatching.", value=cost.plan_seconds)
        yield CounterMetricFamily("bridge_scheduler_placed", "Jobs those runs dispatched to a backend.",
                                  value=cost.placed)
        yield GaugeMetricFamily("bridge_websocket_clients", "Open client websockets (/ws).",
                                value=len(self.hub))
        yield CounterMetricFamily("bridge_generations", "Jobs backends finished successfully, ever "
                                  "(GET /generation-count; survives restarts).",
                                  value=self.state.generation_count)
        events = CounterMetricFamily("bridge_events", "Other events the core counts "
                                     "(e.g. history_broken: a /history download that broke midway).",
                                     labels=["event"])
        for name, count in sorted(service.counters.items()):
            events.add_metric([name], count)
        yield events
