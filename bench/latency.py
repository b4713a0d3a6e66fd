#!/usr/bin/env python3
"""Added latency per job: the same workflow straight to a simulated ComfyUI, and through the bridge,
timed with each of the clients in `bench/clients.py`.

Straight:  POST /upload/image, POST /prompt (client_id = the client's one websocket), wait on the
           simulator's /ws for `executing {node: null}` of that prompt, GET /history/{id}, GET /view.
Bridge:    POST /upload, then at once WS /ws?clientId= and POST /generate-based-workflow, wait for
           `closed`, GET /history?clientId= (the multipart with the file).
Clients (--clients, default all that are installed; a missing one is skipped with a line saying so):
  raw             tornado's websocket client + one bare keep-alive HTTP/1.1 socket (TCP_NODELAY)
  aiohttp-fresh   aiohttp, the bridge's websocket on a new TCP connection every job
  aiohttp-reused  aiohttp's default: the websocket upgrade reuses a kept-alive connection
  chromium        Debian's Chromium through Playwright, fetch() + WebSocket timed in the page
                  (blank-image only: the page uploads no file)
Jobs of the two paths alternate on one simulator, so both see the same machine state; the
clients run one after the other in each run. Each job's input is unique (its own image, or its
own colour), so the simulator's cache never answers.

Figures per client and run: p50 and p99 of each path, "generate to results in hand" (the upload
done before the clock starts, as the issue defines it) and "upload to results" (the whole client
sequence); the added latency is bridge percentile - straight percentile of the same client.
Reported: the median over runs, with min and max. For scale, the bridge's own GET /healthz round
trip is measured too.

    .venv/bin/pip install -r bench/requirements.txt  # aiohttp, playwright (Chromium: apt-get install chromium)
    .venv/bin/python bench/latency.py                 # 5 runs x 200 jobs per path, workflow and client
    .venv/bin/python bench/latency.py --runs 1 --jobs 50 --clients aiohttp-reused --profile /tmp/latency.pyspy
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
import clients as cl  # noqa: E402

GOAL_P50_MS = 3.0
GOAL_P99_MS = 10.0   # issue 14: p99 <= 10 ms added, fresh or reused connection
SIDE = 64   # pixels: the image work stays near zero


def invert_graph(image: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "direct_invert"}}}


def blank_graph(color: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1,
                                                         "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "direct_blank"}}}


WORKFLOWS = {
    # name: (direct graph builder, bridge inputs builder, needs an input image)
    "invert": (invert_graph, lambda saved: {"workflow": "invert", "1/image": saved}, True),
    "blank-image": (lambda _: blank_graph(random.getrandbits(24)),
                    lambda _: {"workflow": "blank-image", "1/width": SIDE, "1/height": SIDE,
                               "1/color": random.getrandbits(24)}, False),
}


async def healthz_rtt(bridge: c.BridgeProc, n: int = 300) -> float:
    conn = await c.HttpConn(c.LOOPBACK, bridge.port).open()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        status, _, _ = await conn.request("GET", "/healthz")
        times.append(time.perf_counter() - t)
    conn.close()
    return c.median(times)


async def run_client(kind: str, sim: c.Sim, bridge: c.BridgeProc, workflows: list[str], jobs: int,
                     warmup: int, browser) -> dict:
    direct, through = await cl.pair(kind, sim.address, bridge.base, browser)
    await direct.open()
    await through.open()
    out = {}
    try:
        for name in workflows:
            graph_for, inputs_for, needs_image = WORKFLOWS[name]
            if needs_image and kind == "chromium":
                continue
            times = {"direct": [], "bridge": []}
            for i in range(warmup + jobs):
                images = [c.png(SIDE, SIDE, tuple(random.getrandbits(8) for _ in range(3))) if needs_image else None
                          for _ in range(2)]
                order = [("direct", direct.job, graph_for), ("bridge", through.job, inputs_for)]
                if i % 2:
                    order.reverse()
                for (path, run, builder), image in zip(order, images):
                    full, gen = await run(builder, image)
                    if i >= warmup:
                        times[path].append((full, gen))
            out[name] = times
        upgrades = getattr(through, "upgrades", None)
        if upgrades is not None:
            out["upgrades"] = {"new": upgrades.new, "reused": upgrades.reused}
    finally:
        await direct.close()
        await through.close()
    return out


async def one_run(stack: c.Stack, bridge: c.BridgeProc, kinds: list[str], workflows: list[str], jobs: int,
                  warmup: int) -> dict:
    out = {"healthz_rtt": await healthz_rtt(bridge), "clients": {}}
    browser = await cl.Chromium().open() if "chromium" in kinds else None
    try:
        for kind in kinds:
            out["clients"][kind] = await run_client(kind, stack.sims[0], bridge, workflows, jobs, warmup, browser)
    finally:
        if browser is not None:
            await browser.close()
    return out


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=5)
    p.add_argument("--jobs", type=int, default=200,
                   help="measured jobs per path, workflow, client and run (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured jobs first (default 20)")
    p.add_argument("--workflow", choices=["invert", "blank-image", "both"], default="both")
    p.add_argument("--clients", default=",".join(cl.KINDS),
                   help=f"comma-separated, from {', '.join(cl.KINDS)} (default: all)")
    args = p.parse_args()
    workflows = ["invert", "blank-image"] if args.workflow == "both" else [args.workflow]
    kinds, skipped = [], []
    for kind in [k.strip() for k in args.clients.split(",") if k.strip()]:
        if kind not in cl.KINDS:
            p.error(f"--clients: unknown client {kind!r} (choose from {', '.join(cl.KINDS)})")
        reason = cl.missing(kind)
        if reason:
            print(f"skipping client {kind}: {reason}", file=sys.stderr, flush=True)
            skipped.append(f"client {kind} skipped: {reason}")
        else:
            kinds.append(kind)
    if not kinds:
        raise SystemExit("no client left to measure with")
    settings = c.extra_settings(args)
    runs = []
    for r in range(args.runs):
        profile = c.profile_path(args) if r == args.runs - 1 else None
        def run_once():
            with c.Stack(args, "latency") as stack:
                stack.sim("sim-lat", tick_seconds=0.01)
                bridge = stack.start_bridge(settings, profile)
                return asyncio.run(one_run(stack, bridge, kinds, workflows, args.jobs, args.warmup))
        result = c.quiet_run(run_once)
        runs.append(result)
        summary = []
        for kind in kinds:
            for name in workflows:
                if name not in result["clients"][kind]:
                    continue
                d = [g for _, g in result["clients"][kind][name]["direct"]]
                b = [g for _, g in result["clients"][kind][name]["bridge"]]
                summary.append(f"{kind} {name}: straight p50 {1000 * c.median(d):.2f} ms, "
                               f"bridge p50 {1000 * c.median(b):.2f} ms")
        print(f"run {r + 1}/{args.runs}: " + "; ".join(summary), file=sys.stderr, flush=True)

    rows = []
    rtt = c.spread([1000 * run["healthz_rtt"] for run in runs])
    goal = {50: GOAL_P50_MS, 99: GOAL_P99_MS}
    for kind in kinds:
        for name in workflows:
            if name not in runs[0]["clients"][kind]:
                continue
            for label, index in (("generate to results", 1), ("upload to results", 0)):
                if index == 0 and not WORKFLOWS[name][2]:
                    continue
                for q in (50, 99):
                    def pct(path):
                        return [1000 * c.percentile([t[index] for t in run["clients"][kind][name][path]], q)
                                for run in runs]
                    d, b = pct("direct"), pct("bridge")
                    direct, bridge = c.spread(d), c.spread(b)
                    added = c.spread([y - x for x, y in zip(d, b)])
                    rows.append({
                        "figure": f"added latency p{q}, {name}, {label}, client {kind}",
                        "goal": f"<= {goal[q]:g} ms", "client": kind,
                        "value": (f"{c.fmt_spread(added, ' ms')}; straight p{q} {direct['median']:.2f} ms, "
                                  f"bridge p{q} {bridge['median']:.2f} ms"),
                        "met": added["median"] <= goal[q], "number": added["median"],
                        "data": {"added": added, "direct": direct, "bridge": bridge}})
    notes = [f"bridge GET /healthz round trip (keep-alive, idle): {c.fmt_spread(rtt, ' ms', 3)}",
             f"{args.jobs} measured jobs per path, workflow, client and run after {args.warmup} warm-up jobs; "
             f"{SIDE}x{SIDE} images; one simulator; bridge at LOGGING_LEVEL="
             f"{settings.get('LOGGING_LEVEL', 'INFO')}",
             *skipped]
    for kind in kinds:
        counts = [run["clients"][kind].get("upgrades") for run in runs]
        if counts[0] is not None:
            notes.append(f"client {kind}: bridge websocket upgrades over a new TCP connection "
                         f"{sum(x['new'] for x in counts)}, over a reused kept-alive one "
                         f"{sum(x['reused'] for x in counts)} (aiohttp tracing, all runs)")
    c.report("added latency per job: bridge vs straight to the simulator, per client", args, rows, notes,
             extra={"per_run": runs})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
