"""One bad answer is not a dead backend: a poison prompt fails alone, flaky or stalled reads
re-run nothing, and only a lost connection or failures in a row make a backend down."""
from __future__ import annotations

import asyncio

import pytest

from balancer.comfy import api as comfy_api
from balancer.comfy.backend import FAILURES_BEFORE_DOWN, Backend
from balancer.comfy.http import BackendRejected, BackendUnavailable
from tests.conftest import new_client_id, png_bytes, stopped_by_id, wait_for


def record_downs(bridge) -> list[str]:
    """Every reason any backend of the bridge is marked down for, from now on."""
    downs: list[str] = []
    for backend in bridge.service.backends:
        original = backend.mark_down

        def mark_down(reason, original=original, backend=backend):
            if backend.up:  # a real transition, not a repeat while it is down
                downs.append(f"{backend.address}: {reason}")
            original(reason)
        backend.mark_down = mark_down
    return downs


async def run_inverts(api, count: int) -> list[str]:
    clients = [new_client_id() for _ in range(count)]
    for i, client_id in enumerate(clients):
        saved = await api.upload(png_bytes(seed=i))
        await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    return clients


async def finish(api, clients, timeout=30) -> None:
    for client_id in clients:
        info = await api.wait_status(client_id, "closed", "error", timeout=timeout)
        assert info["status"] == "closed", (client_id, info)
        assert len(await api.history(client_id)) == 1


def executed_once_each(sims, expected: int) -> None:
    runs = [pid for sim in sims for pid in sim.executions]
    assert len(runs) == expected and len(set(runs)) == expected, runs


async def test_a_poison_prompt_fails_alone_and_moves_nothing(sim_factory, bridge_factory):
    a, b = await sim_factory(name="sim-a"), await sim_factory(name="sim-b")
    bridge = await bridge_factory([a, b])
    api = bridge.api()
    downs = record_downs(bridge)
    poison_file = await api.upload(png_bytes(seed=99))
    for sim in (a, b):
        sim.fail_prompts_containing = poison_file  # its name on the backend is in the prompt
    normal = await run_inverts(api, 4)
    poison = new_client_id()
    await api.generate(poison, {"workflow": "invert", "1/image": poison_file})
    normal += await run_inverts(api, 4)
    info = await api.wait_status(poison, "closed", "error", timeout=30)
    assert info["status"] == "error"
    detail = info["detail"]
    assert detail.startswith("rejected by backends ") and a.address in detail and b.address in detail
    assert detail.count("HTTP 500") == 2, detail
    await finish(api, normal)
    executed_once_each([a, b], 8)
    assert not a.executions_containing(poison_file) and not b.executions_containing(poison_file)
    assert downs == [] and all(backend.up for backend in bridge.service.backends)
    # The error is reported once, like any failed job.
    answer = await api.fetch(f"/history?clientId={poison}")
    assert answer.code == 400 and b"rejected by backends" in answer.body
    api.close()


async def test_with_one_backend_a_refused_prompt_fails_at_once(sim, bridge):
    api = bridge.api()
    poison_file = await api.upload(png_bytes(seed=7))
    sim.fail_prompts_containing = poison_file
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": poison_file})
    info = await api.wait_status(client_id, "closed", "error", timeout=15)
    assert info["status"] == "error"
    assert info["detail"].startswith(f"rejected by backend {sim.address}: HTTP 500")
    assert bridge.service.backends[0].up
    await finish(api, await run_inverts(api, 1))
    api.close()


async def test_flaky_history_and_view_run_every_job_exactly_once(sim_factory, bridge_factory):
    a, b = await sim_factory(name="sim-a"), await sim_factory(name="sim-b")
    bridge = await bridge_factory([a, b])
    api = bridge.api()
    downs = record_downs(bridge)
    for sim in (a, b):
        sim.fail_every = {"history": 3, "view": 2}
    clients = await run_inverts(api, 20)
    await finish(api, clients, timeout=40)
    executed_once_each([a, b], 20)
    assert any(kind == "fail_every" for sim in (a, b) for kind, _, _ in sim.fault_log)  # faults did happen
    assert downs == []
    api.close()


async def test_a_stalled_read_past_its_timeout_is_retried_not_fatal(sim, bridge_factory):
    bridge = await bridge_factory([sim], backend_timeout=1)
    api = bridge.api()
    downs = record_downs(bridge)
    sim.drop_events = {"executed"}   # the files are then read from the history
    sim.stall_next("GET history", seconds=3, count=1)
    clients = await run_inverts(api, 1)
    await finish(api, clients)
    executed_once_each([sim], 1)
    assert downs == []
    assert any(kind == "stall" for kind, _, _ in sim.fault_log)
    assert bridge.service.backends[0].stats.consecutive_failures == 0   # answered since
    status = await api.json("/status")
    assert status["backends"][0]["consecutive_failures"] == 0
    api.close()


async def test_failures_in_a_row_show_in_status_and_metrics_and_then_make_it_down(sim, bridge_factory):
    bridge = await bridge_factory([sim])
    api = bridge.api()
    backend = bridge.service.backends[0]
    sim.fail_every = {"GET queue": 1}
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await comfy_api.prompts_on_backend(backend)
    status = await api.json("/status")
    assert status["backends"][0]["consecutive_failures"] == 2
    assert "GET /queue: HTTP 500" in status["backends"][0]["last_failure"]
    assert status["backends"][0]["up"] is True
    metrics = (await api.fetch("/metrics")).body.decode()
    assert f'bridge_backend_consecutive_failures{{backend="{sim.address}"}} 2.0' in metrics
    for _ in range(FAILURES_BEFORE_DOWN - 2):
        with pytest.raises(BackendUnavailable):
            await comfy_api.prompts_on_backend(backend)
    assert not backend.up
    assert "calls failed in a row" in backend.stats.last_error
    sim.fail_every = {}
    await wait_for(lambda: backend.up, timeout=10, what="the backend back after answers again")
    api.close()


async def test_a_refused_connection_makes_a_backend_down_at_once(sim, bridge):
    backend = bridge.service.backends[0]
    await sim.crash()
    with pytest.raises(BackendUnavailable):
        await comfy_api.history_entry(backend, "anything")
    assert not backend.up
    await sim.restart()
    await wait_for(lambda: backend.up, timeout=15, what="backend back after restart")


async def test_an_answer_between_failures_starts_the_count_again():
    downs = []
    backend = Backend("127.0.0.1:9", request_timeout=1, on_up=lambda b: None,
                      on_down=lambda b: downs.append(b))
    backend.up = True
    for _ in range(FAILURES_BEFORE_DOWN - 1):
        backend._call_failed("GET /history/x: HTTP 500", fatal=False)
    backend._answered()
    for _ in range(FAILURES_BEFORE_DOWN - 1):
        backend._call_failed("GET /view: HTTP 503", fatal=False)
    assert backend.up and downs == []
    backend._call_failed("GET /view: HTTP 503", fatal=False)
    assert not backend.up and downs == [backend]
    backend.http.close()


async def test_a_server_that_refuses_client_prompt_ids_is_let_to_choose():
    """If a server still refuses the bridge's (canonical) prompt id, it mints its own, and the
    bridge asks that way from then on."""
    sent = []

    class FakeHttp:
        async def call(self, method, path, body=None, **kw):
            sent.append(body)
            if "prompt_id" in body:
                raise BackendRejected(400, {"error": {"type": "invalid_prompt_id", "message": "no"},
                                            "node_errors": {}})
            return {"prompt_id": "server-made", "number": 1, "node_errors": {}}

    class FakeBackend:
        address, ws_client_id, accepts_prompt_ids, http = "x:1", "bridge-1", True, FakeHttp()

    backend = FakeBackend()
    answer = await comfy_api.submit_prompt(backend, {"1": {}}, "6f1c3c2e-9d6a-4bd8-8a3e-0f3f7d3b5a11")
    assert answer["prompt_id"] == "server-made" and not backend.accepts_prompt_ids
    await comfy_api.submit_prompt(backend, {"1": {}}, "0b7e7d1e-1111-4a4a-9b9b-222222222222")
    assert ["prompt_id" in body for body in sent] == [True, False, False]


async def interrupt_a_running_job(api, bridge) -> str:
    """Start a slow job, wait until it runs, POST /interrupt it; returns its prompt id."""
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 200})
    await wait_for(lambda: bridge.service.get(client_id).percent > 0, what="job running")
    prompt_id = bridge.service.get(client_id).prompt_id
    await api.json(f"/interrupt?clientId={client_id}", "POST")
    return prompt_id


async def test_cancel_route_is_tried_once_per_backend_that_lacks_it(sim_factory, bridge_factory):
    old = await sim_factory(name="old", profile="0.3.64")
    bridge = await bridge_factory([old])
    api = bridge.api()
    old.tick_seconds = 0.05
    for _ in range(2):
        prompt_id = await interrupt_a_running_job(api, bridge)
        await wait_for(lambda: prompt_id in old.interrupt_calls, what="targeted interrupt")
    tries = [p for m, p, _ in old.requests_log if m == "POST" and p.endswith("/cancel")]
    assert len(tries) == 1 and None not in old.interrupt_calls
    api.close()


async def test_current_servers_are_cancelled_through_their_atomic_route(sim, bridge):
    assert sim.profile == "current"
    api = bridge.api()
    sim.tick_seconds = 0.05
    prompt_id = await interrupt_a_running_job(api, bridge)
    await wait_for(lambda: (prompt_id, "interrupted") in sim.cancel_calls, what="atomic cancel")
    assert sim.interrupt_calls == []   # no read-then-interrupt window
    assert not any(m == "GET" and p.endswith("/queue") for m, p, _ in sim.requests_log)
    api.close()


async def test_a_download_times_out_on_silence_not_on_its_length():
    """GET /view (downloads have a total limit of hours) goes on past the silence limit while
    bytes keep coming, and a long pause ends it (libcurl's low-speed limit: the speed it measures is a mean over its last
    few seconds, so the silence that ends a transfer is the limit plus up to ~5 s)."""
    import time

    from tornado import httpserver, web
    from tornado.testing import bind_unused_port

    from balancer.comfy.http import Transport

    class Trickle(web.RequestHandler):
        def initialize(self):
            self.gone = asyncio.Event()

        def on_connection_close(self):
            self.gone.set()

        async def get(self):
            for _ in range(4):
                self.write(b"x" * 1000)
                await self.flush()
                try:
                    await asyncio.wait_for(self.gone.wait(), float(self.get_argument("pause")))
                    return
                except asyncio.TimeoutError:
                    pass

    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(web.Application([(r"/view", Trickle)]))
    server.add_sockets([sock])
    transport = Transport(f"http://127.0.0.1:{port}", 1.0, on_answer=lambda: None, on_failure=lambda r, f: None)
    received = []

    def download(pause: float, total: float):
        request = transport.request("GET", f"/view?pause={pause}", streaming_callback=received.append,
                                    timeout=total)
        return transport.fetch(transport.silence_limited(request, silence=1.0), "GET /view")
    try:
        await download(0.5, total=60.0)   # 2 s in all, twice the silence limit, never silent for long
        assert sum(map(len, received)) == 4000
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await download(30.0, total=60.0)   # one chunk, then silence
        assert time.monotonic() - started < 15
    finally:
        transport.close()
        server.stop()
        await server.close_all_connections()


def test_probe_phases_of_many_backends_spread_over_the_interval():
    from collections import Counter

    from balancer.comfy.backend import probe_phase
    for addresses in ([f"127.0.0.1:{port}" for port in range(40000, 40300)], [f"gpu{i}:8188" for i in range(300)]):
        phases = [probe_phase(a) for a in addresses]
        assert all(0 < p <= 1 for p in phases)
        tenths = Counter(min(int(p * 10), 9) for p in phases)
        assert len(tenths) == 10 and max(tenths.values()) <= 60  # fair share 30: no burst


async def test_the_first_health_probe_waits_for_the_backends_phase(monkeypatch):
    from balancer.comfy import backend as backend_module
    backend = Backend("10.0.0.7:8188", request_timeout=1, health_interval=4.0, on_up=lambda b: None,
                      on_down=lambda b: None)
    backend.up = True
    waits, probes = [], []

    async def no_wait(seconds):
        waits.append(seconds)

    async def probe(method, path, **kw):
        probes.append(path)
        if len(probes) == 2:
            backend.up = False  # ends the watch
        return {}
    monkeypatch.setattr(backend_module.asyncio, "sleep", no_wait)
    monkeypatch.setattr(backend.http, "call", probe)
    await backend._watch_health()
    assert waits == [4.0 * backend_module.probe_phase("10.0.0.7:8188"), 4.0]
    assert probes == ["/system_stats", "/system_stats"]
    backend.http.close()


async def test_no_health_probe_while_the_backends_calls_are_answered(monkeypatch):
    from balancer.comfy import backend as backend_module
    backend = Backend("10.0.0.8:8188", request_timeout=1, health_interval=4.0, on_up=lambda b: None,
                      on_down=lambda b: None)
    backend.up = True
    rounds, probes = 0, []

    async def no_wait(seconds):
        nonlocal rounds
        rounds += 1
        if rounds <= 3:
            backend._answered()               # a job's call was just answered
        elif rounds == 4:
            backend._last_answer -= 4.0       # its last answer is now an interval old
        else:
            backend.up = False                # ends the watch

    async def probe(method, path, **kw):
        probes.append(path)
        return {}
    monkeypatch.setattr(backend_module.asyncio, "sleep", no_wait)
    monkeypatch.setattr(backend.http, "call", probe)
    await backend._watch_health()
    assert probes == ["/system_stats"]  # only once no answer came for an interval
    backend.http.close()


def _disk_full(monkeypatch):
    """A result the bridge's disk cannot store."""
    import errno

    from balancer.comfy import files
    real_store = files._DownloadSink.store

    def store(sink):
        if getattr(store, "on", True):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_store(sink)
    monkeypatch.setattr(files._DownloadSink, "store", store)
    return store


def _bug_in_a_run(monkeypatch):
    """Any other fault of the bridge's own, inside a run."""
    from balancer import run as run_module
    real_collect = run_module.PromptRun._collect

    async def collect(self):
        if getattr(collect, "on", True):
            raise RuntimeError("a bug")
        return await real_collect(self)
    monkeypatch.setattr(run_module.PromptRun, "_collect", collect)
    return collect


@pytest.mark.parametrize("fault, detail", [
    (_disk_full, "could not store the results: No space left on device"),
    (_bug_in_a_run, "the bridge failed while running the job (RuntimeError)"),
])
async def test_a_fault_on_the_bridges_side_fails_that_job_and_frees_the_slot(
        sim_factory, bridge_factory, monkeypatch, fault, detail):
    """The job ends in error naming the cause (not `running` for good), and the backend goes on
    with the next job."""
    sim = await sim_factory()
    bridge = await bridge_factory([sim], MAX_INFLIGHT_PER_SERVER=1)
    api = bridge.api()
    patched = fault(monkeypatch)
    [failed] = await run_inverts(api, 1)
    info = await api.wait_status(failed, "error", "closed")
    assert info["status"] == "error" and detail in info["detail"], info
    patched.on = False
    await finish(api, await run_inverts(api, 1))
    assert not bridge.service.backends[0].in_flight
