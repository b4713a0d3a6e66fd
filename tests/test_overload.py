"""Overload (issue 14, item 5): a generate refused because the queue is full is answered before
its body is read, with the documented 503, body and Retry-After, and whatever the client still
sends is drained or the connection closed, never reset; refusals are logged as a rate line; a
refused connection reads its next request in turn; accepted jobs complete while refusals come.

Every client here has a timeout; blocking clients (http.client) run in a thread."""
from __future__ import annotations

import asyncio
import http.client
import logging

import aiohttp
import pytest
import ujson

from handlers import connections
from handlers.generate import GenerateHandler
from tests.conftest import TIMEOUT, new_client_id, png_bytes, wait_for
from tests.test_metrics import scrape

FULL_DETAIL = "the queue is full (1 jobs waiting); retry later"
MB = 1024 * 1024


@pytest.fixture
async def full(sim, bridge_factory):
    """A bridge whose queue (MAX_QUEUE=1) is full: one slow job runs, one waits (in the bridge's
    queue: one prompt per backend)."""
    running = await bridge_factory([sim], max_queue=1, max_inflight_per_server=1)
    api = running.api()
    saved = await api.upload(png_bytes())
    first, second = new_client_id(), new_client_id()
    await api.generate(first, {"workflow": "slow-progress", "1/image": saved, "2/steps": 500})
    await api.wait_status(first, "progress")
    await api.generate(second, {"workflow": "slow-progress", "1/image": saved, "2/steps": 501})
    assert len(running.service.queue) == 1
    yield running
    for client_id in (first, second):
        await api.json(f"/interrupt?clientId={client_id}", "POST")
    api.close()


@pytest.fixture
def body_never_read(monkeypatch):
    """Records every call of the generate handler's body receiver and parser."""
    calls = []

    def data_received(self, chunk):
        calls.append(("data_received", len(chunk)))

    def json_body(self):
        calls.append(("json_body",))
        return {}
    monkeypatch.setattr(GenerateHandler, "data_received", data_received)
    monkeypatch.setattr(GenerateHandler, "json_body", json_body)
    return calls


def generate_body(size: int = 0) -> bytes:
    """A generate body; `size` pads it (refused anyway while the queue is full)."""
    body = {"workflow": "invert"}
    if size:
        body["pad"] = "x" * size
    return ujson.dumps(body).encode()


def check_busy(status: int, headers, body: bytes) -> None:
    """The documented refusal: 503, `{"detail": ...}` as JSON, `Retry-After: 5`."""
    assert status == 503, (status, body[:300])
    assert headers["Retry-After"] == "5"
    assert headers["Content-Type"].startswith("application/json")
    assert ujson.loads(body) == {"detail": FULL_DETAIL}


async def read_answer(reader) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().title()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), TIMEOUT)
    return int(status_line.split()[1]), headers, body


async def test_a_full_queue_is_answered_before_the_body_is_sent(full, body_never_read):
    """The 503 arrives while the body is still unsent; the body then sent is drained, not
    given to the handler, and the same connection serves the next request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", full.port)
    try:
        body = generate_body(1000)
        writer.write((f"POST /generate-based-workflow?clientId={new_client_id()} HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        await writer.drain()
        status, headers, answer = await read_answer(reader)
        check_busy(status, headers, answer)
        assert "close" not in headers.get("Connection", "").lower()
        writer.write(body + b"GET /workflow-list HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, answer = await read_answer(reader)
        assert status == 200 and "invert" in ujson.loads(answer)
    finally:
        writer.close()
        await writer.wait_closed()
    assert body_never_read == []


def send_all_then_read(port: int, body: bytes, chunked: bool) -> list[tuple[int, dict, bytes]]:
    """What `requests`/`urllib` do: the whole body first, then the answer; then one more request
    on the same client (a new connection if the bridge closed the first)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        answers = []
        path = f"/generate-based-workflow?clientId={new_client_id()}"
        if chunked:
            conn.request("POST", path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers={"Content-Type": "application/json"}, encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answers.append((response.status, dict(response.getheaders()), response.read()))
        conn.request("GET", "/workflow-list")
        response = conn.getresponse()
        answers.append((response.status, dict(response.getheaders()), response.read()))
        return answers
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_large_body_sent_in_full_first_still_gets_its_503(full, body_never_read, chunked):
    """Almost 1 MB (the JSON limit) sent before reading: the refusal is read, not a reset; with
    a Content-Length the rest is drained and the connection kept, chunked it is closed after
    the answer (`Connection: close`)."""
    body = generate_body(MB - 100)
    (status, headers, answer), (next_status, _, _) = await asyncio.to_thread(
        send_all_then_read, full.port, body, chunked)
    check_busy(status, headers, answer)
    assert (headers.get("Connection", "").lower() == "close") == chunked
    assert next_status == 200
    assert body_never_read == []


async def test_a_pooling_client_gets_every_refusal_and_goes_on(full, body_never_read):
    """aiohttp on one kept-alive connection: refusal after refusal, each with its Retry-After,
    then an ordinary request; never a reset, never a second connection."""
    opened = []
    trace = aiohttp.TraceConfig()

    async def on_create(session, context, params):
        opened.append(1)
    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT), trace_configs=[trace],
                                     connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(20):
            async with session.post(f"{full.url}/generate-based-workflow",
                                    params={"clientId": new_client_id()}, data=generate_body(),
                                    headers={"Content-Type": "application/json"}) as response:
                check_busy(response.status, response.headers, await response.read())
        async with session.get(f"{full.url}/workflow-list") as response:
            assert response.status == 200
    assert len(opened) == 1
    assert body_never_read == []


async def test_a_clientid_with_a_job_is_told_so_before_the_queue_is_full(full):
    """The early refusal keeps the order of the answers: a clientId whose job waits gets its
    400 (one job per clientId), not the 503."""
    waiting = next(iter(full.service.queue)).client_id
    api = full.api()
    response = await api.fetch(f"/generate-based-workflow?clientId={waiting}", "POST", {"workflow": "invert"})
    assert response.code == 400 and "already has a job" in ujson.loads(response.body)["detail"]
    api.close()


async def test_refusals_are_logged_as_a_rate_and_counted_in_metrics(full, caplog):
    caplog.set_level(logging.INFO)
    api = full.api()
    for _ in range(5):
        response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                                   {"workflow": "invert"})
        assert response.code == 503
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bridge")]
    refusal_lines = [line for line in lines if "503" in line or "queue is full" in line]
    assert len(refusal_lines) == 1, refusal_lines   # the first of the burst, not one per request
    assert refusal_lines[0].startswith("refusing requests: POST /generate-based-workflow 503")
    full.bridge.refusals.flush()  # what the interval's timer does
    counted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(counted) == 1 and counted[0].endswith("POST /generate-based-workflow 503 x4"), counted
    full.bridge.refusals.flush()  # nothing refused since: no line, and the next refusal is logged at once
    assert len([r for r in caplog.records if r.getMessage().startswith("refused ")]) == 1
    metrics = await scrape(api)
    assert metrics.value("bridge_http_requests_total", handler="GenerateHandler", method="POST", code="503") == 5
    api.close()


async def test_refused_connections_read_their_next_request_in_turn(monkeypatch):
    """`REFUSED_PER_TURN` of them per turn, in the order they were refused, and the next turn
    not before `REFUSED_TURN_SECONDS` (a turn the loop's next pass would be no limit)."""
    monkeypatch.setattr(connections, "REFUSED_PER_TURN", 4)
    monkeypatch.setattr(connections, "REFUSED_TURN_SECONDS", 3600)
    server = connections.BridgeHTTPServer(lambda *a: None, body_silence=1.0)
    released = []
    for i in range(10):
        server.in_turn(lambda i=i: released.append(i))
    assert released == []
    for _ in range(5):
        await asyncio.sleep(0)  # passes of the loop: the first is a turn, the others wait
    assert released == [0, 1, 2, 3]
    server._next_turn()  # what the timer does an hour later
    assert released == list(range(8))
    monkeypatch.setattr(connections, "REFUSED_TURN_SECONDS", 0)
    server._next_turn()
    assert released == list(range(10))


async def test_accepted_jobs_complete_while_refusals_come(sim, bridge_factory):
    """A job accepted first goes on to `closed` and its results while 8 clients flood the
    bridge with generates (each refused one posted again at once)."""
    sim.tick_seconds = 0.01
    running = await bridge_factory([sim], max_queue=1)
    api = running.api()
    saved = await api.upload(png_bytes())
    legit = new_client_id()
    socket = await api.ws(legit)
    await api.generate(legit, {"workflow": "slow-progress", "1/image": saved, "2/steps": 30})
    statuses: dict[int, int] = {}
    without_retry_after = []
    stop = asyncio.Event()

    async def flood(session):
        while not stop.is_set():
            async with session.post(f"{running.url}/generate-based-workflow", params={"clientId": new_client_id()},
                                    json={"workflow": "blank-image", "1/width": 8, "1/height": 8}) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 503 and not response.headers.get("Retry-After"):
                    without_retry_after.append(response.headers)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        flooders = [asyncio.ensure_future(flood(session)) for _ in range(8)]
        try:
            await wait_for(lambda: statuses.get(503, 0) >= 20, what="refusals")
            await socket.until("closed")
            refused_meanwhile = statuses.get(503, 0)
            results = await api.history(legit)
        finally:
            stop.set()
            await asyncio.gather(*flooders)
    assert refused_meanwhile >= 20 and len(results) == 1 and results[0]["data"][:4] == b"\x89PNG"
    assert set(statuses) <= {200, 503} and without_retry_after == []
    api.close()
