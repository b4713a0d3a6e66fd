"""File inputs by URL (fetched by the bridge) or inline (`data:` URLs), end to end through the
simulator, with their limits and the SSRF guard."""
from __future__ import annotations

import asyncio
import base64
import io

import pytest
import ujson
from PIL import Image
from tornado import httpserver, web
from tornado.testing import bind_unused_port

from balancer.errors import Refused
from balancer.remote_inputs import RemoteInputs
from storage.uploads import UploadStore
from handlers.generate import WAIT_GONE
from tests.conftest import new_client_id, png_bytes, wait_for

IMAGE = png_bytes(seed=11)
MB = 1024 * 1024


class Files(web.RequestHandler):
    """What the in-process file server answers, by path; `served` counts the fetches."""
    content = {"/image.png": IMAGE, "/text.txt": b"just some text, not a picture\n" * 10,
               "/big.png": IMAGE + b"\0" * (MB + 10)}

    async def get(self, path):
        self.application.settings["served"].append(path)
        if path == "/held.png":  # answered once the test releases it
            await self.application.settings["release"].wait()
            return self.finish(IMAGE)
        if path == "/moved":
            return self.redirect("/image.png")
        if path == "/away":
            return self.redirect("http://localhost:1/image.png")
        if path == "/chunked-big":
            for _ in range(20):
                self.write(b"\x89PNG" + b"\0" * 100_000)
                self.flush()
            return
        if path not in self.content:
            raise web.HTTPError(404)
        self.finish(self.content[path])


@pytest.fixture
async def files():
    sock, port = bind_unused_port()
    served = []
    release = asyncio.Event()
    server = httpserver.HTTPServer(web.Application([(r"(/.*)", Files)], served=served, release=release))
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}", port, served, release
    release.set()
    server.stop()
    await server.close_all_connections()


@pytest.fixture
async def allowed(sim, bridge_factory, files):
    """A bridge whose INPUT_URL_ALLOWED_HOSTS lets it reach the file server."""
    base, port, _, _ = files
    bridge = await bridge_factory([sim], input_url_allowed_hosts=f"127.0.0.1:{port}", upload_max_size=1)
    client = bridge.api()
    yield bridge, client
    client.close()


async def run_waiting(api, value) -> tuple[int, object]:
    client_id = new_client_id()
    answer = await api.fetch(f"/generate-based-workflow?clientId={client_id}&wait=10", "POST",
                             {"workflow": "invert", "1/image": value})
    if answer.code == 200:
        return answer.code, answer.body
    return answer.code, ujson.loads(answer.body)["detail"]


async def result_of_upload(api) -> bytes:
    saved = await api.upload(IMAGE)
    code, body = await run_waiting(api, saved)
    assert code == 200
    return result_bytes(body)


def result_bytes(body: bytes) -> bytes:
    """The pixels of the one result (its PNG text chunks name the input file, which differs)."""
    data = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    return Image.open(io.BytesIO(data)).tobytes()


async def test_an_input_by_url_runs_like_the_uploaded_file_and_is_stored_once(allowed, files):
    bridge, api = allowed
    base, _, served, _ = files
    expected = await result_of_upload(api)
    for _ in range(2):
        code, body = await run_waiting(api, f"{base}/image.png")
        assert code == 200, body
        assert result_bytes(body) == expected
    assert served.count("/image.png") == 2
    # Same URL, same content: one stored file.
    fetched = [n for n, _, _ in bridge.bridge.uploads.list()]
    assert len(fetched) == 2, fetched   # the upload above and the fetched file
    # A redirect is followed (and checked): same content, another URL, another name.
    code, body = await run_waiting(api, f"{base}/moved")
    assert code == 200 and result_bytes(body) == expected
    assert len(bridge.bridge.uploads.list()) == 3


async def test_an_inline_data_input_runs_like_the_uploaded_file(api, bridge):
    expected = await result_of_upload(api)
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    for _ in range(2):
        code, body = await run_waiting(api, url)
        assert code == 200, body
        assert result_bytes(body) == expected
    assert len(bridge.bridge.uploads.list()) == 2  # the upload and the inline file, once


async def test_url_inputs_over_the_limit_of_a_wrong_type_or_unreachable_are_400s(allowed, files):
    _, api = allowed
    base, port, _, _ = files
    cases = {
        f"{base}/big.png": "over the limit of 1 MB (UPLOAD_MAX_SIZE)",      # by its Content-Length
        f"{base}/chunked-big": "over the limit of 1 MB (UPLOAD_MAX_SIZE)",  # counted as it comes
        f"{base}/text.txt": "unsupported type; accepted: png",
        f"{base}/missing.png": "it answered HTTP 404",
        f"{base}/away": "host 'localhost' is not an allowed host",          # a redirect, checked
    }
    for url, reason in cases.items():
        code, detail = await run_waiting(api, url)
        assert code == 400 and detail.startswith("input '1/image': ") and reason in detail, (url, detail)
    bridge, _ = allowed
    assert list(bridge.bridge.uploads.incoming.iterdir()) == []  # nothing left behind


async def test_unreachable_url_is_a_400(sim, bridge_factory):
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there
    bridge = await bridge_factory([sim], input_url_allowed_hosts="127.0.0.1:*")
    api = bridge.api()
    code, detail = await run_waiting(api, f"http://127.0.0.1:{port}/image.png")
    assert code == 400 and detail.startswith("input '1/image': cannot fetch from host '127.0.0.1'"), detail
    api.close()


async def test_by_default_loopback_hosts_are_refused(api, files):
    base, _, served, _ = files
    code, detail = await run_waiting(api, f"{base}/image.png")
    assert code == 400 and detail.startswith("input '1/image': host '127.0.0.1' is refused"), detail
    assert "loopback" in detail and served == []


async def test_inline_data_of_a_wrong_type_or_malformed_is_a_400(api):
    cases = {
        "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode(): "unsupported file type",
        "data:image/png;base64,%%%": "not valid base64",
        "data:image/png," + "abc": "must be data:<type>;base64,<data>",
    }
    for url, reason in cases.items():
        code, detail = await run_waiting(api, url)
        assert code == 400 and detail.startswith("input '1/image': ") and reason in detail, (url, detail)


async def test_inline_data_over_the_upload_limit_is_refused(tmp_path):
    # UPLOAD_MAX_SIZE is whole MB and the generate body at most 1 MB: the bound is checked here.
    uploads = UploadStore(tmp_path / "uploads", 1000)
    inputs = RemoteInputs(catalog=None, uploads=uploads, allowed_hosts=(), max_bytes=1000, max_size_mb=1)
    small = IMAGE[:900] if len(IMAGE) > 900 else IMAGE
    with pytest.raises(Refused, match="over the limit"):
        await inputs._decode("data:image/png;base64," + base64.b64encode(small + b"\0" * 2000).decode(), "input 'x'")
    name = await inputs._decode("data:;base64," + base64.b64encode(small).decode(), "input 'x'")
    assert uploads.exists(name)
    inputs.close()


async def test_the_fetch_itself_connects_to_public_addresses_only(api, files, monkeypatch):
    # As if DNS had answered the guard with a public address and the fetch with a loopback one.
    async def fooled(url, field, allowed_hosts):
        return None
    monkeypatch.setattr("balancer.remote_inputs.check_url", fooled)
    base, _, served, _ = files
    code, detail = await run_waiting(api, f"{base}/image.png")
    assert code == 400 and "cannot fetch from host '127.0.0.1'" in detail and "is refused (127.0.0.1 is a loopback address)" in detail, detail
    assert served == []


async def test_new_content_at_the_same_url_is_a_new_file(allowed, files, monkeypatch):
    bridge, api = allowed
    base, _, _, _ = files
    names = []
    for seed in (1, 2, 2):
        monkeypatch.setitem(Files.content, "/changing.png", png_bytes(seed=seed))
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "invert", "1/image": f"{base}/changing.png"})
        names.append(bridge.service.get(client_id).files["1/image"].name)
        await api.wait_status(client_id, "closed")
    assert names[0] != names[1] and names[1] == names[2], names
    assert sorted(n for n, _, _ in bridge.bridge.uploads.list()) == sorted(set(names))


async def test_a_client_leaving_while_its_input_is_fetched_cancels_the_job(allowed, files):
    bridge, api = allowed
    base, _, served, release = files
    client_id = new_client_id()
    body = ujson.dumps({"workflow": "invert", "1/image": f"{base}/held.png"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(f"POST /generate-based-workflow?clientId={client_id}&wait=60 HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await wait_for(lambda: "/held.png" in served, what="the fetch to begin")
    writer.close()
    assert bridge.service.get(client_id) is None  # nothing queued while its input is fetched
    release.set()
    info = await api.wait_status(client_id, "error")
    assert info["detail"] == WAIT_GONE


def test_the_allowed_hosts_setting_is_checked_at_start():
    from settings import SettingsError, load_settings
    assert load_settings({"INPUT_URL_ALLOWED_HOSTS": " Images.Example.com, 10.0.0.5:8080 "}, env={},
                         dotenv_path=None, check_paths=False).input_url_allowed_hosts == (
        "images.example.com", "10.0.0.5:8080")
    with pytest.raises(SettingsError, match="INPUT_URL_ALLOWED_HOSTS"):
        load_settings({"INPUT_URL_ALLOWED_HOSTS": "https://images.example.com/"}, env={}, dotenv_path=None,
                      check_paths=False)


async def test_a_busy_client_id_is_refused_before_its_url_input_is_fetched(allowed, files):
    _, api = allowed
    base, _, served, _ = files
    saved = await api.upload(png_bytes())
    busy = new_client_id()
    await api.generate(busy, {"workflow": "slow-progress", "1/image": saved, "2/steps": 30})
    answer = await api.generate(busy, {"workflow": "invert", "1/image": f"{base}/image.png"}, expect=400)
    assert "already has a job" in str(answer)
    assert served == []   # the refusal did not wait for, nor cost, a fetch
    await api.json(f"/interrupt?clientId={busy}", "POST")


async def test_a_refused_webhook_is_refused_before_the_url_input_is_fetched(allowed, files):
    _, api = allowed
    base, _, served, _ = files
    answer = await api.generate(new_client_id(), {"workflow": "invert", "1/image": f"{base}/image.png",
                                                  "webhook": "ftp://hooks.example.com/x"}, expect=400)
    assert "webhook" in str(answer)
    assert served == []   # the refusal did not wait for, nor cost, a fetch
