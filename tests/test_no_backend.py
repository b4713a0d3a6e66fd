"""A bridge whose backends cannot be reached says so: warnings, /healthz 503, the reason a
queued job waits, QUEUE_TIMEOUT; and a refused generate reaches the client's socket."""
from __future__ import annotations

import logging

import ujson

from tests.conftest import new_client_id, png_bytes, wait_for
from tornado.testing import bind_unused_port


def closed_port() -> str:
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there: connection refused
    return f"127.0.0.1:{port}"


class Dead:
    def __init__(self, address):
        self.address = address


async def test_no_backend_up_warns_fails_health_and_explains_the_wait(bridge_factory, caplog):
    address = closed_port()
    caplog.set_level(logging.WARNING, logger="bridge.backend")
    bridge = await bridge_factory([Dead(address)], wait_up=False, queue_timeout=0, health_check_interval=0.1)
    api = bridge.api()
    backend = bridge.service.backends[0]
    # Several reconnect attempts (0.1 s apart at most), each refused for the same reason:
    await wait_for(lambda: backend.stats.call_failures >= 5, what="five refused reconnects")
    warnings = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1, warnings   # said once (then once a minute), not on every try
    assert address in warnings[0] and "connection refused" in warnings[0]
    health = await api.fetch("/healthz")
    assert health.code == 503
    body = ujson.loads(health.body)
    assert body["status"] == "unavailable" and body["backends_up"] == 0
    assert address in body["detail"] and "connection refused" in body["detail"]
    client_id = new_client_id()
    ws = await api.ws(client_id)
    assert (await ws.next())["status"] == "connected"
    await api.generate(client_id, {"workflow": "blank-image"})
    told = await ws.next()
    assert told["status"] == "connected"
    assert told["detail"].startswith(f"waiting for a backend: none is up ({address}: ")
    info = await api.json(f"/execution-info?clientId={client_id}")
    assert info["detail"] == told["detail"] and "connection refused" in info["detail"]
    api.close()


async def test_queue_timeout_fails_a_job_no_backend_can_take(bridge_factory):
    bridge = await bridge_factory([Dead(closed_port())], wait_up=False, queue_timeout=0.5)
    api = bridge.api()
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await ws.next()
    await api.generate(client_id, {"workflow": "blank-image"})
    final = await ws.until("error", timeout=10)
    assert final["detail"].startswith("waiting for a backend: none is up") and "gave up after 0.5s" in final["detail"]
    assert bridge.service.queue.position(bridge.service.get(client_id)) is None
    api.close()


async def test_a_busy_fleet_is_not_a_queue_timeout(sim, bridge_factory):
    bridge = await bridge_factory([sim], queue_timeout=0.2)
    api = bridge.api()
    sim.tick_seconds = 0.05
    first, second = new_client_id(), new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(first, {"workflow": "slow-progress", "1/image": saved, "2/steps": 20})
    await api.generate(second, {"workflow": "invert", "1/image": saved})   # waits ~1 s behind it
    for client_id in (first, second):
        assert (await api.wait_status(client_id, "closed", "error", timeout=15))["status"] == "closed"
    api.close()


async def test_reconnect_backoff_is_capped_by_the_health_interval_and_the_error_cleared(sim, bridge_factory):
    bridge = await bridge_factory([sim], health_check_interval=0.3)
    backend = bridge.service.backends[0]
    await sim.crash()
    # Uncapped, the pauses between attempts would have grown to 0.25+0.5+1+2 s by the fifth.
    await wait_for(lambda: backend.stats.call_failures >= 6, timeout=5, what="six refused reconnects")
    assert backend.stats.last_error
    await sim.restart()
    await wait_for(lambda: backend.up, timeout=2, what="reconnected within the 0.3 s cap")
    assert backend.stats.last_error == ""


async def test_a_refused_generate_reaches_the_open_socket(api):
    client_id = new_client_id()
    ws = await api.ws(client_id)
    assert (await ws.next())["status"] == "connected"
    answer = await api.generate(client_id, {"workflow": "no-such-workflow"}, expect=400)
    message = await ws.next()
    assert message["status"] == "error" and message["detail"] == answer["detail"]
    assert await ws.next() is None   # and the socket is closed


async def test_a_refused_second_generate_leaves_the_running_jobs_socket_alone(api, sim):
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await ws.next()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 10})
    await api.generate(client_id, {"workflow": "invert", "1/image": saved}, expect=400)
    assert (await ws.until("closed", timeout=15))["status"] == "closed"
