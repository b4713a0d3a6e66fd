"""End to end through the public API: upload, generate, progress, results, cancel."""
import io
from urllib.parse import quote

import pytest
import ujson
from PIL import Image, ImageChops

from tests.conftest import new_client_id, png_bytes, wait_for

# Every test here runs against each simulator profile: legacy, 0.3.64 and current ComfyUI.
pytestmark = pytest.mark.all_profiles


async def run_invert(api, client_id=None, image=None):
    client_id = client_id or new_client_id()
    saved = await api.upload(image or png_bytes())
    answer = await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    return client_id, answer


async def test_invert_pixels_come_back_inverted_over_websocket(api):
    source = png_bytes(20, 10, seed=7)
    client_id = new_client_id()
    ws = await api.ws(client_id)
    first = await ws.next()
    assert first == {"status": "connected", "detail": "server connected", "details": "server connected"}
    saved = await api.upload(source)
    assert await api.generate(client_id, {"workflow": "invert", "1/image": saved}) == {"detail": "queued / 1"}
    done = await ws.until("closed", "error")
    assert done["status"] == "closed" and done["detail"] == done["details"] == "Execution is done"
    assert await ws.next() is None  # the server closes the socket after the final message
    # Like the original project's clients: ask for the results at once after `closed`.
    parts = await api.history(client_id)
    assert len(parts) == 1
    disposition = parts[0]["headers"]["content-disposition"]
    assert 'name="result_0"' in disposition and 'filename="bridge_invert_' in disposition
    assert parts[0]["headers"]["content-type"] == "image/png"
    got = Image.open(io.BytesIO(parts[0]["data"])).convert("RGB")
    expected = ImageChops.invert(Image.open(io.BytesIO(source)).convert("RGB"))
    assert got.size == expected.size and got.tobytes() == expected.tobytes()


async def test_results_are_deleted_after_a_complete_history_response(api, bridge):
    client_id, _ = await run_invert(api)
    await api.wait_status(client_id, "closed")
    job = bridge.service.get(client_id)
    folder = job.results[0].path.parent
    assert folder.is_dir()
    assert len(await api.history(client_id)) == 1
    await wait_for(lambda: not folder.exists(), what="result files removed")
    response = await api.fetch(f"/history?clientId={client_id}")
    assert response.code == 204 and response.body == b""
    assert "not recognized" in response.headers["X-Bridge-Detail"]


async def test_rest_polling_progress_then_results(api, sim):
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 8})
    seen = []

    async def finished():
        info = await api.json(f"/execution-info?clientId={client_id}")
        assert info["detail"] == info["details"]
        seen.append(info)
        return info["status"] == "closed"

    await wait_for(finished, interval=0.02, what="job to finish")
    statuses = [s["status"] for s in seen]
    assert "progress" in statuses and statuses[-1] == "closed"
    percents = [float(s["detail"].rstrip("%")) for s in seen if s["status"] == "progress"]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents)
    assert all(s["detail"].endswith("%") and len(s["detail"].split(".")[1]) == 3
               for s in seen if s["status"] == "progress")
    assert seen[-1]["detail"] == "Execution is done"
    assert len(await api.history(client_id)) == 1


async def test_websocket_progress_is_monotonic_two_decimals(api, sim):
    sim.tick_seconds = 0.03
    client_id = new_client_id()
    ws = await api.ws(client_id)
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 10})
    messages = await ws.closed()
    progress = [m["detail"] for m in messages if m["status"] == "progress"]
    assert len(progress) >= 5
    values = [float(p.rstrip("%")) for p in progress]
    assert values == sorted(values) and len(set(values)) == len(values)  # sent on every change
    assert all(p.endswith("%") and len(p.split(".")[1]) == 3 for p in progress)
    assert max(values) <= 100.0
    assert messages[-1]["status"] == "closed"


async def test_history_before_finish_is_204_no_contents(api, sim):
    sim.tick_seconds = 0.2
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 50})
    response = await api.fetch(f"/history?clientId={client_id}")
    assert response.code == 204 and response.body == b""
    assert response.headers["X-Bridge-Detail"] == f"No contents with that client id / {client_id}"
    await api.json(f"/interrupt?clientId={client_id}", "POST")


async def test_unknown_client_history_is_204_not_recognized(api):
    client_id = new_client_id()
    response = await api.fetch(f"/history?clientId={client_id}")
    assert response.code == 204
    assert response.headers["X-Bridge-Detail"] == (
        "The client ID has not been submitted to the server before. It is not recognized. / " + client_id)


async def test_one_active_job_per_client_and_reuse_after_fetch(api, sim):
    sim.tick_seconds = 0.05
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 4})
    refused = await api.generate(client_id, {"workflow": "invert", "1/image": saved}, expect=400)
    assert client_id in refused["detail"]
    await api.wait_status(client_id, "closed")
    # Results not fetched yet: still not reusable.
    await api.generate(client_id, {"workflow": "invert", "1/image": saved}, expect=400)
    await api.history(client_id)
    assert await api.generate(client_id, {"workflow": "invert", "1/image": saved}) == {"detail": "queued / 1"}
    await api.wait_status(client_id, "closed")


@pytest.mark.bridge_settings(MAX_INFLIGHT_PER_SERVER=1)  # the bridge's own queue: no prompt waits in ComfyUI's
async def test_queued_count_counts_waiting_jobs(api, sim):
    sim.tick_seconds = 0.2
    saved = await api.upload(png_bytes())
    first = new_client_id()
    assert await api.generate(first, {"workflow": "slow-progress", "1/image": saved, "2/steps": 20}) == {
        "detail": "queued / 1"}
    await api.wait_status(first, "progress")
    second, third = new_client_id(), new_client_id()
    assert (await api.generate(second, {"workflow": "invert", "1/image": saved}))["detail"] == "queued / 1"
    assert (await api.generate(third, {"workflow": "invert", "1/image": saved}))["detail"] == "queued / 2"
    info = await api.json(f"/execution-info?clientId={third}")
    assert info["status"] == "connected" and info["detail"] == "queued / 2"
    for client_id in (first, second, third):
        await api.json(f"/interrupt?clientId={client_id}", "POST")


async def test_execution_info_unknown_client_is_400(api):
    body = await api.json(f"/execution-info?clientId={new_client_id()}", expect=400)
    assert "not recognized" in body["detail"]


async def test_execution_info_for_an_open_socket_before_generate_is_connected(api):
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await ws.next()
    info = await api.json(f"/execution-info?clientId={client_id}")
    assert info == {"status": "connected", "detail": "server connected", "details": "server connected"}


async def test_generation_count_counts_successes_and_persists(api, bridge, bridge_factory, sim):
    response = await api.fetch("/generation-count")
    assert response.code == 200 and response.body == b"0"
    for _ in range(2):
        client_id, _ = await run_invert(api)
        await api.wait_status(client_id, "closed")
    assert (await api.fetch("/generation-count")).body == b"2"
    await bridge.stop()  # one bridge per data folder
    data_dir = bridge.bridge.settings.data_dir
    again = await bridge_factory([sim], data_dir=str(data_dir))
    client = again.api()
    try:
        assert (await client.fetch("/generation-count")).body == b"2"
    finally:
        client.close()


@pytest.mark.parametrize("path,method", [
    ("/generate-based-workflow", "POST"), ("/history", "GET"), ("/execution-info", "GET"),
    ("/interrupt", "POST")])
@pytest.mark.parametrize("client_id", [None, "", "has space", "x" * 129, "semi;colon", "ümlaut"])
async def test_client_id_required_and_checked(api, path, method, client_id):
    query = "" if client_id is None else f"?clientId={quote(client_id)}"
    body = {"workflow": "invert"} if method == "POST" else None
    response = await api.fetch(path + query, method, body)
    assert response.code == 400
    assert "clientId" in ujson.loads(response.body)["detail"]
