"""Free, generation count, no-file jobs, headers never forwarded, expiry, API key basics."""
import time

import ujson

from balancer.jobs import Job, JobState
from tests.conftest import new_client_id, png_bytes, wait_for


def free_calls(sim):
    return [body for method, path, body in sim.requests_log if method == "POST" and path.endswith("/free")]


async def test_free_all_backends(sim_factory, bridge_factory):
    sims = [await sim_factory(name="a"), await sim_factory(name="b")]
    bridge = await bridge_factory(sims)
    api = bridge.api()
    assert await api.json("/free", "POST") == {"detail": "server memory free now / ALL"}
    for sim in sims:
        assert free_calls(sim) == [{"unload_models": True, "free_memory": True}]
    api.close()


async def test_free_with_client_id_targets_its_backend_only(sim_factory, bridge_factory):
    sims = [await sim_factory(name="a"), await sim_factory(name="b")]
    bridge = await bridge_factory(sims)
    api = bridge.api()
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await api.wait_status(client_id, "closed")
    ran_on = bridge.service.get(client_id).last_backend.address
    assert await api.json(f"/free?clientId={client_id}", "POST") == {
        "detail": f"server memory free now / {client_id}"}
    for sim in sims:
        assert len(free_calls(sim)) == (1 if sim.address == ran_on else 0)
    unknown = await api.json(f"/free?clientId={new_client_id()}", "POST", expect=400)
    assert "not recognized" in unknown["detail"]
    bad = await api.json("/free?clientId=..%2F..", "POST", expect=400)
    assert "clientId" in bad["detail"]
    api.close()


async def test_generation_count_is_a_bare_integer(api):
    response = await api.fetch("/generation-count")
    assert response.code == 200 and ujson.loads(response.body) == 0
    assert response.headers["Content-Type"].startswith("application/json")


async def test_finished_job_without_files_gives_zero_parts(api, bridge):
    client_id = new_client_id()
    job = Job(client_id=client_id, alias="invert", graph={}, files={}, class_types=frozenset())
    job.state = JobState.DONE
    job.finished_at = time.time()
    bridge.service.jobs[client_id] = job
    response = await api.fetch(f"/history?clientId={client_id}")
    assert response.code == 200
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    boundary = ctype.split("boundary=")[1]
    assert response.body == f"--{boundary}--\r\n".encode()
    assert bridge.service.get(client_id) is None


async def test_client_origin_cookie_and_auth_never_reach_comfyui(api, sim):
    client_id = new_client_id()
    headers = {"Origin": "http://evil.example", "Cookie": "session=secret"}
    saved = await api.upload(png_bytes())
    await api.json(f"/generate-based-workflow?clientId={client_id}", "POST",
                   {"workflow": "invert", "1/image": saved}, headers=headers)
    await api.wait_status(client_id, "closed")  # ComfyUI answers 403 to a forwarded foreign Origin
    assert len(await api.history(client_id)) == 1


async def test_results_expire_after_result_ttl(api, bridge):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await api.wait_status(client_id, "closed")
    folder = bridge.service.get(client_id).results[0].path.parent
    ttl = bridge.bridge.settings.result_ttl
    assert bridge.service.sweep_expired(time.time() + ttl / 2) == []
    assert bridge.service.sweep_expired(time.time() + ttl + 1) == [client_id]
    await wait_for(lambda: not folder.exists(), what="expired results removed")
    assert (await api.fetch(f"/history?clientId={client_id}")).code == 204


async def test_api_key_required_when_configured(sim, bridge_factory):
    bridge = await bridge_factory([sim], bridge_api_key="s3cret")
    anonymous = bridge.api()
    for path in ("/workflow-list", "/generation-count", "/status", f"/execution-info?clientId={new_client_id()}"):
        response = await anonymous.fetch(path)
        assert response.code == 401, path
        assert "API key" in ujson.loads(response.body)["detail"]
    assert (await anonymous.fetch("/healthz")).code == 200
    assert (await anonymous.fetch("/")).code == 200
    wrong = await anonymous.fetch("/workflow-list", headers={"Authorization": "Bearer nope"})
    assert wrong.code == 401
    assert (await anonymous.fetch("/workflow-list", headers={"X-API-Key": "s3cret"})).code == 200
    keyed = bridge.api("s3cret")
    assert "invert" in await keyed.json("/workflow-list")
    anonymous.close()
    keyed.close()


async def test_status_shows_backends_and_queue(api, sim):
    status = await api.json("/status")
    assert status["backends"][0]["address"] == sim.address and status["backends"][0]["up"] is True
    assert status["queue"] == {"length": 0, "oldest_wait": 0.0}


async def test_json_does_not_escape_slashes(api):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    response = await api.fetch(f"/generate-based-workflow?clientId={client_id}", "POST",
                               {"workflow": "invert", "1/image": saved})
    assert response.body == b'{"detail":"queued / 1"}'
    await api.wait_status(client_id, "closed")


async def test_client_websocket_has_nagle_off(api, bridge):
    """Status frames are small and clients never answer them: with Nagle's algorithm each one
    waits for the client's delayed ACK (40 ms on Linux). The bridge's side of every client
    socket must have TCP_NODELAY."""
    import socket as socketlib
    client_id = new_client_id()
    ws = await api.ws(client_id)
    assert (await ws.next())["status"] == "connected"
    sink = bridge.bridge.hub._sinks[client_id]
    sock = sink.ws_connection.stream.socket
    assert sock.getsockopt(socketlib.IPPROTO_TCP, socketlib.TCP_NODELAY) != 0
