"""Hostile input: fuzzing every way in (JSON bodies, query strings, multipart bodies, websocket
frames), the limits on what a client controls, path traversal wherever a name enters, and
clients that are slow on purpose.

Every fuzzed answer is below 500, is JSON `{"detail"}` when it is a 4xx, and carries no Python
exception text. Around the fuzzing (the `arena` fixture): a well-behaved client runs jobs the
whole time and each of them must finish with the right image; no file may appear outside
DATA_DIR; no traceback may reach the log; the bridge runs a normal job at the end.

Hypothesis runs derandomized and without an example database, so every run is the same.
"""
import asyncio
import base64
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import quote, quote_from_bytes, urlsplit

import pytest
import ujson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from tornado import httpclient, web, websocket
from tornado.httputil import parse_qs_bytes

from tests.conftest import ROOT, TIMEOUT, multipart, new_client_id, png_bytes, wait_for

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])

PYTHON_TEXT = re.compile(r"Traceback|File \"|\b[A-Z][a-z]+(?:[A-Z][a-z]*)*(?:Error|Exception)\b"
                         r"|b'\\x|b\"\\x| object at 0x")
SAVED_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpg|webp|gif|bmp|tiff|mp4|webm|mov|mkv|wav|mp3|flac|ogg)")
ALIASES = ["invert", "blank-image", "blur-scale", "slow-progress", "text-to-image"]
INPUT_KEYS = ["1/image", "1/width", "1/height", "1/color", "2/width", "2/height", "3/blur_radius",
              "2/steps", "3/seed", "3/steps", "6/text"]
FILE_DEFAULT = "example.png"  # the default of every file input of the example workflows
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def traversal_names(base: Path) -> list[str]:
    """Names that try to leave a folder; absolute ones point into `base` (watched by the arena)."""
    target = base / "pwned.png"
    return [
        "../../../pwned.png", "../../../../../../../../etc/passwd", "..\\..\\..\\pwned.png",
        str(target), "//" + str(target).lstrip("/"), str(target) + "\x00.png", "pwned.png\x00/../../x",
        "．．／．．／．．／pwned.png", "..／..／pwned.png", "‥/‥/pwned.png", "..\u2215..\u2215pwned.png",
        "..\u2216..\u2216pwned.png", "..%2f..%2f..%2fpwned.png", "%2e%2e/%2e%2e/%2e%2e/pwned.png",
        "..%252f..%252fpwned.png", "..%c0%af..%c0%afpwned.png", "C:\\Windows\\win.ini",
        "\\\\server\\share\\pwned.png", "file://" + str(target), "uploads/../../../pwned.png",
        "./../pwned.png", "....//....//pwned.png", "..", ".", "~/pwned.png", "pwned.png/.",
        "\u202egnp.denwp", "con", "aux.png", "..\n../pwned.png", " ../pwned.png",
    ]


# ---------------------------------------------------------------- checks

def check_answer(response, allowed: set[int] | None = None) -> None:
    """Below 500, an HTTP answer at all, JSON {"detail"} on 4xx (v2's error envelope under
    /api/v2), never Python's words."""
    assert response.code != 599, f"no HTTP answer: {response.error}"
    assert response.code < 500, (response.code, response.body[:300])
    if allowed is not None:
        assert response.code in allowed, (response.code, response.body[:300])
    ctype = response.headers.get("Content-Type", "")
    if 400 <= response.code < 500:
        assert ctype.startswith("application/json"), (response.code, ctype, response.body[:200])
        assert response.body, f"{response.code} with an empty body"
        body = ujson.loads(response.body)
        if urlsplit(response.request.url).path.startswith("/api/v2/"):   # Comfy API v2: its envelope
            assert isinstance(body, dict) and set(body) == {"error"}, body
            assert body["error"]["code"] and isinstance(body["error"]["message"], str) and body["error"]["message"], body
        else:
            assert isinstance(body, dict) and set(body) == {"detail"}, body
            assert isinstance(body["detail"], str) and body["detail"], body
        text = response.body.decode("utf-8", "replace")
        assert not PYTHON_TEXT.search(text), text
    detail = response.headers.get("X-Bridge-Detail", "")
    assert not PYTHON_TEXT.search(detail), detail


def files_outside(base: Path, data_dir: Path) -> set[str]:
    """Every path under `base` and in the repository's own folders, except inside DATA_DIR."""
    found = set()
    for top in (base, ROOT / "workflows", ROOT / "static"):
        for folder, subfolders, names in os.walk(top):  # DATA_DIR pruned: the bridge works in it meanwhile
            subfolders[:] = [d for d in subfolders if Path(folder, d) != data_dir]
            found.update(os.path.join(folder, name) for name in subfolders + names)
    return found


def inverted(png: bytes) -> bytes:
    return ImageOps.invert(Image.open(io.BytesIO(png)).convert("RGB")).tobytes()


class Bystander:
    """A well-behaved client that runs one job after another while the test misbehaves; each
    job must end `closed` with the right (inverted) image."""

    def __init__(self, running):
        self.api = running.api()
        self.image = png_bytes(20, 14, seed=9)
        self.done = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _one(self) -> None:
        client_id = new_client_id()
        saved = await self.api.upload(self.image)
        socket = await self.api.ws(client_id)
        await self.api.generate(client_id, {"workflow": "invert", "1/image": saved})
        messages = await socket.closed(timeout=30)
        assert messages and messages[-1]["status"] == "closed", messages
        parts = await self.api.history(client_id)
        assert len(parts) == 1, parts
        got = Image.open(io.BytesIO(parts[0]["data"])).convert("RGB").tobytes()
        assert got == inverted(self.image), "the bystander's result is not its inverted image"
        self.done += 1

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._one()
            except Exception as exc:  # noqa: BLE001 - reported by finish()
                self.failures.append(repr(exc))
                return

    async def finish(self, at_least: int = 1) -> None:
        await wait_for(lambda: self.done >= at_least or self.failures or self._task.done(), 30,
                       what="the bystander's jobs")
        self._stop.set()
        await asyncio.wait_for(self._task, 30)
        self.api.close()
        assert not self.failures, self.failures
        assert self.done >= at_least


class Arena:
    def __init__(self, running, data_dir: Path, base: Path):
        self.running = running
        self.data_dir = data_dir
        self.base = base
        self.api = running.api()
        self.names = traversal_names(base)
        self.saved: list[str] = []       # names the upload store issued
        self.queued: list[str] = []      # clientIds whose fuzzed request was accepted
        self.counter = 0

    def client_id(self) -> str:
        self.counter += 1
        return f"fuzz-{self.counter}-{new_client_id()[:8]}"

    async def drain(self) -> None:
        """Let every accepted fuzz job end, and collect it."""
        for client_id in self.queued:
            info = await self.api.wait_status(client_id, "closed", "error", timeout=30)
            await self.api.fetch(f"/history?clientId={client_id}")
            assert info["status"] in ("closed", "error")


@pytest.fixture
async def arena(sim, bridge_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data_dir = tmp_path / "jail" / "cell" / "data"   # ../../.. from uploads/ still lands in tmp_path
    running = await bridge_factory([sim], data_dir=data_dir)
    place = Arena(running, data_dir, tmp_path)
    place.saved.append(await place.api.upload(png_bytes(seed=3)))
    before = files_outside(tmp_path, data_dir)
    bystander = Bystander(running)
    yield place
    await bystander.finish()
    await place.drain()
    # the bridge still does its job for a newcomer
    client_id = new_client_id()
    saved = await place.api.upload(png_bytes(seed=5))
    await place.api.generate(client_id, {"workflow": "invert", "1/image": saved})
    await place.api.wait_status(client_id, "closed", timeout=30)
    assert len(await place.api.history(client_id)) == 1
    place.api.close()
    assert files_outside(tmp_path, data_dir) == before
    assert not list((data_dir / "uploads" / ".incoming").iterdir()), "a partial upload was left behind"
    for record in caplog.records:
        assert record.exc_info is None, f"traceback logged: {record.getMessage()}"
        assert "Uncaught exception" not in record.getMessage()


# ---------------------------------------------------------------- fuzzing

ODD_TEXT = ["\ud800", "a\udfffb", "\x00", "example.png", "%s%n{0}", "a" * 2000, "\u202e", "\r\nX: y"]


def json_leaves(names: list[str]):
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(2**70), max_value=8), st.integers(min_value=16385, max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40), st.sampled_from(names), st.sampled_from(ODD_TEXT),
    )


def json_values(names: list[str]):
    return st.recursive(json_leaves(names), lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=8)


def request_bodies(names: list[str]):
    keys = st.one_of(st.sampled_from(INPUT_KEYS), st.text(max_size=12), st.sampled_from(names),
                     st.sampled_from(ODD_TEXT))
    rest = st.dictionaries(keys, json_values(names), max_size=5)
    alias = st.one_of(st.sampled_from(ALIASES), st.text(max_size=12), st.sampled_from(names),
                      st.sampled_from(ODD_TEXT), json_values(names))
    requests = st.builds(lambda a, r: {"workflow": a, **r}, alias, rest)
    text = st.one_of(requests, rest, json_values(names)).map(lambda v: json.dumps(v, allow_nan=True).encode())
    return st.one_of(text, text, st.binary(max_size=200),
                     st.sampled_from([b"[" * 5000, b'{"a":' * 3000, b"1" * 5000, b'{"workflow": "invert"',
                                      b"\xef\xbb\xbf{}", b'{"workflow": "invert"}\x00', b"null", b""]))


@FUZZ
@given(data=st.data())
async def test_fuzz_json_bodies(arena, data):
    body = data.draw(request_bodies(arena.names + arena.saved), label="body")
    client_id = arena.client_id()
    response = await arena.api.fetch(f"/generate-based-workflow?clientId={client_id}", "POST", body,
                                     headers={"Content-Type": "application/json"})
    check_answer(response, {200, 400})
    if response.code == 200:
        arena.queued.append(client_id)
        sent = ujson.loads(body)
        # a file input only ever names an upload the store issued, or the workflow's default
        if "1/image" in sent:
            assert sent["1/image"] in arena.saved + [FILE_DEFAULT], sent


def endpoints(running) -> list[tuple[str, str]]:
    found = []
    for rule in running.bridge.app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        if "(" in pattern:
            continue
        for method in ("get", "post"):
            if getattr(rule.target, method) is not getattr(web.RequestHandler, method):
                found.append((method.upper(), pattern))
    return found


def query_strings(names: list[str]):
    keys = st.one_of(st.sampled_from(["clientId", "workflow", "token", "clientId"]), st.text(max_size=8))
    text_values = st.one_of(st.sampled_from(names), st.text(max_size=30),
                            st.sampled_from(["", "invert", "a" * 129, "ok-id", "..", "a\n", "%"]))
    pair = st.one_of(
        st.tuples(keys, text_values).map(lambda kv: f"{quote(kv[0], safe='')}={quote(kv[1], safe='')}"),
        st.tuples(keys, st.binary(max_size=12)).map(lambda kv: f"{quote(kv[0], safe='')}={quote_from_bytes(kv[1], safe='')}"),
        st.text(alphabet="=&;%+?#/ab", max_size=12).map(lambda t: quote(t, safe="=&;%+/")),
    )
    return st.lists(pair, max_size=4).map("&".join)


@FUZZ
@given(data=st.data())
async def test_fuzz_query_strings_on_every_endpoint(arena, data):
    routes = endpoints(arena.running) + [("GET", "/"), ("GET", "/static/index.html")]
    method, path = data.draw(st.sampled_from(routes), label="endpoint")
    if path == "/static/index.html" and data.draw(st.booleans(), label="fuzz the file name"):
        path = "/static/" + data.draw(st.one_of(
            st.sampled_from(arena.names), st.text(max_size=20)).map(lambda t: quote(t, safe="/%")), label="file")
    query = data.draw(query_strings(arena.names), label="query")
    body = data.draw(st.sampled_from([b"", b"{}", b'{"workflow":"invert"}']), label="body") if method == "POST" else None
    response = await arena.api.fetch(f"{path}?{query}", method, body)
    check_answer(response)
    if path == "/generate-based-workflow" and response.code == 200:
        # e.g. clientId=ok-id with {"workflow": "invert"}: a real job, the same id as tornado reads it
        arena.queued.append(parse_qs_bytes(query, keep_blank_values=True)["clientId"][-1].decode())


def multipart_bodies(names: list[str]):
    part = st.fixed_dictionaries({
        "name": st.one_of(st.sampled_from(["file", "image", "a"]), st.text(max_size=20), st.sampled_from(names)),
        "filename": st.one_of(st.none(), st.text(max_size=20), st.sampled_from(names)),
        "ctype": st.sampled_from(["image/png", "application/octet-stream", "text/plain", "image/svg+xml", ""]),
        "data": st.one_of(st.sampled_from([png_bytes(4, 3), GIF, b"", b"<svg onload=alert(1)>"]),
                          st.binary(max_size=300)),
        "extra": st.sampled_from(["", "Content-Transfer-Encoding: base64\r\n", "X: y\r\n", "Content-Disposition: form-data\r\n"]),
    })

    def build(parts, boundary, cut, junk):
        out = io.BytesIO()
        for p in parts:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{p["name"]}"'
            if p["filename"] is not None:
                head += f'; filename="{p["filename"]}"'
            head += "\r\n" + (f"Content-Type: {p['ctype']}\r\n" if p["ctype"] else "") + p["extra"] + "\r\n"
            out.write(head.encode("utf-8", "surrogatepass"))
            out.write(p["data"] + b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        body = out.getvalue()
        if cut is not None:
            body = body[:cut % (len(body) + 1)]
        return body + junk, f"multipart/form-data; boundary={boundary}"

    return st.builds(build, st.lists(part, min_size=0, max_size=5),
                     st.one_of(st.just("b0undary"), st.text(alphabet="abc-'()+_,./:=? ", min_size=1, max_size=72)),
                     st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
                     st.one_of(st.just(b""), st.binary(max_size=40)))


@FUZZ
@given(data=st.data())
async def test_fuzz_multipart_uploads(arena, data):
    body, ctype = data.draw(multipart_bodies(arena.names), label="body")
    ctype = data.draw(st.one_of(st.just(ctype), st.sampled_from(
        ["multipart/form-data", "multipart/form-data; boundary=", "text/plain", "multipart/mixed; boundary=b0undary",
         'multipart/form-data; boundary="unterminated', ctype + "; boundary=again"])), label="content type")
    response = await arena.api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    check_answer(response, {200, 400, 413})
    if response.code == 200:
        saved = ujson.loads(response.body)
        assert saved and isinstance(saved, dict)
        for identifier, name in saved.items():
            assert isinstance(identifier, str) and identifier.isprintable()
            assert SAVED_NAME.fullmatch(name), name
            assert (arena.data_dir / "uploads" / name).is_file()
            arena.saved.append(name)


@FUZZ
@given(data=st.data())
async def test_fuzz_websocket_frames(arena, data):
    frames = data.draw(st.lists(st.one_of(
        st.text(max_size=200).map(lambda t: ("text", t)),
        st.binary(max_size=200).map(lambda b: ("binary", b)),
        st.sampled_from([("text", "x" * 70_000), ("text", '{"status": "closed"}'), ("text", "{}"),
                         ("binary", b"\x00" * 70_000), ("ping", b"p"), ("text", '{"clientId": "other"}')])),
        max_size=6), label="frames")
    socket = await arena.api.ws(arena.client_id())
    assert (await socket.next())["status"] == "connected"
    connection = socket.connection
    for kind, payload in frames:
        try:
            if kind == "ping":
                connection.ping(payload)
            else:
                await connection.write_message(payload, binary=(kind == "binary"))
        except websocket.WebSocketClosedError:
            break  # the bridge may close a socket that sent more than 64 KiB at once
    connection.close()
    assert (await arena.api.fetch("/healthz")).code == 200


@FUZZ
@given(raw=st.binary(min_size=1, max_size=400))
async def test_fuzz_raw_bytes_after_the_websocket_handshake(arena, raw):
    reader, writer = await asyncio.open_connection("127.0.0.1", arena.running.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws?clientId={arena.client_id()} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.write(raw)
    await writer.drain()
    try:
        await asyncio.wait_for(reader.read(4096), 0.05)
    except asyncio.TimeoutError:
        pass
    writer.close()
    assert (await arena.api.fetch("/healthz")).code == 200


# ---------------------------------------------------------------- limits

async def post_generate(api, body: bytes, client_id: str | None = None):
    return await api.fetch(f"/generate-based-workflow?clientId={client_id or new_client_id()}", "POST", body,
                           headers={"Content-Type": "application/json"})


def detail(response) -> str:
    check_answer(response)
    return ujson.loads(response.body)["detail"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
@pytest.mark.parametrize("key", ["3/blur_radius", "2/width", "unused/key"])
async def test_nan_and_infinity_are_refused(api, key, value):
    response = await post_generate(api, f'{{"workflow": "blur-scale", "{key}": {value}}}'.encode())
    assert response.code == 400
    assert "finite" in detail(response)
    nested = await post_generate(api, f'{{"workflow": "invert", "x": [1, {{"y": {value}}}]}}'.encode())
    assert nested.code == 400 and "finite" in detail(nested)


@pytest.mark.parametrize("number", [str(2**64), str(-(2**63) - 1), "9" * 4000, "-" + "9" * 300])
async def test_huge_integers_are_refused(api, number):
    response = await post_generate(api, f'{{"workflow": "blank-image", "1/color": {number}}}'.encode())
    assert response.code == 400
    assert "1/color" in detail(response) and "range" in detail(response)
    assert len(detail(response)) < 300


async def test_integers_with_thousands_of_digits_are_refused(api):
    response = await post_generate(api, b'{"workflow": "blank-image", "1/color": ' + b"9" * 5000 + b"}")
    assert response.code == 400 and "JSON" in detail(response)


async def test_the_widest_comfyui_integers_pass(api, sim):
    """2**64 - 1 (a seed's maximum) passes the bridge's integer check: what refuses it here is
    the node's own maximum from the backend's /object_info, before anything is queued."""
    client_id = new_client_id()
    response = await post_generate(api, f'{{"workflow": "blank-image", "1/color": {2**64 - 1}, '
                                        f'"1/width": 4, "1/height": 4}}'.encode(), client_id)
    assert response.code == 400, response.body
    assert detail(response) == f"input '1/color': {2**64 - 1} is above its maximum 16777215"


@pytest.mark.parametrize("depth", [100, 1100, 100_000])
async def test_deep_nesting_is_refused_without_harm(api, depth):
    for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                 b'{"workflow": "invert", "1/image": ' + b"[" * depth + b"]" * depth + b"}"):
        response = await post_generate(api, body)
        assert response.code in (400, 413)
        detail(response)
    assert (await api.fetch("/healthz")).code == 200


async def test_long_strings_are_refused(api):
    from storage.catalog import MAX_STR_LEN
    response = await post_generate(api, ujson.dumps({"workflow": "text-to-image", "6/text": "a" * (MAX_STR_LEN + 1)}).encode())
    assert response.code == 400 and "too long" in detail(response)
    long_alias = await post_generate(api, ujson.dumps({"workflow": "w" * 500_000}).encode())
    assert long_alias.code == 400 and len(detail(long_alias)) < 1000  # the echo is cut short
    long_key = await post_generate(api, ujson.dumps({"workflow": "invert", "k" * 500_000: 1}).encode())
    assert long_key.code == 400 and len(detail(long_key)) < 1000


async def test_too_many_inputs_are_refused(api):
    body = {"workflow": "invert", **{f"{i}/x": i for i in range(20_000)}}
    started = time.monotonic()
    response = await post_generate(api, ujson.dumps(body).encode())
    assert response.code == 400 and "unknown input" in detail(response)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("text", ["\\ud800", "a\\udfffb", "\\udc00\\ud800"])
async def test_unpaired_surrogates_are_refused_with_a_reason(api, text):
    for body in (f'{{"workflow": "{text}"}}', f'{{"workflow": "invert", "{text}": 1}}',
                 f'{{"workflow": "text-to-image", "6/text": "{text}"}}'):
        response = await post_generate(api, body.encode())
        assert response.code == 400, (body, response.body)
        assert "surrogate" in detail(response)


async def test_an_oversized_json_body_is_refused_before_it_is_read(bridge):
    """A declared body over the limit gets 413 at once: the bridge does not wait for (or keep)
    the megabytes. A chunked one is dropped past the limit (not kept), then answered 413."""
    from handlers.base import MAX_JSON_BODY
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write((f"POST /generate-based-workflow?clientId={new_client_id()} HTTP/1.1\r\nHost: x\r\n"
                  "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()
    api = bridge.api()
    chunks = (b'{"workflow": "' + b"a" * 8192 for _ in range(3 * MAX_JSON_BODY // 8192))

    async def body_producer(write):
        for chunk in chunks:
            await write(chunk)

    response = await api.http.fetch(httpclient.HTTPRequest(
        f"{bridge.url}/generate-based-workflow?clientId={new_client_id()}", method="POST",
        body_producer=body_producer, headers={"Content-Type": "application/json"}, request_timeout=TIMEOUT),
        raise_error=False)
    assert response.code == 413 and "limit" in detail(response)
    big = await post_generate(api, b'{"workflow": "' + b"a" * (MAX_JSON_BODY + 10) + b'"}')
    assert big.code == 413 and "limit" in detail(big)
    api.close()


async def test_many_multipart_parts(api, bridge):
    from storage.multipart import MAX_PARTS
    image = png_bytes(4, 3)
    body, ctype = multipart([(f"f{i}", "x.png", image, "image/png") for i in range(MAX_PARTS)])
    saved = await api.json("/upload", "POST", body, headers={"Content-Type": ctype})
    assert len(saved) == MAX_PARTS
    body, ctype = multipart([(f"f{i}", "x.png", image, "image/png") for i in range(MAX_PARTS + 1)])
    response = await api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    assert response.code == 400 and "too many parts" in detail(response)
    body, ctype = multipart([("f", "x.png", image, "image/png")] * 2)
    response = await api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    assert response.code == 400 and "more than one" in detail(response)


async def test_an_upload_over_the_limit_is_413(sim, bridge_factory):
    running = await bridge_factory([sim], upload_max_size=1)
    api = running.api()
    body, ctype = multipart([("file", "x.png", png_bytes() + b"\x00" * (1024 * 1024), "image/png")])
    response = await api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    assert response.code == 413 and "limit" in detail(response)
    assert not list((running.bridge.settings.uploads_dir / ".incoming").iterdir())
    api.close()


# (tornado strips surrounding whitespace from query values: "abc\n" is read as "abc")
@pytest.mark.parametrize("client_id", ["a\nb", "a\r\nb", "a" * 129, "", "a b", "a/b", "ä", "a\x00b", "../x"])
async def test_client_id_format(api, bridge, client_id):
    for method, path in endpoints(bridge):
        if path in ("/healthz", "/status", "/generation-count", "/workflow-list", "/workflow-info",
                    "/upload", "/metrics", "/openapi.json", "/docs") or path.startswith("/api/v2/"):
            continue  # no clientId there (v2 names its jobs by id)
        if path == "/free" and client_id == "":
            continue  # optional there
        response = await api.fetch(f"{path}?clientId={quote(client_id, safe='')}", method,
                                   b"{}" if method == "POST" else None)
        assert response.code == 400, (path, client_id, response.code)
        assert "clientId" in detail(response)


async def test_the_queue_limit_answers_503_with_retry_after(sim, bridge_factory):
    running = await bridge_factory([sim], max_queue=1, max_inflight_per_server=1)
    api = running.api()
    first, second = new_client_id(), new_client_id()
    await api.generate(first, {"workflow": "slow-progress", "2/steps": 500})
    await api.wait_status(first, "progress")
    await api.generate(second, {"workflow": "slow-progress", "2/steps": 500})
    response = await post_generate(api, b'{"workflow": "invert"}')
    assert response.code == 503 and "queue" in ujson.loads(response.body)["detail"]
    assert int(response.headers["Retry-After"]) > 0
    for client_id in (first, second):
        await api.json(f"/interrupt?clientId={client_id}", "POST")
    api.close()


# ---------------------------------------------------------------- path traversal

async def test_upload_names_never_become_paths(arena):
    image = png_bytes(6, 5)
    for name in arena.names:
        for field, filename in ((name, "x.png"), ("file", name), (name, name)):
            body, ctype = multipart([(field, filename, image, "image/png")])
            response = await arena.api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
            check_answer(response, {200, 400})
            if response.code == 200:
                (identifier, saved), = ujson.loads(response.body).items()
                assert identifier == re.sub(r'\\([\\"])', r"\1", field)  # a quoted-string's escapes
                assert SAVED_NAME.fullmatch(saved), saved
                assert (arena.data_dir / "uploads" / saved).is_file()
            else:  # refused only for a field name that is no identifier, or a broken header line
                assert not field.isprintable() or "\n" in filename, (field, filename, response.body)
    # RFC 5987 names and percent-encoded ones too
    for header in ("filename*=UTF-8''..%2F..%2F..%2Fpwned.png", "filename*=UTF-8''%2Fetc%2Fpasswd",
                   'filename="../../../pwned.png"; filename*=UTF-8\'\'%00'):
        body = (b'--b0\r\nContent-Disposition: form-data; name="file"; ' + header.encode() +
                b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--b0--\r\n")
        response = await arena.api.fetch("/upload", "POST", body,
                                         headers={"Content-Type": "multipart/form-data; boundary=b0"})
        check_answer(response, {200})
        assert SAVED_NAME.fullmatch(ujson.loads(response.body)["file"])


async def test_file_inputs_take_only_issued_names_or_the_default(arena):
    saved = arena.saved[0]
    stem = saved.split(".")[0]
    uploads = arena.data_dir / "uploads"
    disguised = [
        f"../uploads/{saved}", f"./{saved}", f"{saved}/../{saved}", f"{saved}\x00", f"{saved}\x00.png",
        f" {saved}", f"{saved} ", f"{saved}\n", saved.upper(), str(uploads / saved), f"uploads/{saved}",
        f"{stem}.PNG", f"{stem}.png.png", f".incoming/{saved}.part", f"..\\uploads\\{saved}",
        f"../../workflows/{FILE_DEFAULT}", f"./{FILE_DEFAULT}", f"/{FILE_DEFAULT}", str(ROOT / "workflows" / FILE_DEFAULT),
        "aliases.json", "invert.json", "README.md", f"{FILE_DEFAULT}\x00", f"{FILE_DEFAULT}/.", "",
        *arena.names,
    ]
    for value in disguised:
        for alias in ("invert", "blur-scale"):
            response = await post_generate(arena.api, ujson.dumps({"workflow": alias, "1/image": value}).encode())
            assert response.code == 400, (alias, value, response.body)
            assert "1/image" in detail(response)
    for value in (saved, FILE_DEFAULT):
        client_id = arena.client_id()
        response = await post_generate(arena.api, ujson.dumps({"workflow": "invert", "1/image": value}).encode(),
                                       client_id)
        assert response.code == 200, (value, response.body)
        arena.queued.append(client_id)


async def test_client_ids_never_become_paths(arena):
    for name in [n for n in arena.names if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", n)]:
        for method, path in (("GET", "/execution-info"), ("GET", "/history"), ("POST", "/interrupt"),
                             ("POST", "/free"), ("POST", "/generate-based-workflow")):
            response = await arena.api.fetch(f"{path}?clientId={quote(name, safe='')}", method,
                                             b'{"workflow": "invert"}' if method == "POST" else None)
            assert response.code == 400, (path, name, response.code)
            assert "clientId" in detail(response)
        with pytest.raises(httpclient.HTTPClientError) as refused:
            await arena.api.ws(quote(name, safe=""))
        assert refused.value.code == 400
    # dots alone are a valid clientId (the contract's alphabet); they name a job, never a path
    for client_id in ("..", ".", "...", "-..-"):
        await arena.api.generate(client_id, {"workflow": "invert", "1/image": arena.saved[0]})
        await arena.api.wait_status(client_id, "closed", timeout=30)
        assert len(await arena.api.history(client_id)) == 1


async def test_workflow_aliases_never_read_outside_the_workflow_dir(sim, bridge_factory, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.json"
    graph = json.loads((ROOT / "workflows" / "invert.json").read_text())
    graph["1"]["_meta"] = {"title": "TOPSECRET-TITLE"}
    secret.write_text(json.dumps(graph))
    wdir = tmp_path / "wf"
    (wdir / "sub").mkdir(parents=True)
    (wdir / "invert.json").write_text((ROOT / "workflows" / "invert.json").read_text())
    (wdir / "example.png").write_bytes((ROOT / "workflows" / "example.png").read_bytes())
    (wdir / "link.json").symlink_to(secret)
    (wdir / "sub" / "link-dir").symlink_to(outside, target_is_directory=True)
    bad = {"rel": "../outside/secret.json", "abs": str(secret), "link": "link.json",
           "dots": "sub/../../outside/secret.json", "win": "..\\outside\\secret.json",
           "via-dir": "sub/link-dir/secret.json", "nul": "invert.json\u0000../outside/secret.json",
           "home": "~/secret.json"}
    aliases = {"invert": {"file": "invert.json", "inputs": ["1/image"]},
               **{k: {"file": v, "inputs": ["1/image"]} for k, v in bad.items()}}
    (wdir / "aliases.json").write_text(json.dumps(aliases))
    running = await bridge_factory([sim], workflow_dir=wdir, workflow_alias=wdir / "aliases.json")
    api = running.api()
    assert await api.json("/workflow-list") == ["invert"]
    for alias in [*bad, *bad.values(), "../outside/secret", str(secret), "invert.json", "aliases.json"]:
        info = await api.fetch(f"/workflow-info?workflow={quote(alias, safe='')}")
        assert info.code == 400, alias
        assert "TOPSECRET" not in detail(info)
        assert str(outside) not in detail(info) or str(outside) in alias  # only its own words echoed
        queued = await post_generate(api, ujson.dumps({"workflow": alias, "1/image": "example.png"}).encode())
        assert queued.code == 400, alias
        assert "TOPSECRET" not in detail(queued)
    api.close()


# ---------------------------------------------------------------- slow clients

SLOW = 0.5  # HEADER_TIMEOUT and BODY_TIMEOUT for these tests


async def closed_within(reader, seconds: float) -> float:
    """Seconds until the bridge closes the connection (whatever it sent before that)."""
    started = time.monotonic()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), seconds)
        if not chunk:
            return time.monotonic() - started


@pytest.fixture
async def impatient(sim, bridge_factory):
    return await bridge_factory([sim], header_timeout=SLOW, body_timeout=SLOW)


async def test_slow_headers_are_cut_off(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def trickle():  # one header byte at a time, never the blank line
        for _ in range(100):
            writer.write(b"X")
            await asyncio.sleep(0.05)

    async def guarded():
        try:
            await trickle()
        except OSError:
            pass  # the bridge hung up: what this test waits for

    dribbler = asyncio.ensure_future(guarded())
    assert await closed_within(reader, SLOW + 3) < SLOW + 2
    dribbler.cancel()
    writer.close()


async def test_an_idle_connection_is_closed(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    assert await closed_within(reader, SLOW + 3) < SLOW + 2
    writer.close()
    # keep-alive: after a complete request, waiting for the next one is bounded too
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200")
    assert await closed_within(reader, SLOW + 3) < SLOW + 2
    writer.close()


async def test_a_stalled_json_body_is_cut_off(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write((f"POST /generate-based-workflow?clientId={new_client_id()} HTTP/1.1\r\nHost: x\r\n"
                  "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"workflow\"").encode())
    assert await closed_within(reader, SLOW + 3) < SLOW + 2
    writer.close()


async def test_a_stalled_upload_is_cut_off_and_leaves_nothing(impatient):
    incoming = impatient.bridge.settings.uploads_dir / ".incoming"
    image = png_bytes(200, 150)
    body, ctype = multipart([("file", "x.png", image + os.urandom(20_000), "image/png")])
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write((f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:12_000])
    await wait_for(lambda: list(incoming.iterdir()), what="the upload's temporary file")
    # meanwhile the bridge serves others
    api = impatient.api()
    assert (await api.fetch("/healthz")).code == 200
    assert await closed_within(reader, SLOW + 3) < SLOW + 2
    writer.close()
    await wait_for(lambda: not list(incoming.iterdir()), what="the partial upload removed")
    assert not [p for p in impatient.bridge.settings.uploads_dir.iterdir() if p.is_file()]
    api.close()


async def test_a_junk_sending_websocket_does_not_harm_its_job(api):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    socket = await api.ws(client_id)
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    for message in ('{"status": "closed"}', "interrupt", '{"clientId": "someone-else"}', "\x00" * 1000):
        await socket.connection.write_message(message)
    await socket.connection.write_message(os.urandom(1000), binary=True)
    statuses = [m["status"] for m in await socket.closed()]
    assert statuses[-1] == "closed", statuses
    assert len(await api.history(client_id)) == 1
