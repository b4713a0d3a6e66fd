#!/usr/bin/env python3
"""Makespan of 200 jobs on 4 backends of unequal speed, divided by the ideal.

Four simulators with different --tick-seconds run the `slow-progress` workflow (LoadImage,
SimSlowProgress with `2/steps` ticks, SaveImage); every job has its own uploaded 64x64 input
(so no simulator can answer from its cache), uploaded before the clock starts. Each job's
client opens its websocket first; then all jobs are queued at once. The makespan runs from the
first generate request to the last `closed` message (results stored in the bridge).

The ideal (total work / capacity): backend i needs t_i seconds per job, measured in the same
run from the simulator's own timeline (median of end - start of the prompts it ran). Its
capacity is 1/t_i jobs per second, so N jobs ideally take

    ideal = N / sum_i(1 / t_i)

which is the makespan if the work could be split finely and the bridge cost nothing. Whole
jobs cannot be split; the best any scheduler can do with whole jobs and zero overhead is
T* = min { T : sum_i floor(T / t_i) >= N }, also printed (T* / ideal shows what is lost to
granularity alone). Also per backend: jobs run, busy share, idle time between its jobs.

    .venv/bin/python bench/makespan.py                      # 3 runs x 200 jobs
    .venv/bin/python bench/makespan.py --runs 1 --jobs 80 --profile /tmp/makespan.pyspy
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from idle_gap import gaps_from, upload_all  # noqa: E402

from tornado import websocket  # noqa: E402

GOAL_RATIO = 1.02   # issue 15 (issue 14's was 1.05)


def discrete_optimum(times: list[float], jobs: int) -> float:
    candidates = sorted(k * t for t in times for k in range(1, jobs + 1))
    for T in candidates:
        if sum(math.floor(T / t + 1e-9) for t in times) >= jobs:
            return T
    return float("inf")


async def run_jobs(port: int, bodies: list[dict], run: int, prefix: str = "mk") -> tuple[float, float]:
    """Open one websocket per job, queue every job at once (8 connections), wait for every `closed`.
    Returns (first generate request -> last `closed`, in seconds; wall-clock time once all were queued)."""
    ids = [f"{prefix}{run}-{i}-{random.getrandbits(32):x}" for i in range(len(bodies))]
    sockets = [await websocket.websocket_connect(f"ws://{c.LOOPBACK}:{port}/ws?clientId={cid}") for cid in ids]
    for ws in sockets:
        await ws.read_message()  # "connected"
    done_at: list[float] = [0.0] * len(ids)

    async def follow(i: int, ws) -> None:
        while True:
            message = await ws.read_message()
            if message is None:
                raise RuntimeError(f"socket of job {i} closed before its end")
            status = json.loads(message)["status"]
            if status == "closed":
                done_at[i] = time.perf_counter()
                return
            if status == "error":
                raise RuntimeError(f"job {i} failed: {message}")

    followers = [asyncio.ensure_future(follow(i, ws)) for i, ws in enumerate(sockets)]
    conns = [await c.HttpConn(c.LOOPBACK, port).open() for _ in range(8)]
    pending = list(range(len(ids)))
    t0 = time.perf_counter()

    async def submit(conn) -> None:
        while pending:
            i = pending.pop(0)
            body = json.dumps(bodies[i]).encode()
            status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={ids[i]}", body,
                                                   {"Content-Type": "application/json"})
            assert status == 200, (status, answer)

    await asyncio.gather(*(submit(conn) for conn in conns))
    queued_at = time.time()
    await asyncio.wait_for(asyncio.gather(*followers), 600)
    makespan = max(done_at) - t0
    for conn in conns:
        conn.close()
    for ws in sockets:
        ws.close()
    return makespan, queued_at


def one_run(args, run: int, profile: Path | None) -> dict:
    with c.Stack(args, "makespan") as stack:
        sims = [stack.sim(f"sim-{i}-tick{tick:g}", tick_seconds=tick, timeline=True) for i, tick in enumerate(args.ticks)]
        bridge = stack.start_bridge(c.extra_settings(args), profile)
        names = asyncio.run(upload_all(bridge.port, args.jobs))
        bodies = [{"workflow": "slow-progress", "1/image": name, "2/steps": args.steps} for name in names]
        makespan, queued_at = asyncio.run(run_jobs(bridge.port, bodies, run))
        bridge.stop()
        timelines = []
        for sim in sims:
            sim.stop()
            timelines.append(sim.timeline())
    per_backend = []
    for sim, timeline in zip(sims, timelines):
        durations = [e["ended"] - e["started"] for e in timeline]
        gaps = gaps_from(timeline, queued_at)
        per_backend.append({"tick": sim.tick_seconds, "jobs": len(timeline),
                            "t": c.median(durations) if durations else float("nan"),
                            "busy": sum(durations), "idle_gap_ms": 1000 * c.median(gaps) if gaps else float("nan"),
                            "failed": sum(1 for e in timeline if not e["success"])})
    times = [b["t"] for b in per_backend]
    capacity = sum(1 / t for t in times)
    ideal = args.jobs / capacity
    optimum = discrete_optimum(times, args.jobs)
    for b in per_backend:
        b["share_ideal"] = args.jobs * (1 / b["t"]) / capacity
        b["busy_share"] = b["busy"] / makespan
    return {"makespan": makespan, "ideal": ideal, "optimum": optimum, "ratio": makespan / ideal,
            "ratio_optimum": makespan / optimum, "backends": per_backend}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="SimSlowProgress ticks per job (default 20)")
    p.add_argument("--ticks", type=lambda s: [float(x) for x in s.split(",")], default=[0.010, 0.013, 0.017, 0.025],
                   help="tick seconds of each simulator (default 0.010,0.013,0.017,0.025)")
    args = p.parse_args()
    runs = []
    for r in range(args.runs):
        res = c.quiet_run(lambda: one_run(args, r, c.profile_path(args) if r == args.runs - 1 else None))
        runs.append(res)
        detail = ", ".join(f"{b['jobs']} jobs x {1000 * b['t']:.0f} ms (ideal {b['share_ideal']:.1f}, busy "
                           f"{100 * b['busy_share']:.0f}%, idle gap {b['idle_gap_ms']:.1f} ms)" for b in res["backends"])
        print(f"run {r + 1}/{args.runs}: makespan {res['makespan']:.2f} s, ideal {res['ideal']:.2f} s, ratio "
              f"{res['ratio']:.3f}; whole-job optimum {res['optimum']:.2f} s; {detail}", file=sys.stderr, flush=True)
    ratio = c.spread([r["ratio"] for r in runs])
    rows = [
        {"figure": f"makespan / ideal, {args.jobs} jobs on {len(args.ticks)} unequal backends",
         "goal": f"<= {GOAL_RATIO:g}",
         "value": (f"{c.fmt_spread(ratio, '', 3)}; makespan {c.median([r['makespan'] for r in runs]):.2f} s, ideal "
                   f"{c.median([r['ideal'] for r in runs]):.2f} s"),
         "met": ratio["median"] <= GOAL_RATIO, "number": ratio["median"], "data": {"ratio": ratio}},
        {"figure": "makespan / whole-job optimum T*", "goal": "",
         "value": (f"{c.median([r['ratio_optimum'] for r in runs]):.3f} (T* / ideal = "
                   f"{c.median([r['optimum'] / r['ideal'] for r in runs]):.3f}: lost to granularity alone)"),
         "met": None},
    ]
    backend_lines = []
    for i, tick in enumerate(args.ticks):
        bs = [r["backends"][i] for r in runs]
        backend_lines.append(
            f"backend {i} (tick {tick:g} s): {c.median([1000 * b['t'] for b in bs]):.0f} ms per job, "
            f"{c.median([b['jobs'] for b in bs]):.0f} jobs (ideal share {c.median([b['share_ideal'] for b in bs]):.1f}), "
            f"busy {c.median([100 * b['busy_share'] for b in bs]):.1f}% of the makespan, idle between jobs "
            f"{c.median([b['idle_gap_ms'] for b in bs]):.1f} ms median")
    notes = backend_lines + [
        f"slow-progress with 2/steps={args.steps}; each job its own uploaded 64x64 PNG; {c.settings_note(args)}"]
    c.report("makespan on unequal backends", args, rows, notes, extra={"client": "tornado websocket + raw keep-alive HTTP"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
