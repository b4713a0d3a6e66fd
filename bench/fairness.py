#!/usr/bin/env python3
"""Fair shares between tenants: tenant A floods the queue, tenant B sends a few jobs one at a
time; how long does B wait?

Four simulators of equal speed run `slow-progress` (each job its own uploaded 64x64 input, so
no simulator answers from its cache; uploads happen before the clock starts). Tenant A queues
`--flood` jobs at once over 8 connections; then tenant B, with its own key, sends `--few` jobs
one after the other: each opens its websocket, generates, and B's wait is the time from the
generate request to the job's first `progress` message (it runs on a backend). One job's run
time is the median of end - start of the prompts in the simulators' own timelines.

Two bridges per run, same workload: `tenants` (BRIDGE_API_KEYS a:...,b:...: free slots go
round-robin between tenants with waiting jobs) and `one key` (both clients share one key,
the tenant `default`: first come, first served, as before tenants existed).

    .venv/bin/python bench/fairness.py                  # 3 runs x (500 + 5) jobs, both modes
    .venv/bin/python bench/fairness.py --runs 1 --flood 200
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from tornado import httpclient, websocket  # noqa: E402

GOAL_RUNS = 2.0       # B's p95 wait, in run times of one job
KEYS = {"a": "bench-key-a", "b": "bench-key-b"}
SIDE = 64


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def upload_all(port: int, count: int, key: str) -> list[str]:
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    names = []
    for i in range(count):
        body, ctype = c.multipart("file", f"in{i}.png", c.png(SIDE, SIDE, tuple(random.getrandbits(8) for _ in range(3))))
        status, _, answer = await conn.request("POST", "/upload", body, {"Content-Type": ctype, **auth(key)})
        assert status == 200, (status, answer)
        names.append(json.loads(answer)["file"])
    conn.close()
    return names


def generate_body(name: str, steps: int) -> bytes:
    return json.dumps({"workflow": "slow-progress", "1/image": name, "2/steps": steps}).encode()


async def flood(port: int, names: list[str], steps: int, key: str, run: int) -> list[str]:
    ids = [f"fa{run}-{i}-{random.getrandbits(32):x}" for i in range(len(names))]
    pending = list(range(len(ids)))
    conns = [await c.HttpConn(c.LOOPBACK, port).open() for _ in range(8)]

    async def submit(conn) -> None:
        while pending:
            i = pending.pop(0)
            status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={ids[i]}",
                                                   generate_body(names[i], steps),
                                                   {"Content-Type": "application/json", **auth(key)})
            assert status == 200, (status, answer)

    await asyncio.gather(*(submit(conn) for conn in conns))
    for conn in conns:
        conn.close()
    return ids


async def one_at_a_time(port: int, names: list[str], steps: int, key: str, run: int) -> list[float]:
    """B's jobs, each sent when the one before it ended; the wait of each."""
    waits = []
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    for i, name in enumerate(names):
        client_id = f"fb{run}-{i}-{random.getrandbits(32):x}"
        ws = await websocket.websocket_connect(httpclient.HTTPRequest(
            f"ws://{c.LOOPBACK}:{port}/ws?clientId={client_id}", headers=auth(key), request_timeout=30))
        await ws.read_message()   # connected
        sent = time.perf_counter()
        status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={client_id}",
                                               generate_body(name, steps),
                                               {"Content-Type": "application/json", **auth(key)})
        assert status == 200, (status, answer)
        started = None
        while True:
            message = await asyncio.wait_for(ws.read_message(), 600)
            if message is None:
                raise RuntimeError(f"B's socket {client_id} closed before its job ended")
            kind = json.loads(message)["status"]
            if kind == "progress" and started is None:
                started = time.perf_counter()
            if kind == "closed":
                break
            if kind == "error":
                raise RuntimeError(f"B's job failed: {message}")
        waits.append(started - sent)
        ws.close()
    conn.close()
    return waits


async def wait_all_done(port: int, key: str, deadline: float) -> None:
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            _, _, body = await conn.request("GET", "/status", headers=auth(key))
            status = json.loads(body)
            if not status["queue"]["length"] and not status["jobs"].get("running"):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the flood did not drain in time")
    finally:
        conn.close()


async def workload(port: int, args, key_a: str, key_b: str, run: int) -> list[float]:
    names_a = await upload_all(port, args.flood, key_a)
    names_b = await upload_all(port, args.few, key_b)
    await flood(port, names_a, args.steps, key_a, run)
    waits = await one_at_a_time(port, names_b, args.steps, key_b, run)
    await wait_all_done(port, key_a, 600)
    return waits


def one_mode(args, run: int, tenants: bool) -> dict:
    label = "tenants" if tenants else "one-key"
    settings = ({"BRIDGE_API_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items())} if tenants
                else {"BRIDGE_API_KEY": KEYS["a"]})
    with c.Stack(args, f"fairness-{label}") as stack:
        sims = [stack.sim(f"sim-{i}", tick_seconds=args.tick, timeline=True) for i in range(args.backends)]
        bridge = stack.start_bridge({**settings, **c.extra_settings(args)})
        key_b = KEYS["b"] if tenants else KEYS["a"]
        waits = asyncio.run(workload(bridge.port, args, KEYS["a"], key_b, run))
        bridge.stop()
        durations = []
        for sim in sims:
            sim.stop()
            durations += [e["ended"] - e["started"] for e in sim.timeline()]
    run_time = c.median(durations)
    return {"waits": waits, "run_time": run_time, "p95": c.percentile(waits, 95),
            "ratio": c.percentile(waits, 95) / run_time}


def one_run(args, run: int) -> dict:
    return {"tenants": one_mode(args, run, True), "one_key": one_mode(args, run, False)}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--flood", type=int, default=500, help="tenant A's jobs, queued at once (default 500)")
    p.add_argument("--few", type=int, default=5, help="tenant B's jobs, one at a time (default 5)")
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="SimSlowProgress ticks per job (default 10)")
    p.add_argument("--tick", type=float, default=0.01, help="simulator tick seconds (default 0.01)")
    args = p.parse_args()
    runs = []
    for r in range(args.runs):
        res = c.quiet_run(lambda: one_run(args, r))
        runs.append(res)
        t, o = res["tenants"], res["one_key"]
        print(f"run {r + 1}/{args.runs}: one job runs {1000 * t['run_time']:.0f} ms; B's waits with tenants "
              f"{', '.join(f'{1000 * w:.0f}' for w in t['waits'])} ms (p95 {t['ratio']:.2f} runs); one key "
              f"{', '.join(f'{1000 * w:.0f}' for w in o['waits'])} ms (p95 {o['ratio']:.2f} runs)",
              file=sys.stderr, flush=True)
    fair = c.spread([r["tenants"]["ratio"] for r in runs])
    fifo = c.spread([r["one_key"]["ratio"] for r in runs])
    pooled = c.percentile([w for r in runs for w in r["tenants"]["waits"]], 95)
    run_time = c.median([r["tenants"]["run_time"] for r in runs])
    rows = [
        {"figure": f"B's p95 wait / one job's run time, A floods {args.flood}, B sends {args.few} one at a time, "
                   f"{args.backends} backends",
         "goal": f"<= {GOAL_RUNS:g}",
         "value": (f"{c.fmt_spread(fair, '', 2)} (pooled over runs: {pooled / run_time:.2f}; one job "
                   f"{1000 * run_time:.0f} ms)"),
         "met": fair["median"] <= GOAL_RUNS, "number": fair["median"], "data": {"ratio": fair}},
        {"figure": "the same with one key for both (first come, first served)", "goal": "(compare)",
         "value": f"{c.fmt_spread(fifo, '', 1)}", "met": None, "data": {"ratio": fifo}},
    ]
    pipelined = not any(item.upper().startswith("MAX_INFLIGHT_PER_SERVER=") for item in args.set)
    notes = [f"slow-progress with 2/steps={args.steps} at tick {args.tick:g} s; each job its own uploaded "
             f"{SIDE}x{SIDE} PNG; B's wait: generate request to its first `progress` message; bridge defaults"
             + (" (MAX_INFLIGHT_PER_SERVER=2: B's job, once sent, may wait behind the prompt running there)"
                if pipelined else f", {' '.join(args.set)}")]
    c.report("fairness between tenants", args, rows, notes, extra={"client": "tornado websocket + raw keep-alive HTTP"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
