"""comfysim's version profiles: what "current" (today's ComfyUI, the default), "0.3.64" (the
captured version) and "legacy" (before mid-2024) do differently. The captures themselves are
replayed against "0.3.64" in test_sim_conformance.py."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from comfysim import DEFAULT_PROFILE, PROFILES, SimulatedComfy, protocol
from comfysim.testing import WSClient, fetch, parse_binary_frame, png_bytes, upload, wait_until
from tests.test_sim_knobs import data_of, invert_graph, slow_graph

TIMEOUT = 10.0
JSON = "application/json; charset=utf-8"
INVALID_PROMPT_ID = {
    "error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
              "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                         "omit it to let the server generate one",
              "extra_info": {}},
    "node_errors": {}}
ALL_STATUSES = "pending, in_progress, completed, failed, cancelled"


def base(sim):
    return f"http://{sim.address}"


def ws_base(sim):
    return f"ws://{sim.address}"


async def post(sim, path, body=None, headers=None, method="POST"):
    resp = await fetch(base(sim), path, method, body, headers)
    ctype = resp.headers.get("Content-Type") or ""
    return resp.code, (json.loads(resp.body) if ctype.startswith("application/json") else resp.body)


async def get(sim, path):
    return await post(sim, path, method="GET")


async def submit(sim, graph, client_id="c1", **extra) -> str:
    code, body = await post(sim, "/prompt", {"prompt": graph, "client_id": client_id, **extra})
    assert code == 200, body
    return body["prompt_id"]


async def next_ms(after: int) -> None:
    """Let the millisecond clock move on, so consecutive prompts get distinct create_time."""
    await wait_until(lambda: protocol.now_ms() > after, what="the clock to move")


def is_canonical(value) -> bool:
    return isinstance(value, str) and str(uuid.UUID(value)) == value


# -- choosing a profile ---------------------------------------------------------------------

async def test_profiles_and_the_legacy_alias(sim_factory, tmp_path):
    assert DEFAULT_PROFILE == "current" and set(PROFILES) == {"legacy", "0.3.64", "current"}
    assert SimulatedComfy(data_dir=tmp_path).profile == "current"
    old = SimulatedComfy(legacy=True, data_dir=tmp_path)
    assert old.profile == "legacy" and old.legacy
    assert SimulatedComfy(legacy=True, profile="legacy", data_dir=tmp_path).profile == "legacy"
    captured = SimulatedComfy(profile="0.3.64", data_dir=tmp_path)
    assert captured.profile == "0.3.64" and not captured.legacy
    with pytest.raises(ValueError):
        SimulatedComfy(profile="0.2.0")
    with pytest.raises(ValueError):
        SimulatedComfy(profile="current", legacy=True)
    versions = {}
    for name in PROFILES:
        sim = await sim_factory(name=f"v-{name}", profile=name)
        versions[name] = (await get(sim, "/system_stats"))[1]["system"]
    assert versions["current"]["comfyui_version"] == "0.38.1" and "comfy_package_versions" in versions["current"]
    assert versions["0.3.64"]["comfyui_version"] == "0.3.64" and "comfy_package_versions" not in versions["0.3.64"]
    assert versions["0.3.64"]["os"] == "posix"


# -- POST /prompt ids -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "mine-1", uuid.uuid4().hex, str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}",
    "urn:uuid:" + str(uuid.uuid4()), 12345, ["x"], ""])
async def test_current_refuses_non_canonical_prompt_ids(sim_factory, bad):
    sim = await sim_factory(name="strict")
    ws = await WSClient.connect(ws_base(sim), "c1")
    resp = await fetch(base(sim), "/prompt", "POST", {"prompt": slow_graph(steps=1), "prompt_id": bad})
    assert resp.code == 400 and resp.headers["Content-Type"] == JSON
    assert json.loads(resp.body) == INVALID_PROMPT_ID
    assert sim.queue_remaining == 0 and (await get(sim, "/history"))[1] == {}
    # refused before validation, after the counter moved: the next prompt is number 1
    code, ok = await post(sim, "/prompt", {"prompt": slow_graph(steps=1), "client_id": "c1"})
    assert code == 200 and ok["number"] == 1 and is_canonical(ok["prompt_id"])
    await ws.wait_prompt_done(ok["prompt_id"])
    assert [d["prompt_id"] for d in data_of(ws, "execution_start")] == [ok["prompt_id"]]
    await ws.close()


async def test_current_prompt_id_kept_minted_or_refused_in_that_order(sim_factory):
    sim = await sim_factory(name="ids")
    mine = str(uuid.uuid4())
    assert (await post(sim, "/prompt", {"prompt": slow_graph(steps=1), "prompt_id": mine}))[1]["prompt_id"] == mine
    for body in ({"prompt": slow_graph(steps=1)}, {"prompt": slow_graph(steps=1), "prompt_id": None}):
        code, answer = await post(sim, "/prompt", body)
        assert code == 200 and is_canonical(answer["prompt_id"]) and answer["prompt_id"] != mine
    # "no prompt" is answered before the id is looked at
    code, answer = await post(sim, "/prompt", {"prompt_id": "bad"})
    assert code == 400 and answer["error"]["type"] == "no_prompt"


async def test_older_profiles_treat_client_ids_their_way(sim_factory):
    old = await sim_factory(name="old", profile="0.3.64")
    assert (await post(old, "/prompt", {"prompt": slow_graph(steps=1), "prompt_id": "mine-1"}))[1]["prompt_id"] == "mine-1"
    # 0.3.64 took str() of whatever came: null became "None"
    assert (await post(old, "/prompt", {"prompt": slow_graph(steps=1), "prompt_id": None}))[1]["prompt_id"] == "None"
    legacy = await sim_factory(name="legacy", profile="legacy")
    mine = str(uuid.uuid4())
    minted = (await post(legacy, "/prompt", {"prompt": slow_graph(steps=1), "prompt_id": mine}))[1]["prompt_id"]
    assert minted != mine and is_canonical(minted)


async def test_current_names_missing_node_types(sim_factory):
    sim = await sim_factory(name="types")
    code, body = await post(sim, "/prompt", {"prompt": {"1": {"inputs": {}}}})
    assert code == 400 and body == {"error": {
        "type": "missing_node_type",
        "message": "Node 'ID #1' has no class_type. The workflow may be corrupted or a custom node is missing.",
        "details": "Node ID '#1'", "extra_info": {"node_id": "1", "class_type": None, "node_title": None}},
        "node_errors": {}}
    code, body = await post(sim, "/prompt", {"prompt": {"7": {"class_type": "Nope", "inputs": {}}}})
    assert code == 400 and body["error"] == {
        "type": "missing_node_type", "message": "Node 'Nope' not found. The custom node may not be installed.",
        "details": "Node ID '#7'", "extra_info": {"node_id": "7", "class_type": "Nope", "node_title": "Nope"}}
    code, body = await post(sim, "/prompt", {"prompt": {"7": {"class_type": "Nope", "_meta": {"title": "My node"}}}})
    assert body["error"]["message"] == "Node 'My node' not found. The custom node may not be installed."
    old = await sim_factory(name="old-types", profile="0.3.64")
    code, body = await post(old, "/prompt", {"prompt": {"7": {"class_type": "Nope", "inputs": {}}}})
    assert code == 400 and body["error"] == {"type": "invalid_prompt", "message": "Cannot execute because node Nope "
                                             "does not exist.", "details": "Node ID '#7'", "extra_info": {}}


# -- queue items, extra_data and sensitive keys ---------------------------------------------

SECRETS = {"api_key_comfy_org": "sekrit-key", "auth_token_comfy_org": "sekrit-token"}


async def _queue_and_history_with_secrets(sim):
    """A prompt with API keys waits behind a slow one; returns (/queue, /api/jobs or None,
    its history entry, the execution record) as seen while it waits and after it ran."""
    ws = await WSClient.connect(ws_base(sim), "c1")
    blocker = await submit(sim, slow_graph(steps=2000))
    await ws.wait_message("progress", prompt_id=blocker)
    extra = {**SECRETS, "extra_pnginfo": {"workflow": {"id": "wf-9"}}}
    resp = await fetch(base(sim), "/prompt", "POST", {"prompt": slow_graph(steps=1, prefix="s"), "client_id": "c1",
                                                      "extra_data": extra}, headers={"Comfy-Usage-Source": "tests"})
    pid = json.loads(resp.body)["prompt_id"]
    queue = (await get(sim, "/queue"))[1]
    jobs = (await get(sim, "/api/jobs"))[1] if sim.spec.jobs_api else None
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": blocker})
    await ws.wait_prompt_done(pid)
    history = (await get(sim, f"/history/{pid}"))[1][pid]
    record = next(r for r in sim.execution_records if r.prompt_id == pid)
    await ws.close()
    return pid, queue, jobs, history, record


async def test_current_splits_sensitive_keys_off_and_stamps_extra_data(sim_factory):
    sim = await sim_factory(name="secrets", tick_seconds=0.01)
    before = protocol.now_ms()
    pid, queue, jobs, history, record = await _queue_and_history_with_secrets(sim)
    [item] = queue["queue_pending"]
    assert len(item) == 5 and item[1] == pid and len(queue["queue_running"][0]) == 5
    assert set(item[3]) == {"extra_pnginfo", "client_id", "comfy_usage_source", "create_time"}
    assert item[3]["comfy_usage_source"] == "tests" and before <= item[3]["create_time"] <= protocol.now_ms()
    assert len(history["prompt"]) == 5 and history["prompt"][3] == item[3]
    for shown in (queue, jobs, history):
        assert "sekrit" not in json.dumps(shown)
    assert {k: record.extra_data[k] for k in SECRETS} == SECRETS  # the nodes still got them


async def test_0364_hides_sensitive_keys_from_history_only(sim_factory):
    sim = await sim_factory(name="secrets-0364", profile="0.3.64", tick_seconds=0.01)
    pid, queue, _, history, record = await _queue_and_history_with_secrets(sim)
    [item] = queue["queue_pending"]
    assert len(item) == 5 and item[3] == {**SECRETS, "extra_pnginfo": {"workflow": {"id": "wf-9"}}, "client_id": "c1"}
    assert history["prompt"][3] == {"extra_pnginfo": {"workflow": {"id": "wf-9"}}, "client_id": "c1"}
    assert {k: record.extra_data[k] for k in SECRETS} == SECRETS


# -- websocket: events and the feature_flags handshake --------------------------------------

@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_events_of_a_run_per_profile(sim_factory, profile):
    sim = await sim_factory(name=f"ev-{profile}", profile=profile)
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = await submit(sim, slow_graph(steps=2))
    await ws.wait_prompt_done(pid)
    full = ["status", "status", "status", "execution_start", "execution_cached",
            "progress_state", "executing", "progress_state",
            "progress_state", "executing", "progress_state", "progress", "progress_state", "progress",
            "progress_state", "progress_state", "executing", "executed", "progress_state",
            "execution_success", "status", "executing"]
    if profile == "legacy":
        full = [t for t in full if t not in ("progress_state", "execution_success")]
    assert ws.types() == full
    messages = (await get(sim, f"/history/{pid}"))[1][pid]["status"]["messages"]
    assert [m[0] for m in messages] == ["execution_start", "execution_cached"] + (
        [] if profile == "legacy" else ["execution_success"])
    await ws.close()


async def _pong(ws: WSClient) -> None:
    """Everything the server wrote in answer to earlier frames arrives before this pong."""
    pong = asyncio.Event()
    ws.conn.on_pong = lambda data: pong.set()
    ws.conn.ping(b"p")
    await asyncio.wait_for(pong.wait(), TIMEOUT)


async def test_feature_flags_answered_only_when_asked_first(sim_factory):
    sim = await sim_factory(name="flags", max_upload_size=1234)
    expected = {"supports_preview_metadata": True, "supports_model_type_tags": True, "max_upload_size": 1234,
                "extension": {"manager": {"supports_v4": True}}, "node_replacements": True, "assets": False}
    assert await get(sim, "/features") == (200, expected)
    assert await get(sim, "/api/features") == (200, expected)
    asking = await WSClient.connect(ws_base(sim), "asks")
    asking.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    await asking.wait_message("feature_flags")
    assert asking.types() == ["status", "feature_flags"] and asking.messages[1]["data"] == expected
    silent = await WSClient.connect(ws_base(sim), "silent")
    late = await WSClient.connect(ws_base(sim), "late")
    late.send({"type": "hello", "data": {}})
    late.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})  # not first: ignored
    for ws in (silent, late):
        await _pong(ws)
        assert ws.types() == ["status"]
    for ws in (asking, silent, late):
        await ws.close()


async def test_features_of_older_profiles(sim_factory):
    old = await sim_factory(name="f-0364", profile="0.3.64")
    assert await get(old, "/features") == (200, {"supports_preview_metadata": True, "max_upload_size": 104857600})
    legacy = await sim_factory(name="f-legacy", profile="legacy")
    code, body = await get(legacy, "/features")
    assert code == 404 and body == b""


@pytest.mark.parametrize("profile,answered,frame_type", [("current", True, 4), ("legacy", False, 1)])
async def test_preview_frames_follow_the_handshake(sim_factory, profile, answered, frame_type):
    sim = await sim_factory(name=f"pv-{profile}", profile=profile)
    ws = await WSClient.connect(ws_base(sim), "c1")
    ws.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    await _pong(ws)
    assert ("feature_flags" in ws.types()) is answered
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    pid = await submit(sim, graph)
    await ws.wait_prompt_done(pid)
    frames = [parse_binary_frame(f) for f in ws.frames if isinstance(f, bytes)]
    assert [f["event_type_u32be"] for f in frames] == [frame_type]
    await ws.close()


# -- interrupts -----------------------------------------------------------------------------

async def test_legacy_interrupt_ignores_its_body(sim_factory):
    sim = await sim_factory(name="int-legacy", profile="legacy")
    ws = await WSClient.connect(ws_base(sim), "c1")
    pid = await submit(sim, slow_graph(steps=500))
    await ws.wait_message("progress", prompt_id=pid)
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": str(uuid.uuid4())})  # someone else's id
    await ws.wait_prompt_done(pid)
    assert data_of(ws, "execution_interrupted", prompt_id=pid)
    await ws.close()


# -- caching --------------------------------------------------------------------------------

async def test_current_cache_keeps_earlier_prompts(sim_factory):
    """Today's RAM-pressure cache: an older prompt's nodes are still cached after another ran
    (the classic cache of 0.3.64 would only keep the previous prompt's; test_sim_knobs)."""
    sim = await sim_factory(name="cache")
    await upload(base(sim), "src.png", png_bytes())
    ws = await WSClient.connect(ws_base(sim), "c1")
    runs = []
    for graph in (invert_graph(), slow_graph(steps=1), invert_graph()):
        pid = await submit(sim, graph)
        await ws.wait_prompt_done(pid)
        runs.append(pid)
    assert data_of(ws, "execution_cached", prompt_id=runs[2])[0]["nodes"] == ["1", "2", "3"]
    assert sim.executions == runs[:2]  # the fully cached run executed nothing
    await ws.close()


async def test_history_lists_only_the_outputs_of_that_run(sim_factory):
    sim = await sim_factory(name="partial")
    ws = await WSClient.connect(ws_base(sim), "c1")
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}}}
    first = await submit(sim, graph)
    await ws.wait_prompt_done(first)
    second = await submit(sim, graph, partial_execution_targets=["2"])
    await ws.wait_prompt_done(second)
    assert set((await get(sim, f"/history/{first}"))[1][first]["outputs"]) == {"2", "3"}
    assert set((await get(sim, f"/history/{second}"))[1][second]["outputs"]) == {"2"}  # 3 is cached, not run
    await ws.close()


# -- jobs API -------------------------------------------------------------------------------

@pytest.fixture
async def five_jobs(sim_factory):
    """completed (with a workflow id), failed, cancelled, then one running and one pending:
    returns (sim, ws, {status: prompt_id}); distinct create_time for each."""
    sim = await sim_factory(name="jobs", tick_seconds=0.01)
    await upload(base(sim), "src.png", png_bytes())
    await upload(base(sim), "garbage.png", b"definitely not a png", overwrite="true")
    ws = await WSClient.connect(ws_base(sim), "c1")
    ids = {}

    async def one(status, graph, **extra):
        await next_ms(protocol.now_ms())
        ids[status] = await submit(sim, graph, **extra)
        return ids[status]

    await ws.wait_prompt_done(await one("completed", invert_graph(prefix="done"),
                                        extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}}))
    await ws.wait_prompt_done(await one("failed", invert_graph("garbage.png", prefix="bad")))
    cancelled = await one("cancelled", slow_graph(steps=500, prefix="stop"))
    await ws.wait_message("progress", prompt_id=cancelled)
    await fetch(base(sim), "/interrupt", "POST", {"prompt_id": cancelled})
    await ws.wait_prompt_done(cancelled)
    running = await one("in_progress", slow_graph(steps=5000, prefix="run"))
    await ws.wait_message("progress", prompt_id=running)
    await one("pending", slow_graph(steps=1, prefix="wait"))
    yield sim, ws, ids
    await ws.close()


async def test_jobs_list_shapes_statuses_and_order(five_jobs):
    sim, _, ids = five_jobs
    code, body = await get(sim, "/api/jobs")
    assert code == 200 and body["pagination"] == {"offset": 0, "limit": None, "total": 5, "has_more": False}
    jobs = {j["status"]: j for j in body["jobs"]}
    assert [j["id"] for j in body["jobs"]] == [ids[s] for s in ("pending", "in_progress", "cancelled", "failed",
                                                                  "completed")]  # newest first
    for status, job in jobs.items():
        assert job["id"] == ids[status] and isinstance(job["create_time"], int) and isinstance(job["priority"], int)
    assert set(jobs["pending"]) == set(jobs["in_progress"]) == {
        "id", "status", "priority", "create_time", "outputs_count", "previewable_outputs_count"}
    assert jobs["pending"]["outputs_count"] == 0 and jobs["pending"]["previewable_outputs_count"] == 0
    done = jobs["completed"]
    assert done["workflow_id"] == "wf-1" and done["outputs_count"] == 1 and done["previewable_outputs_count"] == 1
    assert done["preview_output"] == {"filename": "done_00001_.png", "subfolder": "", "type": "output",
                                      "nodeId": "3", "mediaType": "images"}
    assert done["execution_start_time"] <= done["execution_end_time"] and "execution_error" not in done
    failed = jobs["failed"]
    assert failed["execution_error"]["exception_type"] == "PIL.UnidentifiedImageError"
    assert failed["outputs_count"] == 0 and "preview_output" not in failed
    assert "execution_error" not in jobs["cancelled"] and jobs["cancelled"]["execution_end_time"]
    # the same under the doubled prefix ComfyUI also serves; /jobs itself does not exist
    assert (await get(sim, "/api/api/jobs"))[1]["pagination"]["total"] == 5
    assert (await get(sim, "/jobs"))[0] == 404


JOB_QUERIES = [
    ("status=pending,in_progress", ["pending", "in_progress"]),
    ("status=%20Completed%20", ["completed"]),
    ("status=failed", ["failed"]),
    ("status=cancelled&sort_order=ASC", ["cancelled"]),
    ("workflow_id=wf-1", ["completed"]),
    ("workflow_id=nope", []),
    ("sort_order=asc", ["completed", "failed", "cancelled", "in_progress", "pending"]),
    ("limit=2&offset=1", ["in_progress", "cancelled"]),
    ("offset=-3&limit=1", ["pending"]),
    ("offset=9", []),
]


async def test_jobs_list_filters_and_pages(five_jobs):
    sim, _, ids = five_jobs
    for query, expect in JOB_QUERIES:
        code, body = await get(sim, f"/api/jobs?{query}")
        assert code == 200 and [j["id"] for j in body["jobs"]] == [ids[s] for s in expect], query
    assert (await get(sim, "/api/jobs?limit=2&offset=1"))[1]["pagination"] == {
        "offset": 1, "limit": 2, "total": 5, "has_more": True}
    assert (await get(sim, "/api/jobs?offset=-3"))[1]["pagination"] == {
        "offset": 0, "limit": None, "total": 5, "has_more": False}
    assert (await get(sim, "/api/jobs?status=failed"))[1]["pagination"]["total"] == 1


async def test_jobs_sorted_by_execution_duration(five_jobs):
    sim, _, ids = five_jobs
    jobs = (await get(sim, "/api/jobs?sort_by=execution_duration"))[1]["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(ids.values())

    def durations(jobs):
        return [j["execution_end_time"] - j["execution_start_time"] if "execution_end_time" in j else 0 for j in jobs]
    assert durations(jobs) == sorted(durations(jobs), reverse=True)
    assert durations(jobs)[0] > 0  # the interrupted run took ticks
    ascending = (await get(sim, "/api/jobs?sort_by=execution_duration&sort_order=asc"))[1]["jobs"]
    assert durations(ascending) == sorted(durations(jobs))


@pytest.mark.parametrize("query,error", [
    ("status=bogus,pending,nope", f"Invalid status value(s): bogus, nope. Valid values: {ALL_STATUSES}"),
    ("sort_by=name", "sort_by must be 'created_at' or 'execution_duration'"),
    ("sort_order=up", "sort_order must be 'asc' or 'desc'"),
    ("limit=0", "limit must be a positive integer"),
    ("limit=ten", "limit must be an integer"),
    ("offset=x", "offset must be an integer"),
])
async def test_jobs_list_refuses_bad_parameters(sim_factory, query, error):
    sim = await sim_factory(name="jobs-bad")
    resp = await fetch(base(sim), f"/api/jobs?{query}")
    assert resp.code == 400 and resp.headers["Content-Type"] == JSON and json.loads(resp.body) == {"error": error}


async def test_one_job_with_its_details(five_jobs):
    sim, _, ids = five_jobs
    code, done = await get(sim, f"/api/jobs/{ids['completed']}")
    history = (await get(sim, f"/history/{ids['completed']}"))[1][ids["completed"]]
    assert code == 200 and done["status"] == "completed"
    assert done["outputs"] == history["outputs"] and done["execution_status"] == history["status"]
    assert done["workflow"] == {"prompt": history["prompt"][2], "extra_data": history["prompt"][3]}
    assert set(done["workflow"]["extra_data"]) == {"extra_pnginfo", "client_id", "create_time"}
    code, pending = await get(sim, f"/api/jobs/{ids['pending']}")
    assert code == 200 and pending["status"] == "pending" and pending["workflow"]["prompt"]["2"]["inputs"]["steps"] == 1
    assert "outputs" not in pending
    assert (await get(sim, f"/api/jobs/{ids['in_progress']}"))[1]["status"] == "in_progress"
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "cancel"):
        resp = await fetch(base(sim), f"/api/jobs/{unknown}")
        assert resp.code == 404 and resp.headers["Content-Type"] == JSON
        assert json.loads(resp.body) == {"error": "Job not found"}
    assert (await post(sim, f"/api/jobs/{ids['pending']}", {}))[0] == 405


async def test_older_profiles_have_no_jobs_routes(sim_factory):
    for profile in ("0.3.64", "legacy"):
        sim = await sim_factory(name=f"nojobs-{profile}", profile=profile)
        assert (await get(sim, "/api/jobs"))[0] == 404
        assert (await post(sim, f"/api/jobs/{uuid.uuid4()}/cancel", {}))[0] == 404


async def test_cancel_pending_running_finished_and_unknown(five_jobs):
    sim, ws, ids = five_jobs
    assert await post(sim, f"/api/jobs/{ids['pending']}/cancel") == (200, {"cancelled": True})
    assert ids["pending"] not in [i[1] for i in (await get(sim, "/queue"))[1]["queue_pending"]]
    assert await post(sim, f"/api/api/jobs/{ids['in_progress']}/cancel") == (200, {"cancelled": True})
    await ws.wait_prompt_done(ids["in_progress"])
    assert data_of(ws, "execution_interrupted", prompt_id=ids["in_progress"])
    assert (await get(sim, f"/api/jobs/{ids['in_progress']}"))[1]["status"] == "cancelled"
    for done in (ids["in_progress"], ids["completed"], str(uuid.uuid4()), "whatever"):
        assert await post(sim, f"/api/jobs/{done}/cancel") == (200, {"cancelled": False})
    assert sim.cancel_calls == [(ids["pending"], "dequeued"), (ids["in_progress"], "interrupted"),
                                (ids["in_progress"], "terminal"), (ids["completed"], "terminal"),
                                (sim.cancel_calls[4][0], "unknown"), ("whatever", "unknown")]
    assert ids["pending"] not in sim.executions and (await get(sim, f"/history/{ids['pending']}"))[1] == {}
    assert sim.interrupt_calls == [ids["cancelled"]]  # the cancel route is not POST /interrupt


async def test_cancel_of_a_finished_prompt_leaves_the_next_one_running(sim_factory):
    """The race a global interrupt loses: the prompt to cancel has just finished and the next
    one runs. Cancelling the finished one must not touch the running one."""
    sim = await sim_factory(name="race", tick_seconds=0.01)
    ws = await WSClient.connect(ws_base(sim), "c1")
    first = await submit(sim, slow_graph(steps=1, prefix="first"))
    second = await submit(sim, slow_graph(steps=400, prefix="second"))
    await ws.wait_message("progress", prompt_id=second)  # first is done, second runs
    assert await post(sim, f"/api/jobs/{first}/cancel") == (200, {"cancelled": False})
    assert await post(sim, "/api/jobs/cancel", {"job_ids": [first]}) == (200, {"cancelled": False})
    ticks = len(data_of(ws, "progress", prompt_id=second))
    await ws.wait_for(lambda f: len(data_of(ws, "progress", prompt_id=second)) > ticks + 3, what="more ticks")
    assert not data_of(ws, "execution_interrupted")
    assert (await get(sim, f"/api/jobs/{second}"))[1]["status"] == "in_progress"
    assert await post(sim, f"/api/jobs/{second}/cancel") == (200, {"cancelled": True})
    await ws.wait_prompt_done(second)
    assert [d["prompt_id"] for d in data_of(ws, "execution_interrupted")] == [second]
    await ws.close()


async def test_batch_cancel(sim_factory):
    sim = await sim_factory(name="batch", tick_seconds=0.01)
    ws = await WSClient.connect(ws_base(sim), "c1")
    running = await submit(sim, slow_graph(steps=5000))
    await ws.wait_message("progress", prompt_id=running)
    a, b, c = [await submit(sim, slow_graph(steps=1, prefix=p)) for p in "abc"]
    bad_requests = [
        ("not json", {"error": "Request body must be valid JSON"}),
        ("", {"error": "Request body must be valid JSON"}),
        ({"job_ids": a}, {"error": "job_ids must be a list"}),
        ([a], {"error": "job_ids must be a list"}),
        ({"job_ids": [a, "nope", 5, None, a.upper()]},
         {"error": "job_ids contains invalid id(s)", "invalid_ids": ["nope", "5", "None", a.upper()]}),
    ]
    for body, error in bad_requests:
        assert await post(sim, "/api/jobs/cancel", body) == (400, error)
    assert sim.cancel_calls == []  # a refused batch cancels nothing
    unknown = str(uuid.uuid4())
    assert await post(sim, "/api/jobs/cancel", {"job_ids": [a, unknown, b]}) == (200, {"cancelled": True})
    assert await post(sim, "/api/jobs/cancel", {"job_ids": [a, unknown]}) == (200, {"cancelled": False})
    assert await post(sim, "/api/jobs/cancel", {"job_ids": []}) == (200, {"cancelled": False})
    assert [i[1] for i in (await get(sim, "/queue"))[1]["queue_pending"]] == [c]
    assert await post(sim, "/api/jobs/cancel", {"job_ids": [running]}) == (200, {"cancelled": True})
    await ws.wait_prompt_done(c)
    assert sim.executions == [running, c]
    await ws.close()


# -- the conftest switch that runs a test against every profile ------------------------------

async def test_sim_fixture_uses_the_default_profile_unless_marked(sim, sim_profile):
    assert sim_profile is None and sim.profile == DEFAULT_PROFILE


@pytest.mark.all_profiles
async def test_all_profiles_marker_runs_once_per_profile(sim, sim_profile, request):
    assert sim_profile in PROFILES and sim.profile == sim_profile
    assert request.node.name.endswith(f"[{sim_profile}]")


@pytest.mark.all_profiles("legacy", "current", xfail={"legacy": "demonstrates the strict xfail of one profile"})
async def test_all_profiles_marker_limits_and_xfails(sim, sim_profile):
    assert sim_profile in ("legacy", "current")
    assert sim.profile != "legacy"  # fails on legacy only: strict xfail there


# -- byte ranges on /view (comfy-api-proxy forwards a client's Range to it) -------------------

@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_view_serves_byte_ranges_as_aiohttps_file_response(sim_factory, profile):
    sim = await sim_factory(name=f"range-{profile}", profile=profile)
    data = png_bytes(color=(9, 8, 7))
    name = (await upload(base(sim), "ranged.png", data))["name"]
    view = f"/view?filename={name}&type=input"
    size = len(data)

    whole = await fetch(base(sim), view)
    assert whole.code == 200 and whole.body == data and whole.headers["Accept-Ranges"] == "bytes"
    for header, start, stop in [("bytes=0-9", 0, 10), ("bytes=10-", 10, size), ("bytes=-16", size - 16, size),
                                (f"bytes=5-{size + 100}", 5, size), ("bytes=-0", 0, size)]:
        part = await fetch(base(sim), view, headers={"Range": header})
        assert part.code == 206, header
        assert part.body == data[start:stop], header
        assert part.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}", header
    for header in [f"bytes={size}-", "bytes=9-3", "bytes=-", "bytes=0-1,4-5", "items=0-1"]:
        refused = await fetch(base(sim), view, headers={"Range": header})
        assert refused.code == 416 and refused.body == b"", header
        assert refused.headers["Content-Range"] == f"bytes */{size}", header
    preview = await fetch(base(sim), view + "&preview=webp", headers={"Range": "bytes=0-9"})
    assert preview.code == 200  # a re-encoded preview is a plain answer in ComfyUI: no ranges
