"""Tenants end to end, with simulators: fair shares of the slots between API keys, the queued
limit (429), a clientId that belongs to its tenant, the counts per tenant in /status and
/metrics, and tenant and priority kept across a restart."""
from __future__ import annotations

import asyncio
import io
import logging

import pytest
import ujson
from tornado import httpclient, websocket

from logs import SecretFilter
from tests.conftest import TIMEOUT, new_client_id, png_bytes, wait_for

KEYS = {"a": "key-of-tenant-a", "b": "key-of-tenant-b"}
TENANTS = ",".join(f"{name}:{key}" for name, key in KEYS.items())


async def tenant_bridge(sim_factory, bridge_factory, **settings):
    """One simulator; by default one prompt at a time on it, so that every other job waits in the
    bridge's own queue, whose order is what these tests look at."""
    sim = await sim_factory(name="only", tick_seconds=0.01)
    running = await bridge_factory([sim], bridge_api_keys=TENANTS, **{"max_inflight_per_server": 1, **settings})
    return sim, running


def slow_job(saved, steps):
    # Step counts differ between jobs so that no run is served from the simulator's cache.
    return {"workflow": "slow-progress", "1/image": saved, "2/steps": steps}


def dispatch_order(service) -> list[str]:
    order: list[str] = []
    service.observers.append(lambda event, job, backend, detail:
                             order.append(job.client_id) if event == "dispatched" else None)
    return order


@pytest.mark.parametrize("inflight", [1, 2], ids=["one-prompt", "pipelined"])
async def test_a_tenant_with_few_jobs_is_not_stuck_behind_a_flood(sim_factory, bridge_factory, inflight):
    sim, running = await tenant_bridge(sim_factory, bridge_factory, max_inflight_per_server=inflight)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    order = dispatch_order(running.service)
    saved_a, saved_b = await a.upload(png_bytes(seed=1)), await b.upload(png_bytes(seed=2))
    flood = [new_client_id() for _ in range(8)]
    for i, client_id in enumerate(flood):   # the first runs (1 s; pipelined, the second waits behind it)
        await a.generate(client_id, slow_job(saved_a, 100 if i == 0 else 20 + i))
    await wait_for(lambda: running.service.running_of("a") == inflight, TIMEOUT, what="a's first jobs sent")
    few = [new_client_id() for _ in range(2)]
    answers = [await b.generate(client_id, slow_job(saved_b, 40 + i)) for i, client_id in enumerate(few)]
    # a's first jobs are on the backend; b's first is next in line, its second after one more of a's.
    assert [answer["detail"] for answer in answers] == ["queued / 1", "queued / 3"]
    for api, client_id in [(b, few[-1]), (a, flood[-1])]:
        await api.wait_status(client_id, "closed", timeout=30)
    sent = flood[:inflight]
    assert order == [*sent, few[0], flood[inflight], few[1], *flood[inflight + 1:]]
    a.close()
    b.close()


async def test_past_its_queued_limit_a_tenant_is_told_to_retry_and_others_are_not(sim_factory, bridge_factory):
    sim, running = await tenant_bridge(sim_factory, bridge_factory, tenant_max_queued=2)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    saved = await a.upload(png_bytes())
    first = new_client_id()
    await a.generate(first, slow_job(saved, 200))
    await a.wait_status(first, "progress")        # running: no longer waiting
    for i in range(2):
        await a.generate(new_client_id(), slow_job(saved, 20 + i))
    response = await a.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                             slow_job(saved, 30))
    assert response.code == 429
    assert response.headers["Retry-After"] == "5"
    detail = ujson.loads(response.body)["detail"]
    assert "tenant 'a'" in detail and "TENANT_MAX_QUEUED=2" in detail
    # Decided before the body is read: even a body that is not JSON gets it.
    response = await a.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST", b"{not json")
    assert response.code == 429
    await b.generate(new_client_id(), slow_job(await b.upload(png_bytes(seed=3)), 25))
    a.close()
    b.close()


async def test_a_running_limit_per_tenant_leaves_the_slots_to_others(sim_factory, bridge_factory):
    fast = [await sim_factory(name=f"sim{i}", tick_seconds=0.01) for i in range(3)]
    running = await bridge_factory(fast, bridge_api_keys=TENANTS, tenant_max_running=1)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    saved = await a.upload(png_bytes())
    flood = [new_client_id() for _ in range(3)]
    for i, client_id in enumerate(flood):
        await a.generate(client_id, slow_job(saved, 100 + i))
    await a.wait_status(flood[0], "progress")
    # Three backends, but a may run one job at a time: its others wait, and say where they are.
    assert running.service.running_of("a") == 1
    assert (await a.json(f"/execution-info?clientId={flood[1]}"))["detail"] == "queued / 1"
    other = new_client_id()
    await b.generate(other, slow_job(await b.upload(png_bytes(seed=4)), 10))
    await b.wait_status(other, "closed", timeout=30)
    assert running.service.running_of("a") == 1
    await a.json(f"/interrupt?clientId={flood[0]}", "POST")
    await a.wait_status(flood[1], "progress")
    a.close()
    b.close()


async def unknown_answers(api, client_id) -> dict:
    """What each endpoint answers `api` for `client_id`, with the clientId itself blanked."""
    answers = {}
    for name, path, method in [("info", "/execution-info", "GET"), ("history", "/history", "GET"),
                               ("interrupt", "/interrupt", "POST"), ("free", "/free", "POST")]:
        response = await api.fetch(f"{path}?clientId={client_id}", method)
        answers[name] = (response.code, response.body.replace(client_id.encode(), b"ID"),
                         response.headers.get("X-Bridge-Detail", "").replace(client_id, "ID"))
    return answers


async def test_a_clientid_belongs_to_its_tenant(sim_factory, bridge_factory):
    sim, running = await tenant_bridge(sim_factory, bridge_factory)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    saved = await a.upload(png_bytes())
    mine = new_client_id()
    socket_a = await a.ws(mine)
    await socket_a.next()                                      # connected
    await a.generate(mine, slow_job(saved, 300))   # 3 s: it runs through everything b tries
    await a.wait_status(mine, "progress")
    # To b, a's clientId is one never used: the same answers, word for word.
    assert await unknown_answers(b, mine) == await unknown_answers(b, new_client_id())
    # b cannot take it for a job of its own, and is told nothing of a's.
    response = await b.fetch(f"/generate-based-workflow?clientId={mine}", "POST", slow_job(saved, 3))
    assert response.code == 400
    assert ujson.loads(response.body)["detail"] == f"clientId '{mine}' is in use; use a new clientId " \
                                                   "(a uuid4 is recommended)"
    # b's socket on that clientId: connected, then nothing of a's job; it does not replace a's,
    # and closing it cancels nothing.
    socket_b = await b.ws(mine)
    assert (await socket_b.next())["status"] == "connected"
    progress = await socket_a.until("progress")
    assert progress["status"] == "progress"
    never = await asyncio.wait_for(socket_b.next(), TIMEOUT)
    assert never["status"] == "listening"                     # a heartbeat, not a's progress
    socket_b.close()
    await wait_for(lambda: len(running.service.hub) == 1, TIMEOUT, what="b's socket to be gone")
    assert running.service.get(mine).state.value == "running"
    assert (await socket_a.until("closed", timeout=30))["status"] == "closed"
    # Its results are a's alone; once fetched, the clientId is free for anyone.
    assert (await b.fetch(f"/history?clientId={mine}")).code == 204
    assert len(await a.history(mine)) == 1
    await b.generate(mine, slow_job(saved, 4))
    a.close()
    b.close()


async def test_a_socket_holds_its_clientid_for_its_tenant(sim_factory, bridge_factory):
    sim, running = await tenant_bridge(sim_factory, bridge_factory)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    client_id = new_client_id()
    socket = await a.ws(client_id)
    await socket.next()
    assert (await a.json(f"/execution-info?clientId={client_id}"))["status"] == "connected"
    assert (await b.fetch(f"/execution-info?clientId={client_id}")).code == 400
    response = await b.fetch(f"/generate-based-workflow?clientId={client_id}", "POST",
                             slow_job(await b.upload(png_bytes()), 3))
    assert response.code == 400 and "is in use" in ujson.loads(response.body)["detail"]
    a.close()
    b.close()


async def test_status_and_metrics_count_per_tenant(sim_factory, bridge_factory):
    sim, running = await tenant_bridge(sim_factory, bridge_factory)
    a, b = running.api(KEYS["a"]), running.api(KEYS["b"])
    saved = await a.upload(png_bytes())
    first = new_client_id()
    await a.generate(first, slow_job(saved, 200))
    await a.wait_status(first, "progress")
    for i in range(2):
        await a.generate(new_client_id(), slow_job(saved, 20 + i))
    status = await b.json("/status")
    assert status["tenants"] == {"a": {"queued": 2, "running": 1}, "b": {"queued": 0, "running": 0}}
    assert not any(key in ujson.dumps(status) for key in KEYS.values())
    text = (await b.fetch("/metrics")).body.decode()
    assert 'bridge_tenant_queued_jobs{tenant="a"} 2.0' in text
    assert 'bridge_tenant_running_jobs{tenant="a"} 1.0' in text
    assert 'bridge_tenant_queued_jobs{tenant="b"} 0.0' in text
    assert 'tenant="default"' not in text                     # no such tenant: no key is its
    a.close()
    b.close()


async def test_without_keys_everyone_is_the_tenant_default(bridge, api):
    status = await api.json("/status")
    assert status["tenants"] == {"default": {"queued": 0, "running": 0}}


@pytest.mark.parametrize("value", [None, True, 1.0, "1", 101, -101, [1], {}])
async def test_priority_must_be_an_integer_in_range(bridge, api, value):
    response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                               {"workflow": "invert", "priority": value})
    assert response.code == 400
    assert "'priority'" in ujson.loads(response.body)["detail"]


async def test_restart_keeps_tenant_and_priority(sim_factory, bridge_factory):
    sim, running = await tenant_bridge(sim_factory, bridge_factory)
    a = running.api(KEYS["a"])
    saved = await a.upload(png_bytes())
    busy, low, high = new_client_id(), new_client_id(), new_client_id()
    await a.generate(busy, slow_job(saved, 200))
    await a.wait_status(busy, "progress")
    await a.generate(low, slow_job(saved, 5))
    await a.generate(high, {**slow_job(saved, 6), "priority": 7})
    assert (await a.json(f"/execution-info?clientId={high}"))["detail"] == "queued / 1"
    a.close()
    await running.stop()
    again = await bridge_factory([sim], bridge_api_keys=TENANTS, data_dir=str(running.bridge.settings.data_dir))
    a, b = again.api(KEYS["a"]), again.api(KEYS["b"])
    jobs = {client_id: again.service.get(client_id) for client_id in (busy, low, high)}
    assert {job.tenant for job in jobs.values()} == {"a"}
    assert (jobs[low].priority, jobs[high].priority) == (0, 7)
    assert (await b.fetch(f"/execution-info?clientId={high}")).code == 400
    for client_id in (busy, low, high):
        await a.wait_status(client_id, "closed", timeout=30)
    assert jobs[high].dispatched_at < jobs[low].dispatched_at
    a.close()
    b.close()


async def test_a_wrong_key_is_refused_and_the_single_key_is_the_tenant_default(sim_factory, bridge_factory):
    sim = await sim_factory(name="only")
    running = await bridge_factory([sim], bridge_api_keys=TENANTS, bridge_api_key="the-old-key")
    old = running.api("the-old-key")
    client_id = new_client_id()
    await old.generate(client_id, {"workflow": "blank-image", "1/width": 8, "1/height": 8})
    assert running.service.get(client_id).tenant == "default"
    wrong = running.api("not-a-key")
    assert (await wrong.fetch("/status")).code == 401
    with pytest.raises(httpclient.HTTPClientError) as info:
        await websocket.websocket_connect(httpclient.HTTPRequest(
            f"{old.ws_base}/ws?clientId={client_id}&token=not-a-key", request_timeout=TIMEOUT))
    assert info.value.code == 401
    await wait_for(lambda: running.service.get(client_id).ended, TIMEOUT, what="the job to end")
    old.close()
    wrong.close()


async def test_the_job_log_says_whose_job_it_is(sim_factory, bridge_factory, caplog):
    caplog.set_level(logging.INFO)
    sim, running = await tenant_bridge(sim_factory, bridge_factory)
    a = running.api(KEYS["a"])
    client_id = new_client_id()
    await a.generate(client_id, {"workflow": "blank-image", "1/width": 8, "priority": 3})
    await a.wait_status(client_id, "closed")
    queued = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job queued")]
    assert len(queued) == 1 and "tenant=a" in queued[0] and "priority=3" in queued[0]
    assert not any(key in r.getMessage() for r in caplog.records for key in KEYS.values())
    a.close()


def test_every_key_is_scrubbed_from_the_log_handler():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter(["short", "short-and-longer", *KEYS.values()]))
    logger = logging.getLogger("tests.tenant-keys")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("keys: %s %s %s", KEYS["a"], KEYS["b"], "short-and-longer")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().strip() == "keys: *** *** ***"
