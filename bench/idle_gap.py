#!/usr/bin/env python3
"""Backend idle time between two queued jobs, measured on the simulator's side.

Jobs are queued in the bridge all at once, so a backend that finishes one always has the next
one waiting. Each simulator writes, per prompt, when its worker started and finished running
it (`python -m comfysim --timeline FILE`, wall-clock seconds as floats); the idle time is
`start of prompt k+1 - end of prompt k` on the same backend, counted only while the bridge's
queue was certainly not empty (prompt k ended after the last job was queued).

With one prompt per backend (MAX_INFLIGHT_PER_SERVER=1, the default before issue 15), between
those two instants the bridge hears `execution_success` on its websocket, fetches the output
file, stores the results, and only then gives the backend its next job (upload of that job's
input file if any, then POST /prompt). With pipelining (2, today's default) the next prompt
already waits in ComfyUI's own queue, so the gap is the simulator's own hand-over, unless the
bridge is late in sending it.

Variants (each one simulator, jobs with near-zero execution time):
  blank   blank-image 64x64, a different colour per job (no input file)
  invert  invert of a 64x64 PNG uploaded per job (the bridge must put it on the backend first)

    .venv/bin/python bench/idle_gap.py                # 5 runs x 100 jobs per variant
    .venv/bin/python bench/idle_gap.py --variant blank --runs 1 --profile /tmp/gap.pyspy
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

GOAL_MS = 1.0   # issue 15 (issue 14's was 5 ms)
SIDE = 64


def gaps_from(timeline: list[dict], queued_until: float) -> list[float]:
    """Idle seconds between consecutive prompts, for prompts that ended after `queued_until`."""
    entries = sorted(timeline, key=lambda e: e["started"])
    out = []
    for prev, nxt in zip(entries, entries[1:]):
        if prev["ended"] > queued_until:
            out.append(nxt["started"] - prev["ended"])
    return out


async def submit_all(port: int, bodies: list[tuple[str, bytes]], connections: int = 8) -> None:
    conns = [await c.HttpConn(c.LOOPBACK, port).open() for _ in range(connections)]
    queue = list(enumerate(bodies))

    async def worker(conn: c.HttpConn) -> None:
        while queue:
            _, (client_id, body) = queue.pop(0)
            status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={client_id}", body,
                                                   {"Content-Type": "application/json"})
            assert status == 200, (status, answer)

    await asyncio.gather(*(worker(conn) for conn in conns))
    for conn in conns:
        conn.close()


async def upload_all(port: int, count: int) -> list[str]:
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    names = []
    for i in range(count):
        body, ctype = c.multipart("file", f"in{i}.png", c.png(SIDE, SIDE, tuple(random.getrandbits(8) for _ in range(3))))
        status, _, answer = await conn.request("POST", "/upload", body, {"Content-Type": ctype})
        assert status == 200, (status, answer)
        names.append(json.loads(answer)["file"])
    conn.close()
    return names


async def wait_completed(port: int, count: int, deadline: float) -> None:
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            _, _, body = await conn.request("GET", "/status")
            status = json.loads(body)
            if sum(b["completed"] + b["failed"] for b in status["backends"]) >= count:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"jobs not done after {deadline} s: {status}")
    finally:
        conn.close()


def one_run(args, variant: str, run: int, profile: Path | None) -> dict:
    with c.Stack(args, f"gap-{variant}") as stack:
        sim = stack.sim(f"sim-gap-{variant}", tick_seconds=0.01, timeline=True)
        bridge = stack.start_bridge(c.extra_settings(args), profile)
        total = args.jobs + args.warmup
        if variant == "invert":
            names = asyncio.run(upload_all(bridge.port, total))
            bodies = [{"workflow": "invert", "1/image": name} for name in names]
        else:
            bodies = [{"workflow": "blank-image", "1/width": SIDE, "1/height": SIDE, "1/color": random.getrandbits(24)}
                      for _ in range(total)]
        encoded = [(f"gap{run}-{i}", json.dumps(b).encode()) for i, b in enumerate(bodies)]
        asyncio.run(submit_all(bridge.port, encoded[:args.warmup]))
        asyncio.run(wait_completed(bridge.port, args.warmup, 60))
        asyncio.run(submit_all(bridge.port, encoded[args.warmup:]))
        queued_until = time.time()
        asyncio.run(wait_completed(bridge.port, total, 120))
        bridge.stop()
        sim.stop()
        timeline = [e for e in sim.timeline()]
    measured = [e for e in timeline if e["started"] >= timeline[args.warmup]["started"]] if len(timeline) > args.warmup else []
    gaps = gaps_from(measured, queued_until)
    if not gaps:
        raise RuntimeError("no gaps measured: did the jobs run?")
    runtimes = [e["ended"] - e["started"] for e in measured]
    return {"gaps_ms": [1000 * g for g in gaps], "median_ms": 1000 * c.median(gaps),
            "p90_ms": 1000 * c.percentile(gaps, 90), "max_ms": 1000 * max(gaps),
            "run_ms": 1000 * c.median(runtimes), "failed": sum(1 for e in measured if not e["success"])}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=5)
    p.add_argument("--variant", choices=["blank", "invert", "both"], default="both")
    p.add_argument("--jobs", type=int, default=100, help="measured jobs per run (default 100)")
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    variants = ["blank", "invert"] if args.variant == "both" else [args.variant]
    rows, notes = [], []
    for variant in variants:
        runs = []
        for r in range(args.runs):
            profile = c.profile_path(args) if (r == args.runs - 1 and variant == variants[-1]) else None
            res = c.quiet_run(lambda: one_run(args, variant, r, profile))
            runs.append(res)
            print(f"{variant} run {r + 1}/{args.runs}: idle median {res['median_ms']:.2f} ms, p90 {res['p90_ms']:.2f} ms, "
                  f"max {res['max_ms']:.1f} ms ({len(res['gaps_ms'])} gaps); prompt run time {res['run_ms']:.2f} ms",
                  file=sys.stderr, flush=True)
        med = c.spread([r["median_ms"] for r in runs])
        all_gaps = [g for r in runs for g in r["gaps_ms"]]
        rows.append({
            "figure": f"backend idle between queued jobs, {variant}",
            "goal": f"<= {GOAL_MS:g} ms median",
            "value": (f"{c.fmt_spread(med, ' ms')}; p90 {c.median([r['p90_ms'] for r in runs]):.2f} ms, "
                      f"all runs pooled: p50 {c.median(all_gaps):.2f} / p99 {c.percentile(all_gaps, 99):.2f} ms; "
                      f"= {med['median'] / c.median([r['run_ms'] for r in runs]):.1f} x the prompt's own run time "
                      f"({c.median([r['run_ms'] for r in runs]):.2f} ms)"),
            "met": med["median"] <= GOAL_MS, "number": med["median"], "data": {"median": med, "runs": [
                {k: v for k, v in r.items() if k != "gaps_ms"} for r in runs]}})
    notes.append(f"{args.jobs} jobs per run queued at once after {args.warmup} warm-up jobs; one simulator; "
                 "timestamps from the simulator's worker (comfysim --timeline); bridge at LOGGING_LEVEL="
                 f"{c.extra_settings(args).get('LOGGING_LEVEL', 'INFO')}; {c.settings_note(args)}")
    c.report("backend idle time between two queued jobs", args, rows, notes, extra={"client": "raw keep-alive HTTP"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
