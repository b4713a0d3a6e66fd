"""Round trips on a job's path (issue 14, item 3): the output files come from the `executed`
websocket events, and the prompt's history is asked only when the events did not name them all."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from balancer.comfy import api as comfy_api, files

from .conftest import TIMEOUT, new_client_id, png_bytes, wait_for


def _history_reads(sim) -> list[str]:
    return [uri for method, uri, _ in sim.requests_log
            if method == "GET" and uri.split("?")[0].removeprefix("/api").startswith("/history/")]


async def _run(api, values: dict) -> list[dict]:
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await api.generate(client_id, values)
    final = await ws.until("closed", "error")
    assert final["status"] == "closed", final
    return await api.history(client_id)


def _files(parts: list[dict]) -> list[tuple[str, bytes]]:
    return [(part["headers"]["content-disposition"], part["data"]) for part in parts]


BLANK = {"workflow": "blank-image", "1/width": 16, "1/height": 8, "1/color": 255}


async def test_a_plain_job_does_not_read_the_history(api, sim):
    parts = await _run(api, BLANK)
    assert len(parts) == 1 and parts[0]["data"].startswith(b"\x89PNG")
    assert sim.executed_prompts and _history_reads(sim) == []


async def test_a_missing_executed_event_falls_back_to_the_history(api, sim):
    sim.drop_events = {"executed"}
    parts = await _run(api, BLANK)
    assert len(_history_reads(sim)) >= 1
    assert len(parts) == 1 and parts[0]["data"].startswith(b"\x89PNG")


async def test_a_cached_job_gets_the_cached_file_with_or_without_its_event(api, sim):
    """A fully cached run makes no new file: the server names the old one again (0.3.64 and
    later re-send `executed` for it; older ones only list it in `execution_cached`)."""
    first = _files(await _run(api, BLANK))
    executions = len(sim.executions)
    again = _files(await _run(api, BLANK))                 # re-reported by its event
    assert len(sim.executions) == executions               # served from cache
    assert again == first and _history_reads(sim) == []
    sim.drop_events = {"executed"}                         # as an older server: no event
    older = _files(await _run(api, BLANK))
    assert older == first and len(_history_reads(sim)) >= 1


async def test_small_inputs_go_in_one_request_on_the_kept_alive_connection(api, sim, bridge, monkeypatch):
    """A small input is read whole and sent by libcurl (kept-alive); only a file over
    SMALL_UPLOAD is streamed from disk by tornado's own client (a new connection). Both arrive
    byte for byte."""
    small, large = png_bytes(16, 12, seed=3), png_bytes(64, 64, seed=4)
    monkeypatch.setattr(files, "SMALL_UPLOAD", len(small))
    streaming = bridge.service.backends[0].http._stream_http
    streamed = []
    original = streaming.fetch

    def spy(request, **kwargs):
        streamed.append(request.url)
        return original(request, **kwargs)
    monkeypatch.setattr(streaming, "fetch", spy)

    for data, expect_streamed in ((small, 0), (large, 1)):
        saved = await api.upload(data)
        await _run(api, {"workflow": "invert", "1/image": saved})
        assert len(streamed) == expect_streamed, streamed
        received = [p.read_bytes() for p in (Path(sim.folders.input) / files.UPLOAD_SUBFOLDER).iterdir()]
        assert data in received


async def test_prompt_id_is_on_disk_before_the_backend_hears_of_it_and_its_write_overlaps_the_upload(
        api, sim, bridge, monkeypatch):
    """A restart must find the prompt rather than run the job twice, so POST /prompt waits for
    the commit of the prompt id; the input's upload does not (it goes on meanwhile)."""
    store = bridge.bridge.store
    release = threading.Event()
    commit = store._commit

    def held(batch, count, *rest):
        if any(record and record.get("prompt_id") for record in batch.values()):
            release.wait(TIMEOUT)
        commit(batch, count, *rest)
    monkeypatch.setattr(store, "_commit", held)

    def calls(path: str) -> int:
        return sum(1 for method, uri, _ in sim.requests_log if method == "POST" and uri.endswith(path))

    saved = await api.upload(png_bytes(seed=5))
    client_id = new_client_id()
    ws = await api.ws(client_id)
    # Queued and dispatched at once: its `queued` answer waits for the same commit.
    generating = asyncio.ensure_future(api.generate(client_id, {"workflow": "invert", "1/image": saved}))
    try:
        await wait_for(lambda: calls("/upload/image") == 1, TIMEOUT, what="the upload, while the commit waits")
        assert calls("/prompt") == 0
    finally:
        release.set()
    await generating
    assert (await ws.until("closed", "error"))["status"] == "closed"
    assert calls("/prompt") == 1


async def test_a_job_queued_and_dispatched_at_once_costs_one_commit_before_its_prompt(
        api, sim, bridge, monkeypatch):
    """The prompt id is chosen at dispatch and the writer waits one loop pass, so the `queued`
    record and the dispatched one (with the prompt id) go to disk together."""
    store = bridge.bridge.store
    commits = []   # (prompts the backend had been sent, states written) per commit
    commit = store._commit

    def spy(batch, count, *rest):
        commit(batch, count, *rest)
        prompts = sum(1 for method, uri, _ in sim.requests_log if method == "POST" and uri.endswith("/prompt"))
        commits.append((prompts, [(r["state"], bool(r["prompt_id"])) for r in batch.values() if r]))
    monkeypatch.setattr(store, "_commit", spy)
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await api.generate(client_id, {"workflow": "blank-image", "1/width": 8, "1/height": 8})
    assert (await ws.until("closed", "error"))["status"] == "closed"
    before_prompt = [states for prompts, states in commits if prompts == 0]
    assert before_prompt == [[("running", True)]], commits


async def test_the_prompt_ids_commit_does_not_wait_for_the_upload(api, sim, bridge, monkeypatch):
    store = bridge.bridge.store
    committed = []
    commit = store._commit

    def spy(batch, count, *rest):
        commit(batch, count, *rest)
        committed.extend(r["prompt_id"] for r in batch.values() if r and r.get("prompt_id"))
    monkeypatch.setattr(store, "_commit", spy)
    saved = await api.upload(png_bytes(seed=6))
    sim.stall_next("upload", seconds=TIMEOUT)
    client_id = new_client_id()
    ws = await api.ws(client_id)
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    try:
        await wait_for(lambda: sim.stalling == 1, TIMEOUT, what="the upload under way")
        await wait_for(lambda: committed, TIMEOUT, what="the prompt id's commit during the upload")
        assert sim.stalling == 1
    finally:
        sim.release_stalls()
    assert (await ws.until("closed", "error"))["status"] == "closed"


@pytest.mark.parametrize("limit", [None, 40], ids=["in-memory", "streamed"])
async def test_a_small_result_touches_the_disk_only_off_the_loop(api, sim, monkeypatch, limit):
    """A result up to SMALL_DOWNLOAD is held in memory and written by one executor call; past
    that it is written as it arrives (its file opened on the loop). Both byte for byte."""
    if limit is not None:
        monkeypatch.setattr(files, "SMALL_DOWNLOAD", limit)
    opened_on_loop = []

    def spy(path, *args, **kwargs):
        opened_on_loop.append(threading.current_thread() is threading.main_thread())
        return open(path, *args, **kwargs)
    monkeypatch.setattr(files, "open", spy, raising=False)
    parts = await _run(api, {"workflow": "blank-image", "1/width": 32, "1/height": 32, "1/color": 0x123456})
    made = [p.read_bytes() for p in Path(sim.folders.output).rglob("*.png")]
    assert len(parts) == 1 and [parts[0]["data"]] == made
    assert len(made[0]) > 40
    assert opened_on_loop == ([False] if limit is None else [True])


def _history_deletes(sim) -> list[list[str]]:
    return [body["delete"] for method, uri, body in sim.requests_log
            if method == "POST" and uri.removeprefix("/api") == "/history" and isinstance(body, dict)]


async def test_history_entries_of_stored_results_are_deleted_in_one_call(api, sim, bridge, monkeypatch):
    monkeypatch.setattr(comfy_api, "FORGET_AFTER", 3600.0)   # nothing goes on its own in this test
    for color in (1, 2, 3):
        await _run(api, {**BLANK, "1/color": color})
    assert _history_deletes(sim) == []
    bridge.service.cleanup.flush()
    await wait_for(lambda: _history_deletes(sim), TIMEOUT, what="the deletion")
    assert _history_deletes(sim) == [sim.executed_prompts[-3:]]


async def test_history_entries_are_deleted_soon_after_the_job(api, sim):
    await _run(api, BLANK)
    await wait_for(lambda: _history_deletes(sim), TIMEOUT, what="the deletion")
    assert _history_deletes(sim) == [sim.executed_prompts[-1:]]
