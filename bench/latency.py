#!/usr/bin/env python3
"""Added latency per job: the same workflow straight to a simulated ComfyUI, and through the bridge.

Straight:  POST /upload/image, POST /prompt (client_id = our socket), wait on the simulator's /ws
           for `executing {node: null}` of that prompt, GET /history/{id}, GET /view.
Bridge:    POST /upload, then at once WS /ws?clientId= and POST /generate-based-workflow, wait for
           `closed`, GET /history?clientId= (the multipart with the file).
Jobs of the two paths alternate on one simulator, so both see the same machine state. Each job's
input is unique (its own image, or its own colour), so the simulator's cache never answers.

Figures per run: p50 and p99 of each path, "generate to results in hand" (the upload done before
the clock starts, as the issue defines it) and "upload to results" (the whole client sequence);
the added latency is bridge percentile - straight percentile. Reported: the median over runs,
with min and max. For scale, the bridge's own GET /healthz round trip is measured too.

    .venv/bin/python bench/latency.py                 # 5 runs x 200 jobs per path and workflow
    .venv/bin/python bench/latency.py --runs 1 --jobs 50 --profile /tmp/latency.pyspy
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from tornado import websocket  # noqa: E402

GOAL_P50_MS = 3.0
GOAL_P99_MS = 15.0
SIDE = 64   # pixels: the image work stays near zero


def invert_graph(image: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "direct_invert"}}}


def blank_graph(color: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1,
                                                         "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "direct_blank"}}}


class DirectClient:
    """A ComfyUI client the usual way: one websocket for all its prompts, keep-alive HTTP."""

    def __init__(self, sim: c.Sim):
        self.sim = sim
        self.http = c.HttpConn(c.LOOPBACK, sim.port)
        self.client_id = f"direct-{random.getrandbits(48):x}"
        self.waiters: dict[str, asyncio.Future] = {}
        self.ws = None
        self.reader = None

    async def open(self) -> None:
        await self.http.open()
        self.ws = await websocket.websocket_connect(f"ws://{self.sim.address}/ws?clientId={self.client_id}")
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.read_message()
            if message is None:
                return
            if isinstance(message, bytes):
                continue
            msg = json.loads(message)
            data = msg.get("data") or {}
            if msg.get("type") == "executing" and data.get("node") is None:
                waiter = self.waiters.pop(data.get("prompt_id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        self.ws.close()
        self.reader.cancel()
        self.http.close()

    async def job(self, graph_for, image: bytes | None) -> tuple[float, float]:
        """(upload to results, generate to results) in seconds."""
        t0 = time.perf_counter()
        name = None
        if image is not None:
            body, ctype = c.multipart("image", f"in-{random.getrandbits(40):x}.png", image,
                                      fields={"overwrite": "true"})
            status, _, answer = await self.http.request("POST", "/upload/image", body, {"Content-Type": ctype})
            assert status == 200, (status, answer)
            name = json.loads(answer)["name"]
        t1 = time.perf_counter()
        graph = graph_for(name)
        prompt_id = str(uuid.uuid4())   # current servers take only a canonical UUID
        done = self.waiters[prompt_id] = asyncio.get_running_loop().create_future()
        status, _, answer = await self.http.request(
            "POST", "/prompt", json.dumps({"prompt": graph, "client_id": self.client_id,
                                           "prompt_id": prompt_id}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, (status, answer)
        await asyncio.wait_for(done, 30)
        status, _, answer = await self.http.request("GET", f"/history/{prompt_id}")
        entry = json.loads(answer)[prompt_id]
        image_out = entry["outputs"][next(iter(entry["outputs"]))]["images"][0]
        query = urllib.parse.urlencode({"filename": image_out["filename"], "subfolder": image_out["subfolder"],
                                        "type": image_out["type"]})
        status, _, data = await self.http.request("GET", f"/view?{query}")
        assert status == 200 and data[:4] == b"\x89PNG", status
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


class BridgeClient:
    """A client of the bridge as its API says: upload, socket + generate, `closed`, history."""

    def __init__(self, bridge: c.BridgeProc):
        self.bridge = bridge
        self.http = c.HttpConn(c.LOOPBACK, bridge.port)
        self.gen_http = c.HttpConn(c.LOOPBACK, bridge.port)

    async def open(self) -> None:
        await self.http.open()
        await self.gen_http.open()

    async def close(self) -> None:
        self.http.close()
        self.gen_http.close()

    async def job(self, inputs_for, image: bytes | None) -> tuple[float, float]:
        client_id = f"lat-{random.getrandbits(64):x}"
        t0 = time.perf_counter()
        saved = None
        if image is not None:
            body, ctype = c.multipart("file", f"in-{random.getrandbits(40):x}.png", image)
            status, _, answer = await self.http.request("POST", "/upload", body, {"Content-Type": ctype})
            assert status == 200, (status, answer)
            saved = json.loads(answer)["file"]
        t1 = time.perf_counter()
        body = json.dumps(inputs_for(saved)).encode()
        connect = websocket.websocket_connect(f"ws://{c.LOOPBACK}:{self.bridge.port}/ws?clientId={client_id}")
        generate = self.gen_http.request("POST", f"/generate-based-workflow?clientId={client_id}", body,
                                         {"Content-Type": "application/json"})
        ws, (status, _, answer) = await asyncio.gather(connect, generate)
        assert status == 200, (status, answer)
        try:
            while True:
                message = await asyncio.wait_for(ws.read_message(), 30)
                assert message is not None, "socket closed before the job ended"
                msg = json.loads(message)
                if msg["status"] == "closed":
                    break
                assert msg["status"] != "error", msg
        finally:
            ws.close()
        status, headers, data = await self.http.request("GET", f"/history?clientId={client_id}")
        assert status == 200 and b"\x89PNG" in data[:1024], (status, data[:200])
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


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


async def one_run(stack: c.Stack, bridge: c.BridgeProc, workflows: list[str], jobs: int, warmup: int) -> dict:
    sim = stack.sims[0]
    direct, through = DirectClient(sim), BridgeClient(bridge)
    await direct.open()
    await through.open()
    out = {"healthz_rtt": await healthz_rtt(bridge)}
    try:
        for name in workflows:
            graph_for, inputs_for, needs_image = WORKFLOWS[name]
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
    finally:
        await direct.close()
        await through.close()
    return out


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=5)
    p.add_argument("--jobs", type=int, default=200, help="measured jobs per path, workflow and run (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured jobs first (default 20)")
    p.add_argument("--workflow", choices=["invert", "blank-image", "both"], default="both")
    args = p.parse_args()
    workflows = ["invert", "blank-image"] if args.workflow == "both" else [args.workflow]
    settings = c.extra_settings(args)
    runs = []
    for r in range(args.runs):
        profile = c.profile_path(args) if r == args.runs - 1 else None
        def run_once():
            with c.Stack(args, "latency") as stack:
                stack.sim("sim-lat", tick_seconds=0.01)
                bridge = stack.start_bridge(settings, profile)
                return asyncio.run(one_run(stack, bridge, workflows, args.jobs, args.warmup))
        result = c.quiet_run(run_once)
        runs.append(result)
        summary = []
        for name in workflows:
            d = [g for _, g in result[name]["direct"]]
            b = [g for _, g in result[name]["bridge"]]
            summary.append(f"{name}: direct p50 {1000 * c.median(d):.2f} ms, bridge p50 {1000 * c.median(b):.2f} ms")
        print(f"run {r + 1}/{args.runs}: " + "; ".join(summary), file=sys.stderr, flush=True)

    rows, extra = [], {"per_run": []}
    rtt = c.spread([1000 * run["healthz_rtt"] for run in runs])
    for name in workflows:
        for label, index in (("generate to results", 1), ("upload to results", 0)):
            if index == 0 and not WORKFLOWS[name][2]:
                continue
            stats = {}
            for q in (50, 99):
                direct = c.spread([1000 * c.percentile([t[index] for t in run[name]["direct"]], q) for run in runs])
                bridge = c.spread([1000 * c.percentile([t[index] for t in run[name]["bridge"]], q) for run in runs])
                added = c.spread([1000 * (c.percentile([t[index] for t in run[name]["bridge"]], q)
                                          - c.percentile([t[index] for t in run[name]["direct"]], q)) for run in runs])
                stats[q] = (direct, bridge, added)
            goal = {50: GOAL_P50_MS, 99: GOAL_P99_MS}
            for q in (50, 99):
                direct, bridge, added = stats[q]
                rows.append({
                    "figure": f"added latency p{q}, {name}, {label}",
                    "goal": f"<= {goal[q]:g} ms",
                    "value": (f"{c.fmt_spread(added, ' ms')}; straight p{q} {direct['median']:.2f} ms, "
                              f"bridge p{q} {bridge['median']:.2f} ms; added = "
                              f"{added['median'] / rtt['median']:.1f} x /healthz round trip"),
                    "met": added["median"] <= goal[q], "number": added["median"],
                    "data": {"added": added, "direct": direct, "bridge": bridge}})
    notes = [f"bridge GET /healthz round trip (keep-alive, idle): {c.fmt_spread(rtt, ' ms', 3)}",
             f"{args.jobs} measured jobs per path, workflow and run after {args.warmup} warm-up jobs; "
             f"{SIDE}x{SIDE} images; one simulator; bridge at LOGGING_LEVEL="
             f"{settings.get('LOGGING_LEVEL', 'INFO')}"]
    c.report("added latency per job: bridge vs straight to the simulator", args, rows, notes)
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
