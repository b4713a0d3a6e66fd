"""Cancelling: POST /interrupt, closing the websocket, and socket replacement."""
import pytest

from tests.conftest import new_client_id, png_bytes, stopped_by_id, wait_for

# Every test here runs against each simulator profile: legacy, 0.3.64 and current ComfyUI.
pytestmark = pytest.mark.all_profiles


async def start_slow(api, client_id, steps=200):
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": steps})
    return saved


async def next_job_runs(api):
    other = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(other, {"workflow": "invert", "1/image": saved})
    await api.wait_status(other, "closed")


async def running_job_with_socket(api, bridge, sim):
    """A slow job executing on the backend, followed by its websocket: (clientId, socket, prompt_id)."""
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await start_slow(api, client_id)
    await ws.until("progress")
    prompt_id = bridge.service.get(client_id).prompt_id
    return client_id, ws, prompt_id


async def test_interrupt_running_job_targets_its_prompt_only(api, bridge, sim):
    client_id, ws, prompt_id = await running_job_with_socket(api, bridge, sim)
    answer = await api.json(f"/interrupt?clientId={client_id}", "POST")
    assert answer == {"detail": f"interrupted that clientId will be ignored. / {client_id}"}
    final = await ws.until("error")
    assert final["detail"] == final["details"] and final["detail"].startswith("interrupted")
    assert await ws.next() is None
    await wait_for(lambda: stopped_by_id(sim, prompt_id, ("interrupted",)), what="targeted interrupt at the backend")
    assert None not in sim.interrupt_calls  # never a global interrupt
    info = await api.json(f"/execution-info?clientId={client_id}")
    assert info["status"] == "error" and info["detail"].startswith("interrupted")
    await next_job_runs(api)  # the slot is free


@pytest.mark.bridge_settings(MAX_INFLIGHT_PER_SERVER=1)  # the bridge's own queue: no prompt waits in ComfyUI's
async def test_interrupt_queued_job_never_reaches_a_backend(api, bridge, sim):
    sim.tick_seconds = 0.1
    running, queued = new_client_id(), new_client_id()
    await start_slow(api, running)
    await api.wait_status(running, "progress")
    saved = await api.upload(png_bytes(seed=3))
    await api.generate(queued, {"workflow": "invert", "1/image": saved})
    await api.json(f"/interrupt?clientId={queued}", "POST")
    info = await api.json(f"/execution-info?clientId={queued}")
    assert info["status"] == "error" and info["detail"].startswith("interrupted")
    await api.json(f"/interrupt?clientId={running}", "POST")
    await api.wait_status(running, "error")
    prompts = [body for method, path, body in sim.requests_log if path.endswith("/prompt") and method == "POST"]
    assert len(prompts) == 1  # only the running job's prompt was ever sent


@pytest.mark.all_profiles(xfail={"legacy": (
    "old servers ignore the prompt_id of POST /interrupt: the bridge's interrupt, sent after it saw the "
    "prompt running in GET /queue, lands after that prompt ended and stops the next prompt instead")})
async def test_a_late_interrupt_does_not_stop_the_next_job(api, bridge, sim):
    """The bridge cancels a running job; its POST /interrupt reaches the backend only after
    that prompt ended and the next job's prompt started (stalled there until then)."""
    sim.tick_seconds = 0.02
    victim, following = new_client_id(), new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(victim, {"workflow": "slow-progress", "1/image": saved, "2/steps": 10})
    await api.wait_status(victim, "progress")
    victim_prompt = bridge.service.get(victim).prompt_id
    # Current servers are cancelled through their atomic route, older ones by a targeted interrupt.
    sim.stall_next("POST jobs" if sim.profile == "current" else "POST interrupt", seconds=30)
    await api.json(f"/interrupt?clientId={victim}", "POST")
    await wait_for(lambda: sim.stalling == 1, what="the bridge's interrupt to reach the backend")
    await api.generate(following, {"workflow": "slow-progress", "1/image": saved, "2/steps": 30})
    await wait_for(lambda: victim_prompt in sim.executed_prompts, what="the victim's prompt to end on its own")
    await wait_for(lambda: bridge.service.get(following).prompt_id in sim.executions, what="the next prompt to run")
    sim.release_stalls()
    await wait_for(lambda: sim.stalling == 0 and (sim.interrupt_calls or sim.cancel_calls),
                   what="the interrupt to be handled")
    assert (await api.wait_status(following, "closed", "error"))["status"] == "closed"


async def test_interrupt_unknown_client_is_400(api):
    body = await api.json(f"/interrupt?clientId={new_client_id()}", "POST", expect=400)
    assert "not recognized" in body["detail"]


async def test_closing_socket_cancels_running_job_and_frees_slot(api, bridge, sim):
    client_id, ws, prompt_id = await running_job_with_socket(api, bridge, sim)
    ws.close()
    await wait_for(lambda: stopped_by_id(sim, prompt_id, ("interrupted",)), what="targeted interrupt after socket close")
    assert None not in sim.interrupt_calls
    assert bridge.service.backends[0].in_flight == set()
    await next_job_runs(api)


@pytest.mark.bridge_settings(MAX_INFLIGHT_PER_SERVER=1)  # the bridge's own queue: no prompt waits in ComfyUI's
async def test_closing_socket_drops_queued_job(api, bridge, sim):
    sim.tick_seconds = 0.1
    running, queued = new_client_id(), new_client_id()
    await start_slow(api, running)
    await api.wait_status(running, "progress")
    ws = await api.ws(queued)
    await ws.next()
    saved = await api.upload(png_bytes())
    await api.generate(queued, {"workflow": "invert", "1/image": saved})
    assert bridge.service.get(queued).state.value == "queued"
    ws.close()
    await wait_for(lambda: bridge.service.get(queued).state.value == "error", what="queued job dropped")
    assert len(bridge.service.queue) == 0
    await api.json(f"/interrupt?clientId={running}", "POST")


async def test_second_socket_replaces_first_without_cancelling(api, sim):
    sim.tick_seconds = 0.02
    client_id = new_client_id()
    first = await api.ws(client_id)
    await first.next()
    await start_slow(api, client_id, steps=15)
    second = await api.ws(client_id)
    messages = await first.closed()
    assert messages[-1] == {"status": "closed", "detail": "replaced by a new connection",
                            "details": "replaced by a new connection"}
    done = await second.until("closed", "error")
    assert done["detail"] == "Execution is done"
    assert len(await api.history(client_id)) == 1


async def test_socket_opened_after_the_end_gets_final_message_then_close(api):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await api.wait_status(client_id, "closed")
    ws = await api.ws(client_id)
    messages = await ws.closed()
    assert [m["status"] for m in messages] == ["connected", "closed"]
    assert messages[-1]["detail"] == "Execution is done"
    assert len(await api.history(client_id)) == 1


async def test_socket_opened_after_an_error_gets_it(api, sim):
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    await start_slow(api, client_id)
    await api.wait_status(client_id, "progress")
    await api.json(f"/interrupt?clientId={client_id}", "POST")
    ws = await api.ws(client_id)
    messages = await ws.closed()
    assert [m["status"] for m in messages] == ["connected", "error"]


async def test_heartbeat_listening_while_idle(sim, bridge_factory):
    bridge = await bridge_factory([sim], heartbeat_interval=0.1)
    api = bridge.api()
    ws = await api.ws(new_client_id())
    assert (await ws.next())["status"] == "connected"
    for _ in range(3):
        message = await ws.next(timeout=2)
        assert message == {"status": "listening", "detail": "server is listening", "details": "server is listening"}
    ws.close()
    api.close()


async def test_ws_without_valid_client_id_is_400_before_upgrade(api):
    for query in ("", "?clientId=", "?clientId=bad%20id"):
        response = await api.fetch("/ws" + query, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                           "Sec-WebSocket-Version": "13",
                                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert response.code == 400, query
        assert b"clientId" in response.body


async def test_error_job_history_is_400_then_forgotten(api, sim):
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    await start_slow(api, client_id)
    await api.wait_status(client_id, "progress")
    await api.json(f"/interrupt?clientId={client_id}", "POST")
    body = await api.json(f"/history?clientId={client_id}", expect=400)
    assert body["detail"].startswith("interrupted")
    response = await api.fetch(f"/history?clientId={client_id}")
    assert response.code == 204


async def test_timeout_reports_and_interrupts(sim, bridge_factory):
    bridge = await bridge_factory([sim], execution_timeout=0.5)
    sim.tick_seconds = 0.05
    api = bridge.api()
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await start_slow(api, client_id)
    final = await ws.until("error")
    assert final["detail"] == "time out error: exceed 0.5s"
    prompt_id = bridge.service.get(client_id).prompt_id
    await wait_for(lambda: stopped_by_id(sim, prompt_id, ("interrupted",)), what="targeted interrupt on timeout")
    assert None not in sim.interrupt_calls
    api.close()
