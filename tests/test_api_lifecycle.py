"""Life-cycle details: live workflow edits, files put on backends once, broken downloads."""
import json
import shutil

import pytest
from tornado.simple_httpclient import HTTPStreamClosedError
from tornado.tcpclient import TCPClient

from tests.conftest import ROOT, new_client_id, png_bytes, wait_for


async def test_workflow_edits_take_effect_without_restart(tmp_path, sim, bridge_factory):
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", folder)
    bridge = await bridge_factory([sim], workflow_dir=str(folder), workflow_alias=str(folder / "aliases.json"))
    api = bridge.api()
    assert "copy" not in await api.json("/workflow-list")
    aliases = json.loads((folder / "aliases.json").read_text())
    aliases["copy"] = {"file": "blank.json", "inputs": ["1/width"]}
    (folder / "aliases.json").write_text(json.dumps(aliases))

    async def listed():
        return "copy" in await api.json("/workflow-list")
    await wait_for(listed, timeout=5, interval=0.1, what="new alias to appear")
    info = await api.json("/workflow-info?workflow=copy")
    assert list(info) == ["1/width"]
    api.close()


async def test_input_file_is_put_on_a_backend_once(api, sim):
    saved = await api.upload(png_bytes())
    for _ in range(2):
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "invert", "1/image": saved})
        await api.wait_status(client_id, "closed")
        await api.history(client_id)
    uploads = [path for method, path, _ in sim.requests_log if path.endswith("/upload/image")]
    assert len(uploads) == 1


async def test_broken_history_download_keeps_results(api, bridge):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await api.wait_status(client_id, "closed")
    job = bridge.service.get(client_id)
    # Make the result large enough that the send cannot finish before the client hangs up.
    big = job.results[0].path
    big.write_bytes(b"\0" * (64 * 1024 * 1024))
    from dataclasses import replace
    job.results[0] = replace(job.results[0], size=big.stat().st_size)
    stream = await TCPClient().connect("127.0.0.1", bridge.port)
    await stream.write(f"GET /history?clientId={client_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await stream.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await stream.read_bytes(1024)
    stream.close()
    await wait_for(lambda: bridge.service.counters["history_broken"] == 1, what="the server to see the hang-up")
    # The job and its files are still there; a second, complete download gets them and ends the job.
    assert bridge.service.get(client_id) is job and big.exists()
    response = await api.fetch(f"/history?clientId={client_id}", timeout=60)
    assert response.code == 200 and len(response.body) > 64 * 1024 * 1024
    await wait_for(lambda: bridge.service.get(client_id) is None, what="job forgotten after full send")


async def test_a_result_file_shortened_on_disk_breaks_the_download_and_keeps_the_job(api, bridge):
    """The multipart is read by the stored sizes: a file that lost bytes ends the response
    early (the client sees it incomplete, never a wrong file), and the job stays."""
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "blank-image", "1/width": 40, "1/height": 30})
    await api.wait_status(client_id, "closed")
    job = bridge.service.get(client_id)
    bridge.bridge.results.release(job.results)   # as after a restart: only the disk holds it
    path = job.results[0].path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HTTPStreamClosedError):   # closed before Content-Length bytes came
        await api.fetch(f"/history?clientId={client_id}")
    assert bridge.service.get(client_id) is job


async def test_a_just_downloaded_small_result_is_sent_from_memory(api, bridge, monkeypatch):
    """GET /history usually comes right after `closed`: the small file it sends is still in
    memory (storage.results.RECENT_BYTES), so the answer needs no disk read."""
    import handlers.history
    opened = []
    monkeypatch.setattr(handlers.history, "open", lambda *a, **k: opened.append(a) or open(*a, **k), raising=False)
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "blank-image", "1/width": 40, "1/height": 30})
    await api.wait_status(client_id, "closed")
    path = bridge.service.get(client_id).results[0].path
    on_disk = path.read_bytes()
    parts = await api.history(client_id)
    assert [p["data"] for p in parts] == [on_disk] and opened == []
    await wait_for(lambda: bridge.service.get(client_id) is None, what="job forgotten after the send")
    assert bridge.bridge.results.recent(path) is None   # the memory copy went with the job
