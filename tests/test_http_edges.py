"""The bridge's HTTP edges (issue 13): an early answer to a request with a body reaches the
client and leaves it a usable connection; BODY_TIMEOUT limits silence, not the whole body;
absurd header blocks get a 431; a port in use or a data folder another bridge holds stops
start-up with one line.

Every client here has a timeout; blocking clients (http.client) run in a thread."""
import asyncio
import http.client
import io
import os
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import ujson

from tests.conftest import ROOT, TIMEOUT, multipart, new_client_id, png_bytes, wait_for

KEY = "edge-k3y"
MB = 1024 * 1024
BIG = 20 * MB
LIMIT_MB = 25


def json_detail(status: int, headers, body: bytes) -> str:
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body[:200])
    data = ujson.loads(body)
    assert set(data) == {"detail"} and data["detail"], data
    return data["detail"]


class PoolingClient:
    """aiohttp with a connection pool, counting the connections it opens."""

    def __init__(self, base: str):
        self.base = base
        self.opened = 0
        trace = aiohttp.TraceConfig()

        async def on_create(session, context, params):
            self.opened += 1
        trace.on_connection_create_end.append(on_create)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                                             trace_configs=[trace])

    async def request(self, method: str, path: str, data=None, **kwargs):
        if isinstance(data, bytes) and len(data) > 1024 * 1024:
            data = io.BytesIO(data)  # aiohttp warns that raw bytes this large would block its loop
        async with self.session.request(method, self.base + path, data=data, **kwargs) as response:
            return response.status, response.headers, await response.read()

    async def close(self):
        await self.session.close()


@pytest.fixture
async def keyed(sim, bridge_factory):
    """A bridge with an API key and a 25 MB upload limit."""
    return await bridge_factory([sim], bridge_api_key=KEY, upload_max_size=LIMIT_MB)


@pytest.fixture
async def pooling(keyed):
    client = PoolingClient(keyed.url)
    yield client
    await client.close()


AUTH = {"Authorization": f"Bearer {KEY}"}


def small_upload() -> tuple[bytes, str]:
    body, ctype = multipart([("file", "in.png", png_bytes(4, 3), "image/png")])
    return body, ctype


def text_upload(size: int) -> tuple[bytes, str]:
    return multipart([("file", "notes.txt", b"plain text, not an image\n" * (size // 25), "text/plain")])


def over_the_limit() -> tuple[bytes, str]:
    """Declared over UPLOAD_MAX_SIZE (and the 1 MB the limit allows for the framing)."""
    return multipart([("file", "big.png", png_bytes() + b"\x00" * (LIMIT_MB + 15) * MB, "image/png")])


def past_the_limit() -> tuple[bytes, str]:
    """Declared within the limit's allowance, but half a MB of content over UPLOAD_MAX_SIZE."""
    return multipart([("file", "big.png", png_bytes() + b"\x00" * (LIMIT_MB * MB + MB // 2), "image/png")])


# (name, request headers, body, content type, status, whether the connection is kept)
EARLY_ANSWERS = [
    ("401-small-upload", {}, small_upload, 401, True),
    ("401-huge-upload", {}, lambda: text_upload(BIG), 401, False),
    ("400-part-type-small", AUTH, lambda: text_upload(8000), 400, True),
    ("400-part-type-huge", AUTH, lambda: text_upload(BIG), 400, False),
    ("400-not-multipart-small", AUTH, lambda: (b"x" * 500, "text/plain"), 400, True),
    ("400-not-multipart-huge", AUTH, lambda: (b"x" * BIG, "text/plain"), 400, False),
    ("413-declared", AUTH, lambda: text_upload(BIG), None, False),
    # refused by the receiver at the limit, half a MB before the end: aiohttp stops sending
    # when the answer comes first and drops the connection itself (kept: either)
    ("413-past-the-limit", AUTH, lambda: past_the_limit(), 413, None),
]


@pytest.mark.parametrize("name,headers,make,status,kept", EARLY_ANSWERS, ids=[e[0] for e in EARLY_ANSWERS])
async def test_an_early_answer_reaches_a_pooling_client(pooling, name, headers, make, status, kept):
    """aiohttp reads the 4xx and its JSON body, and its next request on the same session works:
    on the same connection when the rest of the body was small enough to read and drop, on a
    new one (announced by `Connection: close`) when it was not."""
    body, ctype = make()
    if status is None:  # 413-declared: refused from Content-Length, and not a part type
        status = 413
        body, ctype = over_the_limit()
    code, answer_headers, answer = await pooling.request("POST", "/upload", data=body,
                                                         headers={**headers, "Content-Type": ctype})
    assert code == status, (code, answer[:300])
    json_detail(code, answer_headers, answer)
    opened = pooling.opened
    code, _, answer = await pooling.request("GET", "/workflow-list", headers=AUTH)
    assert code == 200, answer
    if kept is None:
        assert "close" not in answer_headers.get("Connection", "").lower()
    elif kept:
        assert "close" not in answer_headers.get("Connection", "").lower()
        assert pooling.opened == opened, "the connection was not kept after a small rest was drained"
    else:
        assert answer_headers.get("Connection", "").lower() == "close"
        assert pooling.opened == opened + 1


async def test_an_early_answer_without_a_body_keeps_the_connection(pooling):
    """A 401 written before tornado has finished with the request (the JSON handlers take their
    body themselves) does not close the connection under the client."""
    for method, path, body in (("GET", "/status", None), ("POST", f"/interrupt?clientId={new_client_id()}", b""),
                               ("POST", f"/generate-based-workflow?clientId={new_client_id()}",
                                b'{"workflow": "invert"}')):
        code, headers, answer = await pooling.request(method, path, data=body)
        assert code == 401, (path, code)
        json_detail(code, headers, answer)
        assert "close" not in headers.get("Connection", "").lower(), path
    code, _, _ = await pooling.request("GET", "/workflow-list", headers=AUTH)
    assert code == 200
    assert pooling.opened == 1


@pytest.mark.parametrize("framing", ["chunked", "expect-100-continue"])
async def test_an_early_answer_to_a_body_of_unknown_extent_closes(keyed, framing):
    """Chunked (length unknown), or a client waiting for `100 Continue` before it sends: the
    401 comes alone (no `100 Continue` before it), with `Connection: close`, and the bridge
    closes once the client has stopped sending."""
    reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
    head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
    if framing == "chunked":
        writer.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"6\r\n--b0\r\n\r\n")
    else:
        writer.write((head + "Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"}"), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"\r\nConnection: close\r\n" in answer and b"API key" in answer
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


def send_all_then_read(port: int, body: bytes, headers: dict) -> tuple[int, dict, bytes, bool]:
    """What `requests`/`urllib` do: the whole body is sent before the answer is read. Then a
    second request on the same client: True when it went over the same connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/upload", body=body, headers=headers)
        response = conn.getresponse()
        answer = (response.status, dict(response.getheaders()), response.read())
        first = conn.sock
        conn.request("GET", "/workflow-list", headers=AUTH)
        assert conn.getresponse().status == 200
        return (*answer, conn.sock is first)
    finally:
        conn.close()


@pytest.mark.parametrize("case", ["401", "413", "400", "413-past-the-limit"])
async def test_a_client_that_sends_the_whole_body_first_reads_the_answer(keyed, case):
    """20 MB or more sent in full before reading: the refusal (decided at the first bytes) is
    read, with its JSON body, instead of a connection reset, and the client's next request
    works. Refused half a MB before the end, the rest is read and the connection kept."""
    if case == "400":
        body, ctype = text_upload(BIG)
    elif case == "413":
        body, ctype = over_the_limit()
    elif case == "413-past-the-limit":
        body, ctype = past_the_limit()
    else:
        body, ctype = multipart([("file", "big.png", png_bytes() + b"\x00" * BIG, "image/png")])
    headers = {"Content-Type": ctype, **({} if case == "401" else AUTH)}
    code, answer_headers, answer, kept = await asyncio.to_thread(send_all_then_read, keyed.port, body, headers)
    assert code == int(case[:3]), (code, answer[:300])
    detail = json_detail(code, answer_headers, answer)
    assert {"401": "API key", "413": "UPLOAD_MAX_SIZE", "400": "unsupported file type",
            "413-past-the-limit": "over the limit"}[case] in detail
    assert kept == (case == "413-past-the-limit"), (case, answer_headers)


# ---------------------------------------------------------------- BODY_TIMEOUT: silence, not total

SILENCE = 1.0  # BODY_TIMEOUT for these tests


@pytest.fixture
async def strict(sim, bridge_factory):
    return await bridge_factory([sim], body_timeout=SILENCE)


async def closed_after(reader, limit: float) -> float:
    """Seconds until the bridge closes the connection, reading (and ignoring) what it sends."""
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), limit):
        pass
    return time.monotonic() - started


async def send_steadily(port: int, path: str, head: str, body: bytes, seconds: float) -> bytes:
    """`body` in even pieces over `seconds` (a pause of about a tenth of a second between two),
    then the whole answer, read to the close it asks for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n").encode())
    pieces = max(1, int(seconds / 0.1))
    size = -(-len(body) // pieces)
    for start in range(0, len(body), size):
        writer.write(body[start:start + size])
        await writer.drain()
        await asyncio.sleep(0.1)  # the pace of a slow link, not a wait for something
    answer = await asyncio.wait_for(reader.read(-1), TIMEOUT)
    writer.close()
    return answer


async def test_a_stalled_body_is_dropped_within_body_timeout(strict):
    for path, head, sent in (("/upload", "Content-Type: multipart/form-data; boundary=b0\r\n", b"--b0\r\n"),
                             (f"/generate-based-workflow?clientId={new_client_id()}",
                              "Content-Type: application/json\r\n", b'{"workflow": "inv')):
        reader, writer = await asyncio.open_connection("127.0.0.1", strict.port)
        writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 100000\r\n\r\n").encode()
                     + sent + b" " * 40)
        await writer.drain()
        assert await closed_after(reader, SILENCE + 3) < SILENCE + 1.5, path
        writer.close()


async def test_a_slow_steady_body_may_take_longer_than_body_timeout(strict):
    """~600 KB at ~200 KB/s (3 s, three times BODY_TIMEOUT) is received whole: an upload, and a
    JSON body (a request the catalogue then refuses: its answer, not a dropped connection)."""
    image = png_bytes(64, 48)
    body, ctype = multipart([("file", "slow.png", image + os.urandom(600_000), "image/png")])
    padded = b'{"workflow": "no-such-workflow"' + b" " * 20_000 + b"}"
    started = time.monotonic()
    uploaded, refused = await asyncio.gather(
        send_steadily(strict.port, "/upload", f"Content-Type: {ctype}\r\n", body, 3),
        send_steadily(strict.port, f"/generate-based-workflow?clientId={new_client_id()}",
                      "Content-Type: application/json\r\n", padded, 2.5))
    assert time.monotonic() - started > 2 * SILENCE
    head, _, payload = uploaded.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), uploaded[:300]
    saved = ujson.loads(payload)["file"]
    assert (strict.bridge.settings.uploads_dir / saved).stat().st_size == len(image) + 600_000
    assert refused.startswith(b"HTTP/1.1 400"), refused[:300]
    assert b"no-such-workflow" in refused


# ---------------------------------------------------------------- header limits: 431

async def raw_exchange(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """One request on its own connection, the answer read to the close it announces."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), TIMEOUT)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def request_with(headers: list[str], body: bytes = b"") -> bytes:
    lines = ["GET /healthz HTTP/1.1" if not body else "POST /upload HTTP/1.1", "Host: x", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("body", [b"", b"x" * (3 * MB)], ids=["no-body", "with-a-body"])
async def test_too_many_header_lines_get_431(bridge, body):
    from handlers.connections import MAX_HEADER_COUNT
    code, headers, answer = await raw_exchange(bridge.port, request_with(
        [f"X-Many-{i}: {i}" for i in range(MAX_HEADER_COUNT + 1)], body))
    assert code == 431 and headers["Connection"] == "close"
    assert "header lines" in json_detail(code, headers, answer)
    code, _, _ = await raw_exchange(bridge.port, request_with(
        [f"X-Many-{i}: {i}" for i in range(MAX_HEADER_COUNT - 2)] + ["Connection: close"]))
    assert code == 200  # 100 lines with Host and Connection: at the limit


@pytest.mark.parametrize("body", [b"", b"x" * (3 * MB)], ids=["no-body", "with-a-body"])
async def test_a_header_block_over_the_limit_gets_431(bridge, body):
    """tornado drops such a connection without a word; the bridge answers first."""
    from handlers.connections import MAX_HEADER_BYTES
    code, headers, answer = await raw_exchange(bridge.port, request_with(
        [f"X-Big: {'a' * MAX_HEADER_BYTES}"], body))
    assert code == 431 and headers["Connection"] == "close"
    assert f"over {MAX_HEADER_BYTES} bytes" in json_detail(code, headers, answer)
    code, _, _ = await raw_exchange(bridge.port, request_with(
        [f"X-Big: {'a' * (MAX_HEADER_BYTES - 200)}", "Connection: close"]))
    assert code == 200


async def test_a_pooling_client_gets_its_431_and_goes_on(bridge):
    from handlers.connections import MAX_HEADER_BYTES, MAX_HEADER_COUNT
    client = PoolingClient(bridge.url)
    try:
        for headers in ({f"X-Many-{i}": "1" for i in range(MAX_HEADER_COUNT)},
                        {"X-Big": "b" * MAX_HEADER_BYTES}):
            code, answer_headers, answer = await client.request("GET", "/healthz", headers=headers)
            assert code == 431, code
            json_detail(code, answer_headers, answer)
            code, _, _ = await client.request("GET", "/healthz")
            assert code == 200
    finally:
        await client.close()


# ---------------------------------------------------------------- start-up: the port, the data folder

def bridge_args(tmp_path, data_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "bridge.py"), "--env-file", str(tmp_path / "none"), "--host", "127.0.0.1",
            "--port", str(port), "--data-dir", str(data_dir), "--comfyui-servers", "127.0.0.1:1", *extra]


async def run_to_exit(args: list[str]) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=30, cwd=ROOT)


async def test_a_port_in_use_stops_startup_with_one_line_before_anything_starts(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = await run_to_exit(bridge_args(tmp_path, tmp_path / "data", port, "--demo"))
    finally:
        holder.close()
    assert result.returncode == 2, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # no traceback, no simulated backend started, no log line
    assert "HOST=127.0.0.1" in lines[0] and f"PORT={port}" in lines[0] and "in use" in lines[0], lines
    assert not (tmp_path / "data" / "jobs.sqlite3").exists()  # the job database was not opened


async def test_one_bridge_per_data_folder(tmp_path):
    """A second bridge on a DATA_DIR another one holds stops with a line naming that process;
    the lock goes with the process (kill -9) or with a clean stop."""
    from storage.lock import DataDirLock
    from tests.test_durability import Process
    data_dir = tmp_path / "data"
    first = Process(bridge_args(tmp_path, data_dir, 0), tmp_path / "first.log")
    try:
        await first.wait_line(r"bridge listening on")
        second = await run_to_exit(bridge_args(tmp_path, data_dir, 0))
        assert second.returncode == 2, second
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert len(lines) == 1 and "DATA_DIR" in lines[0] and f"pid {first.proc.pid}" in lines[0], lines
        assert (await run_to_exit(bridge_args(tmp_path, tmp_path / "elsewhere", 0, "--help"))).returncode == 0
    finally:
        first.kill()  # SIGKILL: the OS drops the lock
    third = Process(bridge_args(tmp_path, data_dir, 0), tmp_path / "third.log")
    try:
        await third.wait_line(r"bridge listening on")
    finally:
        third.stop()  # SIGTERM: a clean stop releases it
    assert third.proc.returncode == 0
    DataDirLock(data_dir).acquire().release()


async def test_one_bridge_per_data_folder_in_one_process(sim, bridge_factory):
    """The fixture's bridges each have their own DATA_DIR; one on a folder a running bridge
    holds is refused (naming this process), and the folder is free again once it stopped."""
    from bridge import Bridge
    from storage.lock import DataDirInUse
    first = await bridge_factory([sim])
    second = await bridge_factory([sim])
    assert first.bridge.settings.data_dir != second.bridge.settings.data_dir
    with pytest.raises(DataDirInUse) as refused:
        Bridge(first.bridge.settings)
    assert f"pid {os.getpid()}" in str(refused.value)
    await first.stop()
    again = await bridge_factory([sim], data_dir=first.bridge.settings.data_dir)
    assert (await again.api().fetch("/healthz")).code == 200
