"""Unit tests of comfysim's behaviour and test knobs (crash/restart, hang, OOM, interrupts, cache, uploads)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from io import BytesIO

import pytest
from PIL import Image

from comfysim import SimulatedComfy
from comfysim.__main__ import _serve
from comfysim.testing import WSClient, fetch, png_bytes, upload, wait_until

TIMEOUT = 10.0


@pytest.fixture
async def make_sim(sim_factory, tmp_path):
    """`await make_sim(profile=...)`: a started simulator (default profile unless given) whose
    files are under tmp_path; conftest's sim_factory starts and stops it."""
    made = 0

    async def make(**kwargs):
        nonlocal made
        made += 1
        kwargs.setdefault("name", "knob-sim")
        return await sim_factory(data_dir=tmp_path / f"sim{made}", **kwargs)

    return make


@pytest.fixture
async def sim(make_sim):
    return await make_sim()


def base(sim):
    return f"http://{sim.address}"


def ws_base(sim):
    return f"ws://{sim.address}"


def invert_graph(image="src.png", prefix="out"):
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def slow_graph(steps=50, prefix="slow", width=32):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 16, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": steps}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


async def post_prompt(sim, graph, client_id=None, **extra) -> dict:
    body = {"prompt": graph, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    resp = await fetch(base(sim), "/prompt", "POST", body)
    assert resp.code == 200, resp.body
    return json.loads(resp.body)


async def get_json(sim, path):
    resp = await fetch(base(sim), path)
    assert resp.code == 200, (path, resp.code)
    return json.loads(resp.body)


def data_of(ws, type_, **match):
    return [m["data"] for m in ws.messages if m["type"] == type_
            and all(m["data"].get(k) == v for k, v in match.items())]


# -- message order and nodes ---------------------------------------------------------------

async def test_slow_progress_ticks_in_captured_order(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, slow_graph(steps=3), "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    assert ws.types() == [
        "status", "status", "status", "execution_start", "execution_cached",
        "progress_state", "executing", "progress_state",                       # EmptyImage
        "progress_state", "executing",                                         # SimSlowProgress starts
        "progress_state", "progress", "progress_state", "progress", "progress_state", "progress",
        "progress_state", "progress_state", "executing", "executed", "progress_state",  # SaveImage
        "execution_success", "status", "executing"]
    assert [(p["value"], p["max"], p["node"]) for p in data_of(ws, "progress")] == [(1, 3, "2"), (2, 3, "2"), (3, 3, "2")]
    last_state = data_of(ws, "progress_state")[-1]["nodes"]
    assert list(last_state) == ["1", "2", "3"] and last_state["2"]["value"] == 3
    await ws.close()


async def test_image_nodes_do_real_work(sim):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 20, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                     "width": 10, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 2, "sigma": 1.0}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "sub/dir/img_%width%"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, graph, "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    history = (await get_json(sim, f"/history/{pid}"))[pid]
    saved = history["outputs"]["5"]["images"]
    assert saved == [{"filename": "img_10_00001_.png", "subfolder": "sub/dir", "type": "output"},
                     {"filename": "img_10_00002_.png", "subfolder": "sub/dir", "type": "output"}]
    resp = await fetch(base(sim), "/view?filename=img_10_00001_.png&subfolder=sub/dir&type=output")
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/png"
    img = Image.open(BytesIO(resp.body))
    assert img.size == (10, 5)
    assert img.convert("RGB").getpixel((5, 2)) == (0, 255, 255)  # red, inverted
    assert img.text["comfysim"] == "knob-sim"  # the simulator's name is in every saved image
    assert json.loads(img.text["prompt"])["5"]["class_type"] == "SaveImage"
    preview = history["outputs"]["6"]["images"][0]
    assert preview["type"] == "temp" and preview["filename"].startswith("ComfyUI_temp_")
    assert (await fetch(base(sim), f"/view?filename={preview['filename']}&type=temp")).code == 200
    await ws.close()


async def test_runtime_error_for_non_image_upload(sim):
    await upload(base(sim), "garbage.png", b"definitely not a png", overwrite="true")
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, invert_graph("garbage.png"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    err = data_of(ws, "execution_error")[0]
    assert err["node_id"] == "1" and err["node_type"] == "LoadImage"
    assert err["exception_type"] == "PIL.UnidentifiedImageError"
    assert err["exception_message"].startswith("cannot identify image file") and err["exception_message"].endswith("\n")
    assert err["current_inputs"] == {"image": ["garbage.png"]}
    entry = (await get_json(sim, f"/history/{pid}"))[pid]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert pid not in sim.executed_prompts
    await ws.close()


# -- crash / restart ---------------------------------------------------------------------------

async def test_crash_mid_job_and_restart(sim):
    await upload(base(sim), "src.png", png_bytes())
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, slow_graph(steps=500), "c1"))["prompt_id"]
    await ws.wait_message("progress", prompt_id=pid)
    port = sim.port
    await sim.crash()
    await ws.wait_for(lambda frames: ws.closed, TIMEOUT, what="socket drop")
    assert ws.conn.close_code is None  # dropped, no close frame
    refused = await fetch(base(sim), "/queue", timeout=2)
    assert refused.code == 599
    assert await sim.restart() == port
    assert await get_json(sim, "/queue") == {"queue_running": [], "queue_pending": []}
    assert await get_json(sim, "/history") == {}
    assert pid not in sim.executed_prompts
    # input files are gone: the same graph is now rejected
    resp = await fetch(base(sim), "/prompt", "POST", {"prompt": invert_graph("src.png")})
    assert resp.code == 400 and json.loads(resp.body)["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"
    # and it works again after a fresh upload; numbering restarted too
    await upload(base(sim), "src.png", png_bytes())
    ws2 = await WSClient.connect(ws_base(sim), "c1")
    answer = await post_prompt(sim, invert_graph("src.png"), "c1")
    assert answer["number"] == 1  # the rejected POST above counted as 0
    await ws2.wait_prompt_done(answer["prompt_id"])
    assert data_of(ws2, "execution_cached")[0]["nodes"] == []  # caches were lost as well
    await ws2.close()


async def test_crash_releases_hung_requests(sim):
    sim.hang(True)
    pending = asyncio.ensure_future(fetch(base(sim), "/queue", timeout=5))
    await wait_until(lambda: any(p == "/queue" for _, p, _ in sim.requests_log), what="request to arrive")
    assert not pending.done()
    await sim.crash()
    resp = await asyncio.wait_for(pending, TIMEOUT)
    assert resp.code == 599  # connection dropped, not answered
    sim.hang(False)
    await sim.restart()
    assert (await fetch(base(sim), "/queue")).code == 200


# -- hang ---------------------------------------------------------------------------------------

async def test_hang_holds_requests_and_frames(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    sim.hang(True)
    pending = asyncio.ensure_future(fetch(base(sim), "/prompt", "POST", {"prompt": slow_graph(steps=2), "client_id": "c1"}))
    await wait_until(lambda: any(p == "/prompt" for _, p, _ in sim.requests_log), what="request to arrive")
    connecting = asyncio.ensure_future(WSClient.connect(ws_base(sim), "c2"))
    await wait_until(lambda: sum(p.startswith("/ws") for _, p, _ in sim.requests_log) == 2, what="ws upgrade request")
    assert not pending.done() and not connecting.done()
    assert sim.queue_remaining == 0  # the hung request was not processed
    assert len(ws.frames) == 1
    sim.hang(False)
    resp = await asyncio.wait_for(pending, TIMEOUT)
    assert resp.code == 200
    pid = json.loads(resp.body)["prompt_id"]
    await ws.wait_prompt_done(pid)
    ws2 = await asyncio.wait_for(connecting, TIMEOUT)
    await ws2.wait_message("status")
    await ws.close()
    await ws2.close()


async def test_hang_holds_websocket_frames(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, slow_graph(steps=20), "c1"))["prompt_id"]
    await ws.wait_message("progress", prompt_id=pid)
    sim.hang(True)
    marker = {"exec_info": {"queue_remaining": 99}}
    sim._rt.hub.send("status", {"status": marker})
    # A ping/pong round trip is answered below the simulator: had the marker been sent,
    # it would have been written before the pong.
    pong = asyncio.Event()
    ws.conn.on_pong = lambda data: pong.set()
    ws.conn.ping(b"p")
    await asyncio.wait_for(pong.wait(), TIMEOUT)
    assert not data_of(ws, "status", status=marker)
    sim.hang(False)
    await ws.wait_message("status", status=marker)
    await ws.wait_prompt_done(pid)  # execution resumes too
    await ws.close()


# -- OOM ----------------------------------------------------------------------------------------

async def test_fail_next_oom(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    first = (await post_prompt(sim, slow_graph(steps=1, prefix="a"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(first)
    sim.fail_next_oom(1)
    # nodes 1 and 2 are cached now, so the first node that executes is 3
    pid = (await post_prompt(sim, slow_graph(steps=1, prefix="b"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    err = data_of(ws, "execution_error", prompt_id=pid)[0]
    assert err["exception_type"] == "torch.OutOfMemoryError"
    assert err["exception_message"].startswith("Allocation on device")
    assert err["node_id"] == "3" and err["node_type"] == "SaveImage" and err["executed"] == []
    assert data_of(ws, "executing", prompt_id=pid, node="3")
    again = (await post_prompt(sim, slow_graph(steps=1, prefix="b"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(again)
    assert data_of(ws, "execution_success", prompt_id=again)
    assert sim.executed_prompts == [first, again]
    await ws.close()


# -- interrupts ---------------------------------------------------------------------------------

async def test_targeted_and_global_interrupt(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    a = (await post_prompt(sim, slow_graph(steps=400, prefix="a"), "c1"))["prompt_id"]
    b = (await post_prompt(sim, slow_graph(steps=400, prefix="b", width=33), "c1"))["prompt_id"]
    await ws.wait_message("progress", prompt_id=a)
    # wrong id and a pending id are ignored, both answered 200 with an empty body
    for target in ("not-running", b):
        resp = await fetch(base(sim), "/interrupt", "POST", {"prompt_id": target})
        assert resp.code == 200 and resp.body == b"" and "Content-Type" not in resp.headers
    ticks = len(data_of(ws, "progress", prompt_id=a))
    await ws.wait_for(lambda f: len(data_of(ws, "progress", prompt_id=a)) > ticks + 1, what="more ticks")
    assert not data_of(ws, "execution_interrupted")
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": a})
    await ws.wait_prompt_done(a)
    stopped = data_of(ws, "execution_interrupted", prompt_id=a)[0]
    assert stopped["node_id"] == "2" and stopped["node_type"] == "SimSlowProgress" and stopped["executed"] == ["1"]
    # b runs next; a global interrupt (no body) stops whatever runs
    await ws.wait_message("progress", prompt_id=b)
    resp = await fetch(base(sim), "/interrupt", "POST", None)
    assert resp.code == 200
    await ws.wait_prompt_done(b)
    assert data_of(ws, "execution_interrupted", prompt_id=b)
    assert sim.interrupt_calls == ["not-running", b, a, None]
    entry = (await get_json(sim, f"/history/{a}"))[a]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert sim.executed_prompts == []
    await ws.close()


async def test_interrupt_while_idle_is_harmless(sim):
    await fetch(base(sim), "/interrupt", "POST", "")
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, slow_graph(steps=2), "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    assert data_of(ws, "execution_success", prompt_id=pid)
    await ws.close()


# -- cache ---------------------------------------------------------------------------------------

async def test_classic_cache_and_free(make_sim):
    sim = await make_sim(profile="0.3.64")  # the classic cache (today's default keeps more: see test_sim_profiles)
    await upload(base(sim), "src.png", png_bytes())
    ws = await WSClient.connect(ws_base(sim), "c1")

    async def run(graph):
        pid = (await post_prompt(sim, graph, "c1"))["prompt_id"]
        await ws.wait_prompt_done(pid)
        cached = data_of(ws, "execution_cached", prompt_id=pid)[0]["nodes"]
        executed = data_of(ws, "executed", prompt_id=pid)
        return cached, [i["filename"] for e in executed for i in e["output"]["images"]], pid

    cached, files, _ = await run(invert_graph())
    assert cached == [] and files == ["out_00001_.png"]
    cached, files, pid = await run(invert_graph())
    assert cached == ["1", "2", "3"] and files == ["out_00001_.png"]  # old file re-reported
    assert not data_of(ws, "executing", prompt_id=pid, node="3")
    assert (await get_json(sim, f"/history/{pid}"))[pid]["outputs"]["3"]["images"][0]["filename"] == "out_00001_.png"
    # a changed input file (same name) invalidates LoadImage through its hash
    await upload(base(sim), "src.png", png_bytes(color=(1, 2, 3)), overwrite="1")
    cached, files, _ = await run(invert_graph())
    assert cached == [] and files == ["out_00002_.png"]
    # classic cache keeps only what the previous prompt used
    await run(slow_graph(steps=1))
    cached, _, _ = await run(invert_graph())
    assert cached == []
    # /free with free_memory drops everything
    cached, _, _ = await run(invert_graph())
    assert cached == ["1", "2", "3"]
    resp = await fetch(base(sim), "/free", "POST", {"unload_models": True, "free_memory": True})
    assert resp.code == 200 and resp.body == b""
    cached, files, _ = await run(invert_graph())
    assert cached == [] and files == ["out_00004_.png"]
    await ws.close()


# -- uploads ----------------------------------------------------------------------------------

async def test_upload_dedup_and_rename(sim):
    a, b = png_bytes(color=(1, 1, 1)), png_bytes(color=(2, 2, 2))
    assert (await upload(base(sim), "in.png", a))["name"] == "in.png"
    assert (await upload(base(sim), "in.png", a))["name"] == "in.png"          # same bytes: reused
    assert (await upload(base(sim), "in.png", b))["name"] == "in (1).png"      # different: renamed
    assert (await upload(base(sim), "in.png", b))["name"] == "in (1).png"      # found again by hash
    assert (await upload(base(sim), "in.png", b, overwrite="true"))["name"] == "in.png"
    sub = await upload(base(sim), "in.png", a, subfolder="job/1", type="input")
    assert sub == {"name": "in.png", "subfolder": "job/1", "type": "input"}
    info = await get_json(sim, "/object_info/LoadImage")
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["in (1).png", "in.png"]
    resp = await fetch(base(sim), "/view?filename=in.png&type=input&subfolder=job/1")
    assert resp.body == a and resp.headers["Content-Disposition"] == 'filename="in.png"'


# -- start-up, identity, logs -----------------------------------------------------------------

async def test_startup_delay_refuses_then_answers(tmp_path):
    sim = SimulatedComfy(name="late", startup_delay=1.0, data_dir=tmp_path / "late")
    port = await sim.start(port=0)
    try:
        assert port == sim.port and port > 0  # known at once, before anything listens
        early = await fetch(base(sim), "/system_stats", timeout=2)
        if not sim.listening:  # (only a stall longer than the delay could make this vacuous)
            assert early.code == 599  # refused, like a ComfyUI that is still importing nodes
        await asyncio.wait_for(sim.wait_listening(), TIMEOUT)
        stats = await get_json(sim, "/system_stats")
        assert "--name" in stats["system"]["argv"] and "late" in stats["system"]["argv"]
        assert "late" in stats["devices"][0]["name"]
    finally:
        await sim.stop()


async def test_requests_log_and_origin_check(sim):
    resp = await fetch(base(sim), "/prompt", "POST", {"prompt": {}}, headers={"Origin": "http://evil.example"})
    assert resp.code == 403 and resp.body == b""
    resp = await fetch(base(sim), "/api/queue", "POST", {"clear": True})
    assert resp.code == 200
    assert sim.requests_log[-2:] == [("POST", "/prompt", {"prompt": {}}), ("POST", "/api/queue", {"clear": True})]


async def test_client_chosen_id_front_and_history_paging(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    blocker = (await post_prompt(sim, slow_graph(steps=5000), "c1"))["prompt_id"]
    await ws.wait_message("progress", prompt_id=blocker)
    mine = "00000000-0000-4000-8000-00000000000a"
    late = await post_prompt(sim, slow_graph(steps=1, prefix="late"), "c1", prompt_id=mine)
    early = await post_prompt(sim, slow_graph(steps=1, prefix="early"), "c1", front=True)
    assert late["prompt_id"] == mine and early["number"] < 0
    queue = await get_json(sim, "/queue")
    assert [q[1] for q in queue["queue_running"]] == [blocker]
    assert sorted(q[1] for q in queue["queue_pending"]) == sorted([mine, early["prompt_id"]])
    assert await get_json(sim, f"/history/{mine}") == {}
    assert await get_json(sim, f"/history/{blocker}") == {}  # running: not in history yet
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": blocker})
    await ws.wait_prompt_done(mine, timeout=TIMEOUT)
    starts = [d["prompt_id"] for d in data_of(ws, "execution_start")]
    assert starts == [blocker, early["prompt_id"], mine]
    assert list(await get_json(sim, "/history?max_items=2")) == [early["prompt_id"], mine]
    assert list(await get_json(sim, "/history?max_items=1&offset=0")) == [blocker]
    await ws.close()


async def test_standalone_cli(tmp_path):
    timeline = tmp_path / "timeline.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfysim", "--port", "0", "--name", "cli-sim", "--data-dir", str(tmp_path / "d"),
        "--timeline", str(timeline), "--profile", "0.3.64", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        address = line.strip().rsplit(" ", 1)[1]
        resp = await fetch(f"http://{address}", "/system_stats")
        system = json.loads(resp.body)["system"]
        assert resp.code == 200 and "cli-sim" in system["argv"] and system["comfyui_version"] == "0.3.64"
        assert "(0.3.64)" in line
        # "t1" is a prompt id only 0.3.64 takes (today's ComfyUI wants a canonical UUID)
        resp = await fetch(f"http://{address}", "/prompt", "POST", {"prompt": slow_graph(steps=1), "prompt_id": "t1"})
        assert resp.code == 200

        async def finished():
            return json.loads((await fetch(f"http://{address}", "/history/t1")).body)
        await wait_until(finished, TIMEOUT, what="prompt t1 in history")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    [entry] = json.loads(timeline.read_text())  # written on exit: one line per prompt the worker ran
    assert entry["prompt_id"] == "t1" and entry["success"] is True
    assert 0 < entry["ended"] - entry["started"] < TIMEOUT


async def test_prompt_times_are_recorded_in_order(sim):
    first = await post_prompt(sim, slow_graph(steps=1, prefix="a"))
    second = await post_prompt(sim, slow_graph(steps=2, prefix="b"))
    await wait_until(lambda: len(sim.prompt_times) == 2, TIMEOUT)
    (id1, start1, end1, ok1), (id2, start2, end2, ok2) = sim.prompt_times
    assert (id1, id2) == (first["prompt_id"], second["prompt_id"]) and ok1 and ok2
    assert start1 <= end1 <= start2 <= end2
    assert end2 - start2 >= 2 * sim.tick_seconds  # two ticks of SimSlowProgress


# -- fault knobs ----------------------------------------------------------------------------

TEXT_500 = b"500 Internal Server Error\n\nServer got itself in trouble"


def is_injected_500(resp) -> bool:
    return (resp.code == 500 and resp.body == TEXT_500
            and resp.headers["Content-Type"] == "text/plain; charset=utf-8")


async def test_poisoned_prompts_are_500_and_never_queued(sim):
    ws = await WSClient.connect(ws_base(sim), "c1")
    sim.fail_prompts_containing = "POISON"
    for path in ("/prompt", "/api/prompt"):
        resp = await fetch(base(sim), path, "POST", {"prompt": slow_graph(steps=1, prefix="x_POISON_y"), "client_id": "c1"})
        assert is_injected_500(resp), (resp.code, resp.body)
    # a marker the client sent \u-escaped is found too
    resp = await fetch(base(sim), "/prompt", "POST", json.dumps({"prompt": slow_graph(steps=1, prefix="POISÖN")}))
    assert resp.code == 200  # not the marker
    sim.fail_prompts_containing = ("POISÖN", "TOXIC")
    for prefix in ("POISÖN", "TOXIC"):
        resp = await fetch(base(sim), "/prompt", "POST", json.dumps({"prompt": slow_graph(steps=1, prefix=prefix)}))
        assert is_injected_500(resp), prefix
    assert sim.fault_log == [("poison", "POST", "/prompt"), ("poison", "POST", "/api/prompt"),
                             ("poison", "POST", "/prompt"), ("poison", "POST", "/prompt")]
    # none of them was queued, and the counter only moved for the one that was accepted
    ok = await post_prompt(sim, slow_graph(steps=1, prefix="clean"), "c1")
    assert ok["number"] == 1
    await ws.wait_prompt_done(ok["prompt_id"])
    assert [d["prompt_id"] for d in data_of(ws, "execution_start")][-1] == ok["prompt_id"]
    assert len(await get_json(sim, "/history")) == 2  # the clean one and the not-quite-marker one
    assert not sim.executions_containing("POISON") and not sim.executions_containing("TOXIC")
    sim.fail_prompts_containing = None
    assert (await fetch(base(sim), "/prompt", "POST", {"prompt": slow_graph(steps=1, prefix="POISON")})).code == 200
    await ws.close()


async def test_fail_every_nth_call_per_route(sim):
    pid = (await post_prompt(sim, slow_graph(steps=1, prefix="f")))["prompt_id"]
    await wait_until(lambda: pid in sim.executed_prompts)
    entry = (await get_json(sim, f"/history/{pid}"))[pid]
    image = entry["outputs"]["3"]["images"][0]
    view = f"/view?filename={image['filename']}&type=output"
    sim.fail_every = {"history": 3, "view": 2}
    codes = []
    for path in (f"/history/{pid}", "/api/history", f"/history/{pid}", view, f"/api/history/{pid}", view,
                 "/history?max_items=1", "/queue", view, view, "/history"):
        codes.append((await fetch(base(sim), path)).code)
    # history calls 3 and 6 fail, view calls 2 and 4; /queue is not counted
    assert codes == [200, 200, 500, 200, 200, 500, 200, 200, 200, 500, 500]
    assert sim.fault_counts == {"history": 6, "view": 4}
    assert [k for k, _, _ in sim.fault_log] == ["fail_every"] * 4
    # a failing request did nothing: history is still whole
    assert (await get_json(sim, f"/history/{pid}"))[pid]["outputs"] == entry["outputs"]
    # a method in the key narrows what is counted; assigning again restarts the counts
    sim.fail_every = {"GET history": 1}
    assert sim.fault_counts == {}
    assert is_injected_500(await fetch(base(sim), f"/history/{pid}"))
    assert (await fetch(base(sim), "/history", "POST", {"delete": ["nothing"]})).code == 200
    sim.fail_every = {"ws": 1}  # the websocket upgrade itself
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert is_injected_500(await fetch(base(sim), "/ws?clientId=c1", headers=upgrade))
    assert sim.websocket_count == 0
    sim.clear_faults()
    assert (await fetch(base(sim), f"/history/{pid}")).code == 200
    for bad in ({"hist": 2}, {"history": 0}, {"GET history now": 1}):
        with pytest.raises(ValueError):
            sim.fail_every = bad


async def test_stall_next_delays_only_those_calls_and_blocks_nothing(sim):
    sim.stall_next("history", seconds=0.4, count=2)
    started = time.monotonic()
    first = asyncio.ensure_future(fetch(base(sim), "/history"))
    await wait_until(lambda: sim.stalling == 1, what="the first stall")
    second = asyncio.ensure_future(fetch(base(sim), "/api/history/x"))
    await wait_until(lambda: sim.stalling == 2, what="the second stall")
    # the loop goes on: other routes answer, a prompt runs to its end
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = (await post_prompt(sim, slow_graph(steps=2), "c1"))["prompt_id"]
    await ws.wait_prompt_done(pid)
    assert not first.done() and not second.done()
    third = await fetch(base(sim), "/history?max_items=1")  # count=2: the third is not stalled
    assert third.code == 200 and pid in json.loads(third.body)
    assert not first.done()
    # the stalled ones answer after their time, with the state of when they resume
    first, second = await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
    assert time.monotonic() - started >= 0.4
    assert first.code == 200 and pid in json.loads(first.body)
    assert second.code == 200 and json.loads(second.body) == {}
    assert sim.stalling == 0 and [k for k, _, _ in sim.fault_log] == ["stall", "stall"]
    await ws.close()


async def test_release_stalls_lets_stalled_requests_go(sim):
    sim.stall_next("GET queue", seconds=60, count=3)
    stalled = [asyncio.ensure_future(fetch(base(sim), "/queue")) for _ in range(2)]
    await wait_until(lambda: sim.stalling == 2, what="two stalls")
    assert (await fetch(base(sim), "/queue", "POST", {"clear": True})).code == 200  # POSTs are not stalled
    sim.release_stalls()
    answers = await asyncio.wait_for(asyncio.gather(*stalled), TIMEOUT)
    assert [r.code for r in answers] == [200, 200] and sim.stalling == 0
    third = asyncio.ensure_future(fetch(base(sim), "/queue"))  # the stall left over still applies
    await wait_until(lambda: sim.stalling == 1, what="the third stall")
    sim.clear_faults()  # clears what is pending, not what runs
    sim.release_stalls()
    assert (await asyncio.wait_for(third, TIMEOUT)).code == 200
    assert (await fetch(base(sim), "/queue")).code == 200 and sim.stalling == 0


async def test_crash_during_a_stall_drops_the_request(sim):
    sim.stall_next("GET view", seconds=30)
    pending = asyncio.ensure_future(fetch(base(sim), "/view?filename=x.png", timeout=TIMEOUT))
    await wait_until(lambda: sim.stalling == 1, what="the stall")
    await sim.crash()
    resp = await asyncio.wait_for(pending, TIMEOUT)
    assert resp.code == 599  # no answer at all
    await wait_until(lambda: sim.stalling == 0, what="the stall to end")
    await sim.restart()
    assert (await fetch(base(sim), "/view?filename=x.png")).code == 404  # the stall was used up
    with pytest.raises(ValueError):
        sim.stall_next("nowhere", seconds=1)


# -- execution counter -----------------------------------------------------------------------

async def test_executions_count_real_runs_only(sim):
    await upload(base(sim), "src.png", png_bytes())
    ws = await WSClient.connect(ws_base(sim), "c1")
    first = (await post_prompt(sim, invert_graph(prefix="MARK_a"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(first)
    cached = (await post_prompt(sim, invert_graph(prefix="MARK_a"), "c1"))["prompt_id"]
    await ws.wait_prompt_done(cached)
    assert data_of(ws, "execution_cached", prompt_id=cached)[0]["nodes"] == ["1", "2", "3"]
    blocker = (await post_prompt(sim, slow_graph(steps=5000), "c1"))["prompt_id"]
    await ws.wait_message("progress", prompt_id=blocker)
    dropped = (await post_prompt(sim, slow_graph(steps=1, prefix="dropped"), "c1"))["prompt_id"]
    await fetch(base(sim), "/queue", "POST", {"delete": [dropped]})
    sim.fail_next_oom(1)
    oom = (await post_prompt(sim, invert_graph(prefix="MARK_b"), "c1"))["prompt_id"]
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": blocker})
    await ws.wait_prompt_done(oom)
    assert data_of(ws, "execution_error", prompt_id=oom)
    # the cached and the deleted prompt never executed; the interrupted and the failed one did
    assert sim.executions == [first, blocker, oom]
    assert sim.executions.count(first) == 1 and cached not in sim.executions
    assert sim.executions_containing("MARK_") == [first, oom]
    first_run, blocker_run, oom_run = sim.execution_records
    assert first_run.prompt_id == first and first_run.nodes == ["1", "2", "3"]
    assert blocker_run.nodes == ["1", "2"] and oom_run.nodes == ["3"]  # 1 and 2 were cached for it
    assert first_run.extra_data["client_id"] == "c1"
    await ws.close()


async def test_many_servers_in_one_process_are_separate(tmp_path):
    """`python -m comfysim --count 2`: two servers, each with its own port, name, queue and history."""
    ports_file = tmp_path / "ports.json"
    args = argparse.Namespace(host="127.0.0.1", port=0, count=2, ports_file=str(ports_file), name="farm",
                              tick_seconds=0.01, speed=1.0, startup_delay=0.0, data_dir=str(tmp_path / "d"),
                              profile="current", log_level="WARNING", timeline=None, models_kept=3,
                              model_load_seconds=0.0, model_files=None)
    stop = asyncio.Event()
    serving = asyncio.get_running_loop().create_task(_serve(args, stop))
    try:
        await wait_until(ports_file.exists, TIMEOUT, what="the ports file")
        first, second = [f"http://{a}" for a in json.loads(ports_file.read_text())]
        assert first != second
        names = [json.loads((await fetch(b, "/system_stats")).body)["devices"][0]["name"] for b in (first, second)]
        assert "farm-0" in names[0] and "farm-1" in names[1]
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
        answer = await fetch(first, "/prompt", "POST", json.dumps({"prompt": graph, "client_id": "c"}))
        pid = json.loads(answer.body)["prompt_id"]

        async def done_on_first():
            return pid in json.loads((await fetch(first, f"/history/{pid}")).body)
        await wait_until(done_on_first, TIMEOUT, what="the prompt's end on the first server")
        assert json.loads((await fetch(second, "/history")).body) == {}
        assert (tmp_path / "d" / "farm-0").is_dir() and (tmp_path / "d" / "farm-1").is_dir()
    finally:
        stop.set()
        await asyncio.wait_for(serving, TIMEOUT)
