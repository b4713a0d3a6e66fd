"""One call: POST /generate-based-workflow?wait=<seconds> answers as GET /history would."""
from __future__ import annotations

import asyncio

import ujson

from handlers.generate import WAIT_GONE
from tests.conftest import new_client_id, parse_multipart, png_bytes, stopped_by_id, wait_for


def parts_of(response) -> list[tuple[dict, bytes]]:
    parts = parse_multipart(response.body, response.headers["Content-Type"])
    return [(p["headers"], p["data"]) for p in parts]


async def running(api, client_id):
    """Once a held generate's job (sent meanwhile) executes; its clientId is unknown until it arrives."""
    async def check():
        answer = await api.fetch(f"/execution-info?clientId={client_id}")
        return answer.code == 200 and ujson.loads(answer.body)["status"] == "progress"
    await wait_for(check, 10, interval=0.02, what=f"{client_id} to run")


async def generate_waiting(api, client_id, body, wait, **kw):
    return await api.fetch(f"/generate-based-workflow?clientId={client_id}&wait={wait}", "POST", body, **kw)


async def test_wait_answers_as_history_and_the_results_count_as_delivered(api):
    image = png_bytes(seed=5)
    saved = await api.upload(image)
    # The same job twice: once the usual way (generate, then GET /history), once in one call.
    polled = new_client_id()
    await api.generate(polled, {"workflow": "invert", "1/image": saved})
    await api.wait_status(polled, "closed")
    history = await api.fetch(f"/history?clientId={polled}")
    assert history.code == 200

    one_call = new_client_id()
    answer = await generate_waiting(api, one_call, {"workflow": "invert", "1/image": saved}, 10)
    assert answer.code == 200, answer.body
    assert answer.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert parts_of(answer) == parts_of(history) and len(parts_of(answer)) == 1
    # Delivered: the job is gone, as after GET /history, and the clientId may be used again.
    gone = await api.fetch(f"/history?clientId={one_call}")
    assert gone.code == 204 and "not recognized" in gone.headers["X-Bridge-Detail"]
    await api.generate(one_call, {"workflow": "invert", "1/image": saved})


async def test_wait_running_out_answers_202_and_the_job_goes_on(api, sim):
    sim.tick_seconds = 0.05
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    answer = await generate_waiting(api, client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 20},
                                    0.3)
    assert answer.code == 202, answer.body
    detail = ujson.loads(answer.body)["detail"]
    assert detail.startswith("still running / ") and detail.endswith("%"), detail
    info = await api.wait_status(client_id, "closed", "error")
    assert info["status"] == "closed"
    assert len(await api.history(client_id)) == 1


async def test_a_job_failing_while_waited_for_is_its_error(api, bridge, sim):
    sim.tick_seconds = 0.05
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    held = asyncio.ensure_future(generate_waiting(
        api, client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 200}, 30))
    await running(api, client_id)
    await api.json(f"/interrupt?clientId={client_id}", "POST")
    answer = await held
    assert answer.code == 400 and ujson.loads(answer.body)["detail"].startswith("interrupted")
    # Reported once, as GET /history does: the job is forgotten.
    assert (await api.fetch(f"/history?clientId={client_id}")).code == 204


async def test_a_client_leaving_while_waiting_cancels_its_job(api, bridge, sim):
    sim.tick_seconds = 0.05
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    body = ujson.dumps({"workflow": "slow-progress", "1/image": saved, "2/steps": 200}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(f"POST /generate-based-workflow?clientId={client_id}&wait=60 HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await running(api, client_id)
    prompt_id = bridge.service.get(client_id).prompt_id
    writer.close()
    info = await api.wait_status(client_id, "error")
    assert info["detail"] == WAIT_GONE
    await wait_for(lambda: stopped_by_id(sim, prompt_id, ("interrupted",)), what="the prompt stopped on its backend")
    # The slot is free: the next job runs.
    other = new_client_id()
    assert (await generate_waiting(api, other, {"workflow": "invert", "1/image": saved}, 10)).code == 200


async def test_a_bad_wait_is_a_400_naming_it_and_queues_nothing(api):
    saved = await api.upload(png_bytes())
    for bad in ("soon", "-1", "nan", "inf", "601", ""):
        client_id = new_client_id()
        answer = await generate_waiting(api, client_id, {"workflow": "invert", "1/image": saved}, bad)
        assert answer.code == 400, (bad, answer.body)
        assert "'wait'" in ujson.loads(answer.body)["detail"]
        assert (await api.fetch(f"/execution-info?clientId={client_id}")).code == 400  # no job


async def test_a_held_request_outlasts_the_connection_timeouts(sim, bridge_factory):
    # HEADER_TIMEOUT and BODY_TIMEOUT bound a client's silence, not the bridge's own time to answer.
    bridge = await bridge_factory([sim], header_timeout=0.3, body_timeout=0.3)
    api = bridge.api()
    sim.tick_seconds = 0.05
    saved = await api.upload(png_bytes())
    answer = await generate_waiting(api, new_client_id(),
                                    {"workflow": "slow-progress", "1/image": saved, "2/steps": 20}, 10)
    assert answer.code == 200 and len(parts_of(answer)) == 1
    api.close()
