#!/usr/bin/env python3
"""10,000 idle websockets held with heartbeats: bridge RSS per socket and event-loop lag.

The client opens N sockets to /ws?clientId= (each its own clientId, no job), answers pings, and
records when each `listening` heartbeat arrives. It is a plain asyncio Protocol per socket (no
websocket library), so that 10,000 sockets cost the client little CPU: the bridge, not the load
generator, must be what is measured. HEARTBEAT_INTERVAL=1: every socket gets a heartbeat after 1.0 to 1.1 s
of silence (the hub checks ten times per interval), about 9,000 messages per second.

Figures per run:
  RSS per socket   (bridge VmRSS with N sockets open and settled - VmRSS before) / N,
                   after a warm-up that opened and closed a few hundred sockets.
  loop lag         a separate probe process times GET /healthz round trips (every 20 ms, one
                   keep-alive connection) while the sockets are held; lag = round trip minus the
                   median round trip of the same probe against the idle bridge (no sockets).
  heartbeat gaps   time between two heartbeats on one socket (by design 1.0-1.1 s).
The open-file limit is raised for this process and (via preexec_fn) for the bridge.

    .venv/bin/python bench/websockets.py                  # 3 runs x 10,000 sockets, 20 s hold
    .venv/bin/python bench/websockets.py --sockets 2000 --hold 5 --runs 1
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

GOAL_KB_PER_SOCKET = 40.0
GOAL_LAG_P99_MS = 50.0


def _client_frame(opcode: int, payload: bytes = b"") -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class Socket(asyncio.Protocol):
    """One raw websocket client: handshake, then frames parsed just enough to time heartbeats."""

    gaps: list[float] = []        # seconds between two heartbeats on one socket (while recording)
    recording = False
    heartbeats = 0
    other_messages = 0

    def __init__(self, host: str, port: int, client_id: str):
        self.request = (f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.transport = None
        self.last_beat: float | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = buf[:end].split(b"\r\n", 1)[0].split(b" ")[1] == b"101"
            del buf[:end + 4]
            if not ok:
                self.upgraded.set_exception(RuntimeError("upgrade refused"))
                self.transport.close()
                return
            self.upgraded.set_result(True)
        while len(buf) >= 2:
            opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset:offset + length])
            del buf[:offset + length]
            if opcode == 1:
                if b'"listening"' in payload:
                    Socket.heartbeats += 1
                    if Socket.recording and self.last_beat is not None:
                        Socket.gaps.append(now - self.last_beat)
                    self.last_beat = now
                else:
                    Socket.other_messages += 1
            elif opcode == 9:
                self.transport.write(_client_frame(0xA, payload))
            elif opcode == 8:
                self.closed = True
                self.transport.close()
                return

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(str(exc)))

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(_client_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()
            self.closed = True


async def open_sockets(port: int, count: int, prefix: str, concurrency: int = 200) -> list[Socket]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    sockets: list[Socket] = []

    async def one(i: int) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    _, proto = await loop.create_connection(
                        lambda: Socket(c.LOOPBACK, port, f"{prefix}-{i}"), c.LOOPBACK, port)
                    await asyncio.wait_for(proto.upgraded, 30)
                    sockets.append(proto)
                    return
                except (OSError, ConnectionError, asyncio.TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError(f"socket {i} could not be opened")

    await asyncio.gather(*(one(i) for i in range(count)))
    return sockets


async def probe(port: int, seconds: float, interval: float = 0.02) -> list[float]:
    """Run the /healthz probe in its own process; returns round trips in seconds."""
    proc = await asyncio.create_subprocess_exec(
        c.PYTHON, __file__, "--probe", str(port), str(seconds), str(interval),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out)


def probe_main(port: int, seconds: float, interval: float) -> None:
    conn = http.client.HTTPConnection(c.LOOPBACK, port, timeout=30)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        times.append(time.perf_counter() - t)
        time.sleep(interval)
    conn.close()
    print(json.dumps(times))


async def one_run(bridge: c.BridgeProc, count: int, hold: float, run: int) -> dict:
    pid = bridge.python_pid
    warm = await open_sockets(bridge.port, 300, f"warm{run}")
    for s in warm:
        s.close()
    await asyncio.sleep(2.0)
    idle = await probe(bridge.port, 4.0)
    rss0 = c.rss_kb(pid)
    t0 = time.monotonic()
    sockets = await open_sockets(bridge.port, count, f"ws{run}")
    open_seconds = time.monotonic() - t0
    await asyncio.sleep(3.0)
    rss1 = c.rss_kb(pid)
    Socket.gaps, Socket.recording, Socket.heartbeats = [], True, 0
    hold_rtts = await probe(bridge.port, hold)
    Socket.recording = False
    beats = Socket.heartbeats
    rss2 = c.rss_kb(pid)
    still_open = sum(1 for s in sockets if not s.closed)
    for s in sockets:
        s.close()
    await asyncio.sleep(1.0)
    idle_p50 = c.median(idle)
    return {
        "open_seconds": open_seconds,
        "rss_before_mb": rss0 / 1024, "rss_open_mb": rss1 / 1024, "rss_after_hold_mb": rss2 / 1024,
        "kb_per_socket": (rss1 - rss0) / count,
        "idle_rtt_p50_ms": 1000 * idle_p50, "idle_rtt_p99_ms": 1000 * c.percentile(idle, 99),
        "hold_rtt_p50_ms": 1000 * c.median(hold_rtts), "hold_rtt_p99_ms": 1000 * c.percentile(hold_rtts, 99),
        "hold_rtt_max_ms": 1000 * max(hold_rtts),
        "lag_p50_ms": 1000 * (c.median(hold_rtts) - idle_p50),
        "lag_p99_ms": 1000 * (c.percentile(hold_rtts, 99) - idle_p50),
        "probes": len(hold_rtts),
        "gap_p50_s": c.median(Socket.gaps), "gap_p99_s": c.percentile(Socket.gaps, 99),
        "gap_max_s": max(Socket.gaps) if Socket.gaps else float("nan"),
        "heartbeats_per_s": beats / hold, "still_open": still_open,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return 0
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--sockets", type=int, default=10000)
    p.add_argument("--hold", type=float, default=20.0, help="seconds the sockets are held and probed (default 20)")
    args = p.parse_args()
    limit = c.raise_nofile()
    if limit < args.sockets + 1000:
        raise SystemExit(f"open-file limit {limit} is too low for {args.sockets} sockets")
    settings = {"HEARTBEAT_INTERVAL": "1", **c.extra_settings(args)}
    runs = []
    for r in range(args.runs):
        profile = c.profile_path(args) if r == args.runs - 1 else None
        def run_once():
            with c.Stack(args, "websockets") as stack:
                stack.sim("sim-ws")
                bridge = stack.start_bridge(settings, profile)
                return asyncio.run(one_run(bridge, args.sockets, args.hold, r))
        res = c.quiet_run(run_once)
        runs.append(res)
        print(f"run {r + 1}/{args.runs}: {res['kb_per_socket']:.1f} KB/socket (RSS {res['rss_before_mb']:.0f} -> "
              f"{res['rss_open_mb']:.0f} -> {res['rss_after_hold_mb']:.0f} MB), opened in {res['open_seconds']:.1f} s, "
              f"lag p50 {res['lag_p50_ms']:.1f} ms p99 {res['lag_p99_ms']:.1f} ms (idle rtt "
              f"{res['idle_rtt_p50_ms']:.2f} ms, hold max {res['hold_rtt_max_ms']:.0f} ms), heartbeat gap p50 "
              f"{res['gap_p50_s']:.3f} s p99 {res['gap_p99_s']:.3f} s, {res['heartbeats_per_s']:.0f} beats/s, "
              f"{res['still_open']} open", file=sys.stderr, flush=True)
    kb = c.spread([r["kb_per_socket"] for r in runs])
    lag = c.spread([r["lag_p99_ms"] for r in runs])
    held = min(r["still_open"] for r in runs)
    rows = [
        {"figure": f"idle websockets held ({args.sockets} opened)", "goal": ">= 10,000",
         "value": f"{held} open at the end of every run", "met": held >= 10000},
        {"figure": "bridge RSS per idle websocket", "goal": f"<= {GOAL_KB_PER_SOCKET:g} KB",
         "value": c.fmt_spread(kb, " KB", 1), "met": kb["median"] <= GOAL_KB_PER_SOCKET, "number": kb["median"], "data": kb},
        {"figure": "event-loop lag p99 while holding them", "goal": f"<= {GOAL_LAG_P99_MS:g} ms",
         "value": (f"{c.fmt_spread(lag, ' ms', 1)}; lag p50 {c.median([r['lag_p50_ms'] for r in runs]):.1f} ms, "
                   f"worst /healthz {c.median([r['hold_rtt_max_ms'] for r in runs]):.0f} ms"),
         "met": lag["median"] <= GOAL_LAG_P99_MS, "number": lag["median"], "data": lag},
        {"figure": "heartbeat spacing p50 / p99 (design: 1.0-1.1 s)", "goal": "",
         "value": (f"{c.median([r['gap_p50_s'] for r in runs]):.3f} s / {c.median([r['gap_p99_s'] for r in runs]):.3f} s;"
                   f" {c.median([r['heartbeats_per_s'] for r in runs]):.0f} heartbeats/s"), "met": None},
    ]
    notes = [f"{args.hold:g} s hold, /healthz probed every 20 ms from its own process; idle round trip p50 "
             f"{c.median([r['idle_rtt_p50_ms'] for r in runs]):.2f} ms; sockets opened in "
             f"{c.median([r['open_seconds'] for r in runs]):.1f} s (200 handshakes at a time); RSS before "
             f"{c.median([r['rss_before_mb'] for r in runs]):.0f} MB, with the sockets "
             f"{c.median([r['rss_open_mb'] for r in runs]):.0f} MB, after the hold "
             f"{c.median([r['rss_after_hold_mb'] for r in runs]):.0f} MB",
             "HEARTBEAT_INTERVAL=1, one simulator, bridge at LOGGING_LEVEL="
             f"{settings.get('LOGGING_LEVEL', 'INFO')}"]
    c.report(f"{args.sockets} idle websockets", args, rows, notes, extra={"client": "raw asyncio websocket"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
