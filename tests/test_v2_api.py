"""Comfy API v2 on the wire: the error envelope on every route, Idempotency-Key semantics,
refusals of a graph, assets (hash checks, Range), the event stream's shape, the switches, and
real answers checked against the served document's schemas and against the contract's models
(those comfy-sdk generates from Comfy-Org's openapi.yaml)."""
from __future__ import annotations

import asyncio
import os
import re
import time

import pytest
import ujson
from blake3 import blake3
from comfy_low.models import Asset as ContractAsset
from comfy_low.models import ErrorEnvelope as ContractError
from comfy_low.models import Job as ContractJob
from comfy_low.models import JobWorkflowResponse as ContractWorkflow
from openapi_schema_validator import OAS31Validator

import handlers.v2.jobs as v2_jobs
from handlers.openapi import DOCUMENT
from tests.conftest import TIMEOUT, png_bytes, wait_for

pytestmark = pytest.mark.timeout(60)
KEY = "v2-key"
SPEC = ujson.loads(DOCUMENT.read_text())


def graph(image="x.png", steps: int | None = None) -> dict:
    middle = ({"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": steps}} if steps
              else {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}})
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}}, "2": middle,
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}}


def asset_multipart(data: bytes, file_path="in.png", content_type="image/png", expected: str | None = None):
    boundary = "b0undary"
    fields = [("content_type", content_type), ("file_path", file_path)]
    if expected is not None:
        fields.append(("expected_hash", expected))
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode()
                    for n, v in fields)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_path}"\r\n'
             f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def check(response, path: str, method: str, status: int | None = None) -> dict | None:
    """The answer has `status` and satisfies the served document's schema for it."""
    status = status or response.code
    assert response.code == status, (path, response.code, response.body[:500])
    answer = SPEC["paths"][path][method]["responses"][str(status)]
    if "$ref" in answer:
        answer = SPEC["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    media = answer.get("content", {}).get("application/json")
    if media is None:
        return None
    data = ujson.loads(response.body)
    OAS31Validator({**media["schema"], "components": SPEC["components"]}).validate(data)
    if "urls" in data:
        ContractJob.model_validate(data)        # the contract's own model, as strict as the SDK
    elif "error" in data:
        ContractError.model_validate(data)
    elif "size_bytes" in data:
        ContractAsset.model_validate(data)
    elif "workflow" in data and "format" in data:
        ContractWorkflow.model_validate(data)
    return data


@pytest.fixture
async def v2(sim_factory, bridge_factory):
    sims = [await sim_factory(name="sim-a"), await sim_factory(name="sim-b")]
    running = await bridge_factory(sims, bridge_api_key=KEY)
    client = running.api(KEY)
    client.running = running
    yield client
    client.close()


async def upload(api, data: bytes, **kw) -> dict:
    body, ctype = asset_multipart(data, **kw)
    response = await api.fetch("/api/v2/assets", "POST", body, headers={"Content-Type": ctype})
    return check(response, "/api/v2/assets", "post")


async def image(api) -> dict:
    """A `core/ASSET` reference to a fresh uploaded image."""
    return {"__type": "core/ASSET", "info": {"id": (await upload(api, png_bytes()))["id"]}}


async def submit(api, body: dict, key: str | None = None, expect: int = 201):
    headers = {"Idempotency-Key": key} if key else {}
    response = await api.fetch("/api/v2/jobs", "POST", body, headers=headers)
    return check(response, "/api/v2/jobs", "post", expect), response


async def finished(api, job_id: str) -> dict:
    async def ended():
        job = ujson.loads((await api.fetch(f"/api/v2/jobs/{job_id}")).body)
        return job if job["status"] in ("succeeded", "failed", "canceled") else None
    return await wait_for(ended, TIMEOUT, interval=0.02, what=f"job {job_id} to end")


async def test_every_v2_route_answers_the_envelope_without_the_key(v2):
    anonymous = v2.running.api()
    try:
        for method, path in [("POST", "/api/v2/jobs"), ("GET", "/api/v2/jobs"), ("GET", "/api/v2/jobs/x"),
                             ("GET", "/api/v2/jobs/x/events"), ("POST", "/api/v2/jobs/x/cancel"),
                             ("GET", "/api/v2/jobs/x/workflow"), ("POST", "/api/v2/assets"),
                             ("POST", "/api/v2/assets/from-hash"), ("GET", "/api/v2/assets/x"),
                             ("DELETE", "/api/v2/assets/x"), ("GET", "/api/v2/assets/x/content")]:
            response = await anonymous.fetch(path, method, b"{}" if method == "POST" else None)
            assert response.code == 401, (method, path, response.code)
            assert ujson.loads(response.body)["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        head = await anonymous.fetch("/api/v2/assets/by-hash/blake3:" + "0" * 64, "HEAD")
        assert head.code == 401 and not head.body
        missing = await v2.fetch("/api/v2/jobs/" + "0" * 32)
        assert check(missing, "/api/v2/jobs/{id}", "get", 404)["error"]["code"] == "not_found"
    finally:
        anonymous.close()


async def test_a_job_end_to_end_on_the_wire_matches_the_schemas(v2):
    source = png_bytes(seed=9)
    asset = await upload(v2, source)
    assert asset["hash"] == "blake3:" + blake3(source).hexdigest() and asset["created_new"] is True
    assert asset["url"].startswith(v2.base)   # absolute, from the request's own Host
    body = {"workflow": graph({"__type": "core/ASSET", "info": {"id": asset["id"]}}), "metadata": {"run": "wire"}}
    job, response = await submit(v2, body)
    assert response.headers["Location"] == job["urls"]["self"] == f"/api/v2/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["outputs"] == [] and job["metadata"] == {"run": "wire"}
    job = await finished(v2, job["id"])
    check(await v2.fetch(f"/api/v2/jobs/{job['id']}"), "/api/v2/jobs/{id}", "get")
    assert job["status"] == "succeeded" and job["progress"]["value"] == 1.0
    assert job["metrics"]["queue_ms"] is not None and job["metrics"]["execution_ms"] is not None
    output = job["outputs"][0]
    content = await v2.fetch(f"/api/v2/assets/{output['id']}/content")
    assert content.code == 200 and len(content.body) == output["size_bytes"]
    await wait_for(lambda: v2.running.service.get(f"v2.{job['id']}").v2["hashes"] is not None, TIMEOUT, what="hashes")
    record = check(await v2.fetch(f"/api/v2/assets/{output['id']}"), "/api/v2/assets/{id}", "get")
    assert record["hash"] == "blake3:" + blake3(content.body).hexdigest() and record["job_id"] == job["id"]
    check(await v2.fetch(f"/api/v2/jobs/{job['id']}/workflow"), "/api/v2/jobs/{id}/workflow", "get")
    listed = check(await v2.fetch("/api/v2/jobs?metadata[run]=wire"), "/api/v2/jobs", "get")
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert check(await v2.fetch("/api/v2/jobs?metadata[run]=other"), "/api/v2/jobs", "get")["jobs"] == []
    # A job of the bridge's own: /status counts it, and its backend's completed count has it.
    status = await v2.json("/status")
    assert status["jobs"] == {"done": 1} and sum(b["completed"] for b in status["backends"]) == 1


async def test_ranges_206_and_416(v2):
    data = bytes(range(256)) * 4
    asset = await upload(v2, data, file_path="blob.bin", content_type="application/octet-stream")
    url = f"/api/v2/assets/{asset['id']}/content"
    part = await v2.fetch(url, headers={"Range": "bytes=10-19"})
    assert part.code == 206 and part.body == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = await v2.fetch(url, headers={"Range": "bytes=-5"})
    assert tail.code == 206 and tail.body == data[-5:]
    beyond = await v2.fetch(url, headers={"Range": f"bytes={len(data)}-"})
    assert check(beyond, "/api/v2/assets/{id}/content", "get", 416)["error"]["code"] == "range_not_satisfiable"
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    whole = await v2.fetch(url)
    assert whole.code == 200 and whole.body == data and whole.headers["Accept-Ranges"] == "bytes"


async def test_hash_checks_dedup_and_from_hash(v2):
    data = b"some model bytes" * 100
    wrong = await v2.fetch("/api/v2/assets", "POST", *_upload_args(data, expected="blake3:" + "1" * 64))
    assert check(wrong, "/api/v2/assets", "post", 409)["error"]["code"] == "hash_mismatch"
    digest = "blake3:" + blake3(data).hexdigest()
    probe = f"/api/v2/assets/by-hash/{digest}"
    assert (await v2.fetch(probe, "HEAD")).code == 404          # nothing was stored by the refusal
    first = await upload(v2, data, file_path="a.bin", content_type="application/octet-stream", expected=digest)
    assert (await v2.fetch(probe, "HEAD")).code == 200
    second = await upload(v2, data, file_path="b.bin", content_type="application/octet-stream")
    assert second["created_new"] is False and second["id"] != first["id"]
    assert len(list((v2.running.bridge.settings.assets_dir / "blobs").iterdir())) == 1   # stored once
    minted = await v2.fetch("/api/v2/assets/from-hash", "POST", {"hash": digest, "file_path": "c.bin"})
    assert check(minted, "/api/v2/assets/from-hash", "post", 201)["hash"] == digest
    unknown = await v2.fetch("/api/v2/assets/from-hash", "POST", {"hash": "blake3:" + "2" * 64})
    assert check(unknown, "/api/v2/assets/from-hash", "post", 404)["error"]["code"] == "blob_not_found"
    deleted = await v2.fetch(f"/api/v2/assets/{first['id']}", "DELETE")
    assert deleted.code == 204
    assert (await v2.fetch(f"/api/v2/assets/{first['id']}")).code == 404
    assert (await v2.fetch(probe, "HEAD")).code == 200           # the others still hold the bytes


def _upload_args(data: bytes, **kw):
    body, ctype = asset_multipart(data, file_path="m.bin", content_type="application/octet-stream", **kw)
    return body, {"Content-Type": ctype}


async def test_graph_refusals(v2, sim_factory, bridge_factory):
    ui = {"workflow": {"nodes": [], "links": [], "last_node_id": 0}}
    assert (await submit(v2, ui, expect=422))[0]["error"]["code"] == "workflow_format_ui"
    bad = {"workflow": {"1": {"class_type": "LoadImage", "inputs": {}},
                        "2": {"class_type": "NoSuchNode", "inputs": {}},
                        "3": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}}
    error = (await submit(v2, bad, expect=422))[0]["error"]
    assert error["code"] == "invalid_workflow"
    nodes = error["details"]["node_errors"]
    assert nodes["1"][0]["reason"] == "missing_input" and nodes["1"][0]["field"] == "image"
    assert nodes["2"][0]["reason"] == "unknown_node_class"
    assert "invalid_link" in {e["reason"] for e in nodes["3"]}
    missing = {"workflow": graph({"__type": "core/ASSET", "info": {"id": "asset_" + "0" * 32}})}
    assert (await submit(v2, missing, expect=422))[0]["error"]["code"] == "missing_asset"
    labels = {"workflow": graph(), "metadata": {"k": 1}}
    assert (await submit(v2, labels, expect=422))[0]["error"]["code"] == "metadata_invalid"
    assert (await submit(v2, {"workflow": graph(), "webhook_url": "http://x"}, expect=422))[0]["error"]["code"] \
        == "unsupported_field"
    not_json = await v2.fetch("/api/v2/jobs", "POST", b"{nope", headers={"Content-Type": "application/json"})
    assert check(not_json, "/api/v2/jobs", "post", 400)["error"]["code"] == "invalid_request"
    # An operator may restrict the node classes a whole graph may use.
    sim = await sim_factory(name="sim-c")
    strict = await bridge_factory([sim], v2_allowed_node_classes="LoadImage,SaveImage")
    api = strict.api()
    try:
        refused = (await submit(api, {"workflow": graph()}, expect=422))[0]["error"]
        assert refused["details"]["node_errors"]["2"][0]["reason"] == "node_class_not_allowed"
    finally:
        api.close()


async def test_idempotency_replay_reuse_conflict_and_refusals_not_recorded(v2, sim_factory, bridge_factory):
    body = {"workflow": graph(await image(v2))}
    first, _ = await submit(v2, body, key="k-1")
    again, response = await submit(v2, body, key="k-1")
    assert again["id"] == first["id"] and response.headers["Idempotency-Replayed"] == "true"
    other, _ = await submit(v2, {"workflow": graph("y.png")}, key="k-1", expect=422)
    assert other["error"]["code"] == "idempotency_key_reuse"
    assert len([j for j in v2.running.service.jobs.values() if j.v2]) == 1
    # While the first request with a key is being answered, a retry is told to come back.
    keys = v2.running.bridge.v2.keys
    assert keys.begin("jobs", "in-flight", "print") is None
    conflict, response = await submit(v2, body, key="in-flight", expect=409)
    assert conflict["error"]["code"] == "idempotency_conflict" and response.headers["Retry-After"] == "1"
    keys.abandon("jobs", "in-flight")
    # A full queue is 429 queue_full, and the key stays free for the retry that follows.
    sim = await sim_factory(name="sim-q")
    small = await bridge_factory([sim], max_queue=1, max_inflight_per_server=1)   # the bridge's own queue
    api = small.api()
    try:
        picture = await image(api)
        await submit(api, {"workflow": graph(picture, steps=200)})     # runs
        await wait_for(lambda: not small.service.queue, TIMEOUT, what="the first job dispatched")
        await submit(api, {"workflow": graph(picture, steps=200)})     # waits
        full, response = await submit(api, {"workflow": graph(picture)}, key="later", expect=429)
        assert full["error"]["code"] == "queue_full" and int(response.headers["Retry-After"]) > 0
        waiting = next(j for j in small.service.jobs.values() if j.state.value == "queued")
        await api.fetch(f"/api/v2/jobs/{waiting.id}/cancel", "POST")
        later, response = await submit(api, {"workflow": graph(picture)}, key="later")
        assert "Idempotency-Replayed" not in response.headers and later["status"] in ("queued", "running")
    finally:
        api.close()


async def read_stream(api, job_id: str, timeout: float = TIMEOUT,
                      chunks: list | None = None) -> list[tuple[str, object]]:
    """The frames of one events stream, to its end: (event, data) and (':', comment); `chunks`
    gets the raw chunks as they arrive (to wait for a frame while the stream goes on)."""
    chunks = [] if chunks is None else chunks
    response = await api.http.fetch(f"{api.base}/api/v2/jobs/{job_id}/events", headers={
        "Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}, request_timeout=timeout,
        streaming_callback=chunks.append, raise_error=False)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    frames = []
    for block in b"".join(chunks).decode().split("\n\n"):
        if block.startswith(":"):
            frames.append((":", block))
        elif block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            frames.append((fields["event"], ujson.loads(fields["data"])))
    return frames


async def test_events_snapshot_first_outputs_before_the_end_among_keep_alives(v2, monkeypatch):
    # Keep-alive comments every 50 ms fall between the events: the order below holds among them
    # (that they are sent at all: test_a_quiet_stream_sends_keep_alive_comments).
    monkeypatch.setattr(v2_jobs, "KEEPALIVE", 0.05)
    picture = await image(v2)
    job, _ = await submit(v2, {"workflow": graph(picture, steps=15)})
    frames = await read_stream(v2, job["id"])
    events = [name for name, _ in frames if name != ":"]
    assert events[0] == "status"
    assert events[-1] == "status" and frames[-1][1]["status"] == "succeeded"
    assert events[-2] == "output"
    values = [data["value"] for name, data in frames if name == "progress"]
    assert values == sorted(values) and values[-1] == 1.0
    statuses = [data["status"] for name, data in frames if name == "status"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    # A stream opened after the end still gets the snapshot, the outputs and the end at once.
    late = await read_stream(v2, job["id"])
    assert [n for n, _ in late if n != ":"][-2:] == ["output", "status"]
    # Many streams of one job at once: each one ends with the terminal status.
    other, _ = await submit(v2, {"workflow": graph(picture, steps=10)})
    streams = await asyncio.gather(*(read_stream(v2, other["id"]) for _ in range(12)))
    assert all(s[-1][1]["status"] == "succeeded" for s in streams)


async def test_a_quiet_stream_sends_keep_alive_comments(sim_factory, bridge_factory, monkeypatch):
    monkeypatch.setattr(v2_jobs, "KEEPALIVE", 0.05)
    slow = await sim_factory(name="sim-slow", tick_seconds=0.3)   # a progress event every 0.3 s
    running = await bridge_factory([slow], bridge_api_key=KEY)
    api = running.api(KEY)
    try:
        job, _ = await submit(api, {"workflow": graph(await image(api), steps=3)})
        frames = await read_stream(api, job["id"])
        assert ":" in [name for name, _ in frames] and frames[-1][1]["status"] == "succeeded"
    finally:
        api.close()


async def test_cancel_on_the_wire_is_idempotent_and_streams_see_canceling(v2):
    job, _ = await submit(v2, {"workflow": graph(await image(v2), steps=500)})
    chunks: list[bytes] = []
    stream = asyncio.ensure_future(read_stream(v2, job["id"], chunks=chunks))
    # The stream says `canceling` only to a client that saw the job running: wait until it has.
    await wait_for(lambda: b'"status":"running"' in b"".join(chunks).replace(b" ", b""), TIMEOUT,
                   what="the stream to say running")
    canceled = check(await v2.fetch(f"/api/v2/jobs/{job['id']}/cancel", "POST"), "/api/v2/jobs/{id}/cancel", "post")
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "canceled"
    again = check(await v2.fetch(f"/api/v2/jobs/{job['id']}/cancel", "POST"), "/api/v2/jobs/{id}/cancel", "post")
    assert again["status"] == "canceled"
    statuses = [d["status"] for n, d in await stream if n == "status"]
    assert statuses[-2:] == ["canceling", "canceled"]


async def test_v2_off_answers_the_bridges_own_404(sim, bridge_factory):
    running = await bridge_factory([sim], v2_api="off")
    api = running.api()
    try:
        for method, path in [("GET", "/api/v2/jobs"), ("POST", "/api/v2/jobs"), ("GET", "/api/v2/assets/x")]:
            response = await api.fetch(path, method, {"workflow": graph()} if method == "POST" else None)
            assert response.code == 404 and "detail" in ujson.loads(response.body), (method, path)
        assert not [j for j in running.service.jobs.values() if j.v2]
    finally:
        api.close()


def test_every_v2_route_is_in_the_served_document():
    v2_paths = {p for p in SPEC["paths"] if p.startswith("/api/v2/")}
    assert {"/api/v2/jobs", "/api/v2/jobs/{id}", "/api/v2/jobs/{id}/events", "/api/v2/jobs/{id}/cancel",
            "/api/v2/jobs/{id}/workflow", "/api/v2/assets", "/api/v2/assets/from-hash",
            "/api/v2/assets/by-hash/{hash}", "/api/v2/assets/{id}", "/api/v2/assets/{id}/content"} == v2_paths
    assert re.search(r"comfy-api-v2", ujson.dumps(SPEC["tags"]))


def test_preview_frames_are_read_with_and_without_metadata():
    from balancer.comfy.answers import parse_preview
    from comfysim import protocol
    assert parse_preview(protocol.preview_frame(b"PNG")) == (None, None, "image/png", b"PNG")
    assert parse_preview(protocol.preview_with_metadata_frame(b"PNG", "7", "p-1")) == ("p-1", "7", "image/png", b"PNG")
    assert parse_preview(protocol.progress_text_frame("7", "text")) is None
    assert parse_preview(b"\x00\x00") is None


async def test_a_keys_answer_is_committed_with_its_job(v2, monkeypatch):
    """One transaction: a crash cannot keep the job and lose its key's answer (a retry after the
    restart would run it twice), nor the reverse."""
    store = v2.running.bridge.store
    commits = []
    commit = store._commit

    def spy(batch, count, deliveries=None, records=None):
        commit(batch, count, deliveries, records)
        commits.append(({r["id"] for r in batch.values() if r and r.get("v2")}, set(records or {})))
    monkeypatch.setattr(store, "_commit", spy)
    job, _ = await submit(v2, {"workflow": graph(await image(v2))}, key="atomic")
    assert any(job["id"] in ids and ("idempotency", "jobs:atomic") in keys for ids, keys in commits), commits


async def test_a_browser_origin_may_send_the_v2_headers(sim, bridge_factory):
    running = await bridge_factory([sim], cors_origins="http://app.example")
    api = running.api()
    try:
        response = await api.fetch("/api/v2/jobs", "OPTIONS", headers={"Origin": "http://app.example"})
        assert response.code == 204 and response.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert "Idempotency-Key" in response.headers["Access-Control-Allow-Headers"]
        assert "DELETE" in response.headers["Access-Control-Allow-Methods"]
        assert "Idempotency-Replayed" in response.headers["Access-Control-Expose-Headers"]
        other = await api.fetch("/api/v2/jobs", "OPTIONS", headers={"Origin": "http://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
    finally:
        api.close()


async def test_outputs_live_until_expires_at_then_job_and_outputs_are_gone(v2):
    job, _ = await submit(v2, {"workflow": graph(await image(v2))}, key="expiring")
    done = await finished(v2, job["id"])
    output = done["outputs"][0]["id"]
    for _ in range(3):   # fetching consumes nothing
        assert (await v2.fetch(f"/api/v2/assets/{output}/content")).code == 200
    service = v2.running.service
    bridge_job = service.get(f"v2.{job['id']}")
    assert done["expires_at"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(bridge_job.finished_at + 3600)))
    service.sweep_expired(bridge_job.finished_at + v2.running.bridge.settings.result_ttl + 1)
    assert (await v2.fetch(f"/api/v2/jobs/{job['id']}")).code == 404
    assert (await v2.fetch(f"/api/v2/assets/{output}/content")).code == 404
    # The key is kept 24 h, whatever became of its job; then it is free again.
    keys = v2.running.bridge.v2.keys
    assert keys.begin("jobs", "expiring", None) is not None
    keys.sweep(time.time() + 24 * 3600 + 1)
    assert keys.begin("jobs", "expiring", None) is None
    keys.abandon("jobs", "expiring")


async def test_a_large_upload_is_streamed_and_hashed_on_the_way_in(v2):
    data = os.urandom(3 * 1024 * 1024 + 17)
    asset = await upload(v2, data, file_path="weights.bin", content_type="application/octet-stream",
                         expected="blake3:" + blake3(data).hexdigest())
    assert asset["size_bytes"] == len(data) and asset["created_new"] is True
    content = await v2.fetch(f"/api/v2/assets/{asset['id']}/content")
    assert content.body == data and content.headers["Content-Type"] == "application/octet-stream"
    assert not list((v2.running.bridge.settings.assets_dir / ".incoming").iterdir())


async def test_an_upload_over_the_limit_is_413_in_the_envelope(sim, bridge_factory):
    running = await bridge_factory([sim], upload_max_size=1)
    api = running.api()
    try:
        for size in (3 * 1024 * 1024, 1536 * 1024):   # refused by its Content-Length, then mid-body
            body, ctype = asset_multipart(b"x" * size, file_path="big.bin", content_type="application/octet-stream")
            response = await api.fetch("/api/v2/assets", "POST", body, headers={"Content-Type": ctype})
            assert check(response, "/api/v2/assets", "post", 413)["error"]["code"] == "payload_too_large"
        assert not list((running.bridge.settings.assets_dir / ".incoming").iterdir())
        assert not list((running.bridge.settings.assets_dir / "blobs").iterdir())
    finally:
        api.close()


async def test_deleting_an_asset_a_queued_job_needs_keeps_its_bytes_for_the_job(sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_key=KEY)
    api = running.api(KEY)
    try:
        blocker, _ = await submit(api, {"workflow": graph(await image(api), steps=300)})
        await wait_for(lambda: running.service.get(f"v2.{blocker['id']}").executing, TIMEOUT, what="running")
        source = png_bytes(seed=21)
        asset = await upload(api, source)
        waiting, _ = await submit(api, {"workflow": graph({"__type": "core/ASSET", "info": {"id": asset["id"]}})})
        assert waiting["status"] == "queued" and waiting["queue_position"] == 1
        assert (await api.fetch(f"/api/v2/assets/{asset['id']}", "DELETE")).code == 204
        assert (await api.fetch(f"/api/v2/assets/by-hash/{asset['hash']}", "HEAD")).code == 200
        await api.fetch(f"/api/v2/jobs/{blocker['id']}/cancel", "POST")
        done = await finished(api, waiting["id"])
        assert done["status"] == "succeeded"
        content = await api.fetch(f"/api/v2/assets/{done['outputs'][0]['id']}/content")
        assert content.body[:8] == b"\x89PNG\r\n\x1a\n"
        # Its job done, the bytes of the deleted asset go too.
        assert (await api.fetch(f"/api/v2/assets/by-hash/{asset['hash']}", "HEAD")).code == 404
    finally:
        api.close()


async def test_v2_jobs_belong_to_the_tenant_of_their_key(sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_keys="a:key-a,b:key-b")
    a, b = running.api("key-a"), running.api("key-b")
    try:
        body = {"workflow": graph(await image(a))}
        job, _ = await submit(a, body, key="same-key")
        assert running.service.get(f"v2.{job['id']}").tenant == "a"
        # Another tenant does not see it, and its own use of the same Idempotency-Key is its own job.
        assert (await b.fetch(f"/api/v2/jobs/{job['id']}")).code == 404
        assert ujson.loads((await b.fetch("/api/v2/jobs")).body)["jobs"] == []
        other, response = await submit(b, {"workflow": graph(await image(b))}, key="same-key")
        assert other["id"] != job["id"] and response.headers.get("Idempotency-Replayed") != "true"
        done = await finished(a, job["id"])
        assert done["status"] == "succeeded"
        # Its outputs are its tenant's too: by id, as an asset, as content, as another job's input.
        output_id = done["outputs"][0]["id"]
        assert (await a.fetch(f"/api/v2/assets/{output_id}/content")).code == 200
        assert (await b.fetch(f"/api/v2/assets/{output_id}")).code == 404
        assert (await b.fetch(f"/api/v2/assets/{output_id}/content")).code == 404
        reuse = {"workflow": graph({"__type": "core/ASSET", "info": {"id": output_id}})}
        refused, _ = await submit(b, reuse, expect=422)
        assert refused["error"]["code"] == "missing_asset"
        status = ujson.loads((await a.fetch("/status")).body)
        assert set(status["tenants"]) >= {"a", "b"}
    finally:
        a.close()
        b.close()
