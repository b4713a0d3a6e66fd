"""Nagle's algorithm against an ordinary client (issue 14, item 1).

A status frame is small and the client never answers it: with Nagle on the bridge's socket,
each frame sent while the previous one is unacknowledged waits for the client's delayed ACK
(40 ms on Linux). aiohttp is the client most Python users have (and a requirement of the test
suite); it is used as it comes, sending nothing after the upgrade, once on a fresh connection
and once on a kept-alive one from its pool (its default for a websocket after a request).

The only timed test in the suite, allowed because the effect is 40 ms against ~1 ms: each lag
is the median of several jobs and the bound (25 ms) leaves room for a loaded machine.

Checked by removing `set_nodelay(True)` from `StatusSocket.open`: on the kept-alive connection
`connected` then arrives after 40-43 ms (the client's kernel has left its quick-ACK mode after
the first exchange); on a fresh connection Linux still ACKs at once, so only the kept-alive
case catches it here, as it did in the issue's probe.
"""
from __future__ import annotations

import socket
import statistics
import time

import aiohttp
import pytest

from .conftest import TIMEOUT, new_client_id

JOBS = 5
BOUND = 0.025   # seconds; the delayed ACK is 0.040


async def _one_job(session: aiohttp.ClientSession, bridge, sim, width: int) -> tuple[float, float]:
    """(upgrade -> `connected`, backend's end -> `closed`) in seconds, for one zero-time job."""
    client_id = new_client_id()
    ws = await session.ws_connect(f"{bridge.url}/ws?clientId={client_id}", autoping=False)
    upgraded = time.perf_counter()
    first = await ws.receive_json(timeout=TIMEOUT)
    connect_lag = time.perf_counter() - upgraded
    assert first["status"] == "connected"
    async with session.post(f"{bridge.url}/generate-based-workflow?clientId={client_id}",
                            json={"workflow": "blank-image", "1/width": width, "1/height": 8}) as answer:
        assert answer.status == 200, await answer.text()
    while True:
        message = await ws.receive(timeout=TIMEOUT)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        if message.json()["status"] == "closed":
            arrived = time.time()
            break
    prompt_id = bridge.service.get(client_id).prompt_id
    ended = next(end for pid, _, end, _ in sim.prompt_times if pid == prompt_id)   # time.time()
    await ws.close()
    async with session.get(f"{bridge.url}/history?clientId={client_id}") as results:
        assert results.status == 200
        await results.read()
    return connect_lag, arrived - ended


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh-connection", "kept-alive-connection"])
async def test_status_frames_do_not_wait_for_the_clients_ack(bridge, sim, reuse):
    sim.tick_seconds = 0.0
    connect_lags, close_lags = [], []
    for i in range(JOBS):
        connector = aiohttp.TCPConnector(force_close=not reuse)
        async with aiohttp.ClientSession(connector=connector) as session:
            if reuse:  # the websocket then goes over this request's kept-alive connection
                async with session.get(f"{bridge.url}/status") as status:
                    await status.read()
            connect_lag, close_lag = await _one_job(session, bridge, sim, 8 + i)
        connect_lags.append(connect_lag)
        close_lags.append(close_lag)
    assert statistics.median(connect_lags) < BOUND, connect_lags
    assert statistics.median(close_lags) < BOUND, close_lags


async def test_simulator_websocket_has_nagle_off_like_comfyui(bridge, sim):
    """ComfyUI runs on aiohttp, whose asyncio transports all have TCP_NODELAY: the simulator's
    event socket must not hold small frames for the bridge's ACK, or every bench over the
    simulator would measure a delay real servers do not have."""
    handlers = sim._rt.hub.open_handlers
    assert handlers
    for handler in handlers:
        sock = handler.ws_connection.stream.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
