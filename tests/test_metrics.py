"""GET /metrics: every series of the bridge, with the values a run of jobs leaves behind."""
from __future__ import annotations

import time

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer.metrics import LoopLagProbe
from tests.conftest import new_client_id, png_bytes, wait_for

STATE_SERIES = ("bridge_queue_length", "bridge_queue_oldest_wait_seconds", "bridge_jobs_current",
                "bridge_backend_up", "bridge_backend_in_flight", "bridge_backend_runs_total",
                "bridge_websocket_clients", "bridge_generations_total")


class Scrape:
    """One /metrics answer, parsed: `value(name, **labels)` (0 when the sample is absent)."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple, float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(key[0] == name for key in self.samples)

    def total(self, name: str, **labels) -> float:
        """Sum over the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


async def scrape(api, headers=None) -> Scrape:
    response = await api.fetch("/metrics", headers=headers)
    assert response.code == 200, (response.code, response.body)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.body.decode())


def sim_of(bridge, client_id: str):
    address = bridge.service.get(client_id).backend.address
    return next(sim for sim in bridge.sims if sim.address == address)


async def start_slow(api, client_id: str, saved: str, steps: int = 400) -> None:
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": steps})
    await api.wait_status(client_id, "progress")


async def test_metrics_carry_every_series_during_a_run(sim_factory, bridge_factory):
    a = await sim_factory(name="a", tick_seconds=0.02)
    b = await sim_factory(name="b", tick_seconds=0.02)
    bridge = await bridge_factory([a, b], health_check_interval=0.3, max_inflight_per_server=1)
    api = bridge.api()
    try:
        first = await scrape(api)
        for name in STATE_SERIES:
            assert first.has(name), name
        assert first.types["bridge_queue_wait_seconds"] == "histogram"
        assert first.types["bridge_job_duration_seconds"] == "histogram"
        assert first.value("bridge_queue_length") == 0
        assert first.value("bridge_backend_up", backend=a.address) == 1
        assert first.value("bridge_backend_up", backend=b.address) == 1
        assert first.value("bridge_generations_total") == 0
        assert first.value("bridge_upload_bytes_total") == 0

        image = png_bytes()
        saved = await api.upload(image)

        # Both backends busy with a long job each; a third job waits in the bridge's queue.
        watched, killed, waiting = new_client_id(), new_client_id(), new_client_id()
        ws = await api.ws(watched)
        await start_slow(api, watched, saved)
        await start_slow(api, killed, saved)
        await api.generate(waiting, {"workflow": "invert", "1/image": saved})
        busy = await scrape(api)
        assert busy.value("bridge_queue_length") == 1
        assert busy.value("bridge_queue_oldest_wait_seconds") >= 0
        assert busy.value("bridge_jobs_current", state="queued") == 1
        assert busy.value("bridge_jobs_current", state="running") == 2
        assert busy.value("bridge_backend_in_flight", backend=a.address) == 1
        assert busy.value("bridge_backend_in_flight", backend=b.address) == 1
        assert busy.value("bridge_websocket_clients") == 1
        assert busy.value("bridge_jobs_submitted_total", workflow="slow-progress") == 2
        assert busy.value("bridge_jobs_submitted_total", workflow="invert") == 1
        assert busy.value("bridge_queue_wait_seconds_count") == 2

        # cancelled while queued; failed by an interrupt on its ComfyUI; cancelled while running.
        await api.json(f"/interrupt?clientId={waiting}", "POST")
        killed_backend = bridge.service.get(killed).backend.address
        watched_backend = bridge.service.get(watched).backend.address
        sim_of(bridge, killed).interrupt()
        await api.wait_status(killed, "error")
        await api.json(f"/interrupt?clientId={watched}", "POST")
        await ws.closed()

        # One job done; its results fetched; /free for all backends and for one client.
        done = new_client_id()
        await api.generate(done, {"workflow": "invert", "1/image": saved})
        await api.wait_status(done, "closed")
        done_backend = bridge.service.get(done).last_backend.address
        await api.json("/free", "POST")
        await api.json(f"/free?clientId={done}", "POST")
        assert len(await api.history(done)) == 1

        after = await scrape(api)
        assert after.value("bridge_jobs_total", workflow="invert", outcome="done") == 1
        assert after.value("bridge_jobs_total", workflow="invert", outcome="cancelled") == 1
        assert after.value("bridge_jobs_total", workflow="slow-progress", outcome="cancelled") == 1
        assert after.value("bridge_jobs_total", workflow="slow-progress", outcome="failed") == 1
        assert after.total("bridge_jobs_total") == 4  # each job counted once
        assert after.value("bridge_job_duration_seconds_count", workflow="invert",
                           backend=done_backend, outcome="done") == 1
        assert after.value("bridge_job_duration_seconds_sum", workflow="invert",
                           backend=done_backend, outcome="done") > 0
        assert after.value("bridge_job_duration_seconds_count", workflow="slow-progress",
                           backend=killed_backend, outcome="failed") == 1
        assert after.value("bridge_job_duration_seconds_count", workflow="slow-progress",
                           backend=watched_backend, outcome="cancelled") == 1
        assert after.total("bridge_job_duration_seconds_count") == 3  # the queued cancel never ran
        assert after.value("bridge_queue_wait_seconds_count") == 3
        assert after.value("bridge_queue_wait_seconds_bucket", le="+Inf") == 3
        assert after.value("bridge_queue_length") == 0
        assert after.value("bridge_backend_in_flight", backend=a.address) == 0
        assert after.value("bridge_websocket_clients") == 0
        assert after.value("bridge_upload_bytes_total") == len(image)
        assert after.value("bridge_upload_files_total") == 1
        assert after.value("bridge_free_calls_total", scope="all") == 1
        assert after.value("bridge_free_calls_total", scope="client") == 1
        assert after.value("bridge_generations_total") == 1
        assert after.value("bridge_backend_runs_total", backend=done_backend, result="completed") == 1
        assert after.value("bridge_backend_runs_total", backend=killed_backend, result="failed") >= 1
        assert after.value("bridge_http_requests_total", handler="UploadHandler", method="POST", code="200") == 1
        assert after.value("bridge_http_requests_total", handler="StatusSocket", method="GET", code="101") == 1
        assert after.value("bridge_http_requests_total", handler="HistoryHandler", method="GET", code="200") == 1

        # A backend that stops answering is shown down.
        await b.crash()
        on_b = next(x for x in bridge.service.backends if x.address == b.address)
        await wait_for(lambda: not on_b.up, what="backend b marked down")
        down = await scrape(api)
        assert down.value("bridge_backend_up", backend=b.address) == 0
        assert down.value("bridge_backend_up", backend=a.address) == 1
    finally:
        api.close()


async def test_requeue_and_expiry_are_counted(sim_factory, bridge_factory):
    a = await sim_factory(name="a", tick_seconds=0.03)
    b = await sim_factory(name="b", tick_seconds=0.01)
    bridge = await bridge_factory([a, b], max_retries=2)
    api = bridge.api()
    try:
        saved = await api.upload(png_bytes())
        moved = new_client_id()
        await api.generate(moved, {"workflow": "slow-progress", "1/image": saved, "2/steps": 30})
        await api.wait_status(moved, "progress")
        first_backend = bridge.service.get(moved).backend.address
        await sim_of(bridge, moved).crash()
        await api.wait_status(moved, "closed", timeout=30)
        second_backend = bridge.service.get(moved).last_backend.address
        assert second_backend != first_backend
        left = new_client_id()  # done, never fetched: expires
        await api.generate(left, {"workflow": "invert", "1/image": saved})
        await api.wait_status(left, "closed")
        assert sorted(bridge.service.sweep_expired(time.time() + 10 * 3600)) == sorted([moved, left])

        result = await scrape(api)
        assert result.value("bridge_jobs_requeued_total", workflow="slow-progress") == 1
        assert result.value("bridge_jobs_total", workflow="slow-progress", outcome="done") == 1
        assert result.value("bridge_jobs_expired_total", workflow="slow-progress", state="done") == 1
        assert result.value("bridge_jobs_expired_total", workflow="invert", state="done") == 1
        # The wait is measured to the first dispatch only; the run is counted where it finished.
        assert result.value("bridge_queue_wait_seconds_count") == 2
        assert result.value("bridge_job_duration_seconds_count", workflow="slow-progress",
                            backend=second_backend, outcome="done") == 1
        assert result.value("bridge_jobs_current", state="done") == 0
    finally:
        api.close()


async def test_each_bridge_has_its_own_registry(sim_factory, bridge_factory):
    sim = await sim_factory(name="one")
    first = await bridge_factory([sim])
    second = await bridge_factory([sim])
    api1, api2 = first.api(), second.api()
    try:
        await api1.upload(png_bytes())
        one, two = await scrape(api1), await scrape(api2)
        assert one.value("bridge_upload_files_total") == 1
        assert two.value("bridge_upload_files_total") == 0
        assert first.bridge.metrics.registry is not second.bridge.metrics.registry
        global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
        assert not [n for n in global_names if n.startswith("bridge_")]
    finally:
        api1.close()
        api2.close()


async def test_metrics_need_the_api_key_and_speak_openmetrics(sim, bridge_factory):
    bridge = await bridge_factory([sim], bridge_api_key="s3cret-key")
    anonymous, keyed = bridge.api(), bridge.api("s3cret-key")
    try:
        refused = await anonymous.fetch("/metrics")
        assert refused.code == 401
        plain = await scrape(keyed)
        assert plain.value("bridge_backend_up", backend=sim.address) == 1
        response = await keyed.fetch("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.body.rstrip().endswith(b"# EOF")
    finally:
        anonymous.close()
        keyed.close()


async def test_a_failing_observer_never_breaks_a_job(api, bridge, caplog):
    bridge.bridge.metrics.jobs_submitted = None  # any use of it now raises inside the observer
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await api.wait_status(client_id, "closed")
    assert any("could not count job event queued" in r.getMessage() for r in caplog.records)


class _FakeLoop:
    """time() and call_at() of an event loop, with a clock the test moves."""

    def __init__(self, now: float):
        self.now = now
        self.timers: list = []

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback, *args):
        self.timers.append((when, callback, args))
        return self

    def cancel(self) -> None:
        self.timers.clear()


def test_loop_lag_probe_reports_how_late_it_ran():
    seen: list[float] = []
    loop = _FakeLoop(100.0)
    probe = LoopLagProbe(seen.append, interval=0.05)
    probe.start(loop)
    when, fire, args = loop.timers[-1]
    assert when == 100.05
    loop.now = 100.35  # something held the loop for 0.3 s past the probe's time
    fire(*args)
    assert seen == [pytest.approx(0.3)]
    when, fire, args = loop.timers[-1]
    assert when == pytest.approx(100.40)  # the next probe counts from when this one ran
    loop.now = 100.399  # asyncio may run a timer slightly early: no negative lag
    fire(*args)
    assert seen[-1] == 0.0
    probe.stop()
    assert loop.timers == []


async def test_metrics_show_loop_lag_and_scheduling_cost(sim, bridge_factory):
    bridge = await bridge_factory([sim])
    api = bridge.api()
    async def probed():
        return (await scrape(api)).value("bridge_event_loop_lag_seconds_count") >= 1
    await wait_for(probed, what="the lag probe's first run")
    time.sleep(0.2)  # holds the event loop on purpose: the probe must see it

    async def lag_seen():
        return (await scrape(api)).value("bridge_event_loop_lag_seconds_sum") >= 0.15
    await wait_for(lag_seen, what="the stall in bridge_event_loop_lag_seconds")
    before = await scrape(api)
    assert before.types["bridge_event_loop_lag_seconds"] == "histogram"
    assert before.value("bridge_event_loop_lag_seconds_bucket", le="0.1") < \
        before.value("bridge_event_loop_lag_seconds_count")

    client = new_client_id()
    await api.generate(client, {"workflow": "blank-image", "1/width": 8, "1/height": 8})
    await api.wait_status(client, "closed")
    after = await scrape(api)
    assert after.value("bridge_scheduler_placed_total") == before.value("bridge_scheduler_placed_total") + 1
    assert after.value("bridge_scheduler_runs_total") > before.value("bridge_scheduler_runs_total")
    assert after.value("bridge_scheduler_seconds_total") > before.value("bridge_scheduler_seconds_total")
    assert 0 < after.value("bridge_scheduler_plan_seconds_total") <= after.value("bridge_scheduler_seconds_total")
