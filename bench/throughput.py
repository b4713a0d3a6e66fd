#!/usr/bin/env python3
"""Enqueue throughput of POST /generate-based-workflow with 64 concurrent clients.

64 keep-alive connections each send generate requests back to back, every one with a clientId
of its own, for a fixed time (or request count). MAX_QUEUE is set far above what a run sends,
so every request is accepted; the bridge is restarted between runs (no clean-up needed).

Two backend set-ups:
  busy     one simulator busy with a long job (slow-progress, 10000 steps): every request
           only queues. Measures the enqueue path alone.
  flowing  two simulators with zero-time jobs (blank-image, 64x64): the bridge dispatches and
           collects results while it enqueues, as it would in production with fast backends.
For scale, the same load generator is pointed at GET /healthz (the cheapest route); the ratio
generate / healthz does not depend on the machine's speed. The CPU time each process used is
read from /proc, so one sees which side was the bottleneck.
Load generators (--clients, default both, each measured on its own): `raw`, one bare
keep-alive socket per client (cheap: the bridge stays the bottleneck), and `aiohttp`, a
ClientSession per client as people write one (it costs the shared two cores more per request).

    .venv/bin/python bench/throughput.py                      # 3 runs x 10 s per mode and client
    .venv/bin/python bench/throughput.py --mode busy --clients aiohttp --runs 1
    .venv/bin/python bench/throughput.py --mode busy --runs 1 --profile /tmp/tp.pyspy
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import clients as cl  # noqa: E402

GOAL_RPS = 2000.0   # issue 14: enqueue >= 2,000 jobs/s with 64 aiohttp clients
CLIENTS = 64


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawSender:
    """The benches' own client: one bare keep-alive HTTP/1.1 socket (`_common.HttpConn`)."""

    def __init__(self, port: int):
        self.conn = c.HttpConn(c.LOOPBACK, port)

    async def open(self) -> None:
        await self.conn.open()

    async def send(self, method: str, path: str, body: bytes, headers: dict | None) -> int:
        status, _, _ = await self.conn.request(method, path, body, headers)
        return status

    async def close(self) -> None:
        self.conn.close()


class AiohttpSender:
    """An aiohttp ClientSession of its own (default connector: keep-alive), one request at a time."""

    def __init__(self, port: int):
        self.base = f"http://{c.LOOPBACK}:{port}"

    async def open(self) -> None:
        self.session = cl.aiohttp.ClientSession(timeout=cl.aiohttp.ClientTimeout(total=cl.TIMEOUT))

    async def send(self, method: str, path: str, body: bytes, headers: dict | None) -> int:
        async with self.session.request(method, self.base + path, data=body or None, headers=headers) as r:
            await r.read()
            return r.status

    async def close(self) -> None:
        await self.session.close()


SENDERS = {"raw": RawSender, "aiohttp": AiohttpSender}


async def load(port: int, path_for, body: bytes | None, duration: float, max_requests: int,
               clients: int = CLIENTS, client: str = "raw") -> dict:
    conns = [SENDERS[client](port) for _ in range(clients)]
    for conn in conns:
        await conn.open()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    stop_at = time.perf_counter() + duration
    headers = {"Content-Type": "application/json"} if body is not None else None

    async def worker(conn, index: int) -> None:
        nonlocal sent
        k = 0
        while sent < max_requests and time.perf_counter() < stop_at:
            sent += 1
            k += 1
            t = time.perf_counter()
            status = await conn.send("POST" if body is not None else "GET", path_for(index, k), body or b"", headers)
            latencies.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1

    me = os.getpid()
    cpu0 = cpu_seconds(me)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(conn, i) for i, conn in enumerate(conns)))
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(me) - cpu0
    for conn in conns:
        await conn.close()
    ok = statuses.get(200, 0)
    return {"ok": ok, "statuses": statuses, "elapsed": elapsed, "rps": ok / elapsed,
            "p50_ms": 1000 * c.median(latencies), "p99_ms": 1000 * c.percentile(latencies, 99),
            "loadgen_cpu": cpu / elapsed}


MODES = {
    # mode: (simulators, their tick seconds, request body)
    "busy": (1, 0.05, {"workflow": "slow-progress", "2/steps": 10000}),  # 500 s, the most steps allowed
    "flowing": (2, 0.01, {"workflow": "blank-image", "1/width": 64, "1/height": 64}),
}


def one_run(args, mode: str, client: str, run: int, profile: Path | None) -> dict:
    count, tick, request = MODES[mode]
    settings = {"MAX_QUEUE": "10000000", "RESULT_TTL": "3600", **c.extra_settings(args)}
    with c.Stack(args, f"throughput-{mode}") as stack:
        for i in range(count):
            stack.sim(f"sim-{mode}-{i}", tick_seconds=tick)
        bridge = stack.start_bridge(settings, profile)
        body = json.dumps(request).encode()

        def path_for(index: int, k: int, tag: str = "") -> str:
            return f"/generate-based-workflow?clientId=tp{tag}-{run}-{index}-{k}"

        # Warm-up (and, in busy mode, the long job that keeps each backend occupied).
        asyncio.run(load(bridge.port, lambda i, k: path_for(i, k, "w"), body, 5.0, 256, client=client))
        healthz = asyncio.run(load(bridge.port, lambda i, k: "/healthz", None, args.healthz_seconds, 10**9,
                                   client=client))
        pid = bridge.python_pid
        cpu0 = cpu_seconds(pid)
        result = asyncio.run(load(bridge.port, path_for, body, args.seconds, args.max_requests, client=client))
        result["bridge_cpu"] = (cpu_seconds(pid) - cpu0) / result["elapsed"]
        result["healthz_rps"] = healthz["rps"]
        status = asyncio.run(_status(bridge.port))
        result["queue_after"] = status["queue"]["length"]
        result["completed_after"] = sum(b["completed"] for b in status["backends"])
    return result


async def _status(port: int) -> dict:
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    _, _, body = await conn.request("GET", "/status")
    conn.close()
    return json.loads(body)


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--mode", choices=["busy", "flowing", "both"], default="both")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--max-requests", type=int, default=60000, help="request bound per run (default 60000)")
    p.add_argument("--healthz-seconds", type=float, default=3.0)
    p.add_argument("--clients", default="raw,aiohttp",
                   help="load generators, comma-separated: raw (bare keep-alive sockets), aiohttp "
                        "(a ClientSession per client); default both")
    args = p.parse_args()
    c.raise_nofile()
    modes = ["busy", "flowing"] if args.mode == "both" else [args.mode]
    kinds = [k.strip() for k in args.clients.split(",") if k.strip()]
    for kind in kinds:
        if kind not in SENDERS:
            p.error(f"--clients: unknown client {kind!r} (raw, aiohttp)")
    rows, notes, extra = [], [], {}
    if "aiohttp" in kinds and cl.missing("aiohttp"):
        print(f"skipping client aiohttp: {cl.missing('aiohttp')}", file=sys.stderr, flush=True)
        notes.append(f"client aiohttp skipped: {cl.missing('aiohttp')}")
        kinds.remove("aiohttp")
    if not kinds:
        raise SystemExit("no client left to measure with")
    for mode, client in [(m, k) for m in modes for k in kinds]:
        runs = []
        for r in range(args.runs):
            last = r == args.runs - 1 and (mode, client) == (modes[-1], kinds[-1])
            profile = c.profile_path(args) if last else None
            res = c.quiet_run(lambda: one_run(args, mode, client, r, profile))
            runs.append(res)
            print(f"{mode} {client} run {r + 1}/{args.runs}: {res['rps']:.0f} req/s ({res['ok']} ok, statuses "
                  f"{res['statuses']}), p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, bridge cpu "
                  f"{100 * res['bridge_cpu']:.0f}%, loadgen cpu {100 * res['loadgen_cpu']:.0f}%, healthz "
                  f"{res['healthz_rps']:.0f} req/s, queue after {res['queue_after']}",
                  file=sys.stderr, flush=True)
        rps = c.spread([r["rps"] for r in runs])
        ratio = c.spread([r["rps"] / r["healthz_rps"] for r in runs])
        rows.append({
            "figure": f"enqueue throughput, {CLIENTS} {client} clients, {mode} backends", "client": client,
            "goal": f">= {GOAL_RPS:,.0f} req/s",
            "value": (f"{c.fmt_spread(rps, ' req/s', 0)}; = {ratio['median']:.2f} x GET /healthz "
                      f"({c.median([r['healthz_rps'] for r in runs]):.0f} req/s); request p50 "
                      f"{c.median([r['p50_ms'] for r in runs]):.1f} ms, p99 {c.median([r['p99_ms'] for r in runs]):.1f} ms"),
            "met": rps["median"] >= GOAL_RPS, "number": rps["median"],
            "data": {"rps": rps, "ratio_to_healthz": ratio, "runs": runs}})
        notes.append(f"{mode}, {client}: bridge CPU {100 * c.median([r['bridge_cpu'] for r in runs]):.0f}% of a core, "
                     f"load generator {100 * c.median([r['loadgen_cpu'] for r in runs]):.0f}%; "
                     f"queue length after a run {c.median([r['queue_after'] for r in runs]):.0f}, "
                     f"jobs completed {c.median([r['completed_after'] for r in runs]):.0f}")
    notes.append(f"each run: {args.seconds:g} s or {args.max_requests} requests, after 256 warm-up requests; "
                 "MAX_QUEUE=10000000; bridge at LOGGING_LEVEL="
                 f"{c.extra_settings(args).get('LOGGING_LEVEL', 'INFO')}")
    c.report("enqueue throughput of /generate-based-workflow", args, rows, notes)
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
