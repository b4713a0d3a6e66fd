"""An old ComfyUI (before mid-2024): its own prompt ids, no execution_success or
progress_state, and a /interrupt that ignores its body. The bridge must work with it."""
import io

from PIL import Image, ImageChops

from tests.conftest import new_client_id, png_bytes, wait_for


async def test_job_completes_on_an_old_server(sim_factory, bridge_factory):
    old = await sim_factory(name="old", legacy=True)
    bridge = await bridge_factory([old])
    api = bridge.api()
    source = png_bytes(12, 9, seed=4)
    client_id = new_client_id()
    ws = await api.ws(client_id)
    saved = await api.upload(source)
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    messages = await ws.closed()
    assert messages[-1]["detail"] == "Execution is done"
    # The server chose its own prompt id; the bridge followed it.
    sent = [b["prompt_id"] for m, p, b in old.requests_log if m == "POST" and p.endswith("/prompt")]
    assert bridge.service.get(client_id).prompt_id not in sent
    got = Image.open(io.BytesIO((await api.history(client_id))[0]["data"])).convert("RGB")
    assert got.tobytes() == ImageChops.invert(Image.open(io.BytesIO(source)).convert("RGB")).tobytes()
    api.close()


async def test_progress_from_progress_events_alone(sim_factory, bridge_factory):
    old = await sim_factory(name="old", legacy=True, tick_seconds=0.02)
    bridge = await bridge_factory([old])
    api = bridge.api()
    client_id = new_client_id()
    ws = await api.ws(client_id)
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 8})
    messages = await ws.closed()
    progress = [float(m["detail"].rstrip("%")) for m in messages if m["status"] == "progress"]
    assert len(progress) >= 6 and progress == sorted(progress)
    assert messages[-1]["status"] == "closed"
    api.close()


async def test_cancel_on_an_old_server_stops_only_that_job(sim_factory, bridge_factory):
    old = await sim_factory(name="old", legacy=True, tick_seconds=0.03)
    bridge = await bridge_factory([old])
    api = bridge.api()
    saved = await api.upload(png_bytes())
    victim, waiting = new_client_id(), new_client_id()
    await api.generate(victim, {"workflow": "slow-progress", "1/image": saved, "2/steps": 40})
    await api.generate(waiting, {"workflow": "slow-progress", "1/image": saved, "2/steps": 5})
    await wait_for(lambda: bridge.service.get(victim).percent > 0, what="victim running")
    await api.json(f"/interrupt?clientId={victim}", "POST")
    assert (await api.wait_status(victim, "error"))["detail"].startswith("interrupted")
    # The global interrupt of an old server hit only the victim: the next job runs to its end.
    assert (await api.wait_status(waiting, "closed", "error"))["status"] == "closed"
    assert len(await api.history(waiting)) == 1
    api.close()
