#!/usr/bin/env python3
"""Comfy API v2 side by side: the SDK's simplest flow (`client.run(workflow)`, then the output's
bytes) against the bridge and against Comfy-Org's `comfy-api-proxy` 0.1.6, both in front of the
same simulated ComfyUI, in one run; then against the bridge with four simulated backends.

One job = EmptyImage (64x64, a colour of its own) -> SimSlowProgress (--steps ticks of the
simulator's --tick seconds: the job's execution time) -> SaveImage. The client is `comfy-sdk`
0.5.0, synchronous, unchanged: `run()` polls `urls.self` (0.5 s, then x1.5 up to 5 s), then
`outputs[0].to_bytes()` fetches the asset's content.
  latency     one client, --jobs jobs one after another per target: seconds per job
  throughput  --clients threads, each with its own client, submitting its next job when the last
              one's bytes are in hand, for --duration s: completed jobs/s; failed jobs counted
              (the proxy answers `expired` for a job that finished between its two backend reads)

    .venv/bin/pip install -r bench/requirements.txt -r requirements-dev.txt   # comfy-api-proxy, comfy-sdk
    .venv/bin/python bench/v2.py
    .venv/bin/python bench/v2.py --jobs 10 --clients 8 --duration 10
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import peer as pr  # noqa: E402

SIDE = 64


def graph(steps: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1,
                                                         "color": random.getrandbits(24)}},
            "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": steps}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v2bench"}}}


def client_for(base: str):
    from comfy_sdk import Comfy
    os.environ["COMFY_BASE_URL"] = base   # how the SDK is pointed at a deployment (read at construction)
    return Comfy(timeout=60.0)


def one_job(client, steps: int) -> int:
    job = client.run(client.workflows.from_json(graph(steps)))
    return len(job.outputs[0].to_bytes())


def latency(base: str, jobs: int, warmup: int, steps: int) -> dict:
    client = client_for(base)
    times, errors = [], []
    try:
        for i in range(warmup + jobs):
            began = time.perf_counter()
            try:
                one_job(client, steps)
            except Exception as exc:   # counted and shown; the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
                continue
            if i >= warmup:
                times.append(time.perf_counter() - began)
    finally:
        client.close()
    return {"times": times, "errors": errors}


def throughput(base: str, clients: int, duration: float, warmup: float, steps: int) -> dict:
    made = [client_for(base) for _ in range(clients)]
    ends, errors, stop = [], [], threading.Event()

    def worker(client) -> None:
        while not stop.is_set():
            try:
                one_job(client, steps)
                ends.append(time.perf_counter())
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
                time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, client) for client in made]
        time.sleep(warmup)
        t0 = time.perf_counter()
        time.sleep(duration)
        t1 = time.perf_counter()
        stop.set()
        concurrent.futures.wait(futures)
    for client in made:
        client.close()
    done = sum(1 for t in ends if t0 <= t <= t1)
    return {"jobs_per_s": done / (t1 - t0), "completed": done, "errors": errors}


def measure(base: str, args) -> dict:
    return {"latency": latency(base, args.jobs, args.warmup, args.steps),
            "throughput": throughput(base, args.clients, args.duration, args.loop_warmup, args.steps)}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=1)
    p.add_argument("--jobs", type=int, default=20, help="latency: measured jobs per target (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="latency: unmeasured jobs first (default 2)")
    p.add_argument("--clients", type=int, default=16, help="throughput: concurrent SDK clients (default 16)")
    p.add_argument("--duration", type=float, default=15.0, help="throughput: measured seconds (default 15)")
    p.add_argument("--loop-warmup", type=float, default=3.0, help="throughput: unmeasured seconds first (default 3)")
    p.add_argument("--steps", type=int, default=5, help="simulator ticks per job (default 5)")
    p.add_argument("--tick", type=float, default=0.05, help="simulator tick in seconds (default 0.05)")
    args = p.parse_args()
    try:
        import comfy_sdk  # noqa: F401
    except ImportError:
        raise SystemExit("comfy-sdk is not installed (.venv/bin/pip install -r requirements-dev.txt)")
    skipped = pr.peer_missing()
    if skipped:
        print(skipped, file=sys.stderr, flush=True)
    settings = c.extra_settings(args)
    results: dict[str, dict] = {}

    def one_backend():
        with c.Stack(args, "v2") as stack:
            sim = stack.sim("sim-v2", tick_seconds=args.tick)
            bridge = stack.start_bridge(settings)
            out = {"bridge, 1 backend": measure(bridge.base, args)}
            if not skipped:
                peer = stack.add(pr.PeerProc(stack.dir, sim))
                peer.wait_ready()
                out["comfy-api-proxy, 1 backend"] = measure(peer.base, args)
            return out

    def four_backends():
        with c.Stack(args, "v2-4") as stack:
            for i in range(4):
                stack.sim(f"sim-v2-{i}", tick_seconds=args.tick)
            bridge = stack.start_bridge(settings)
            return {"bridge, 4 backends": measure(bridge.base, args)}

    results.update(c.quiet_run(one_backend))
    results.update(c.quiet_run(four_backends))
    rows, notes = [], []
    for name, r in results.items():
        times = r["latency"]["times"]
        if times:
            rows.append({"figure": f"latency per job, {name}", "goal": "(figure)",
                         "value": f"p50 {1000 * c.median(times):.0f} ms, p90 {1000 * c.percentile(times, 90):.0f} ms",
                         "met": None, "client": "comfy-sdk", "number": c.median(times)})
        rows.append({"figure": f"throughput, {name}", "goal": "(figure)",
                     "value": f"{r['throughput']['jobs_per_s']:.2f} jobs/s ({args.clients} clients)",
                     "met": None, "client": "comfy-sdk", "number": r["throughput"]["jobs_per_s"]})
        failed = len(r["latency"]["errors"]) + len(r["throughput"]["errors"])
        if failed:
            first = (r["latency"]["errors"] + r["throughput"]["errors"])[0]
            notes.append(f"{name}: {failed} jobs failed in the SDK, e.g. {first}")
    one, four = results.get("bridge, 1 backend"), results.get("bridge, 4 backends")
    if one and four:
        ratio = four["throughput"]["jobs_per_s"] / max(1e-9, one["throughput"]["jobs_per_s"])
        rows.append({"figure": "throughput, bridge 4 backends vs 1", "goal": "grows with backends",
                     "value": f"{ratio:.2f} x", "met": ratio > 1.5, "client": "comfy-sdk", "number": ratio})
    notes.append(f"one job: EmptyImage {SIDE}x{SIDE} -> SimSlowProgress {args.steps} ticks of {args.tick:g} s -> "
                 f"SaveImage; latency: {args.jobs} jobs after {args.warmup}; throughput: {args.clients} SDK "
                 f"clients in threads, {args.duration:g} s after {args.loop_warmup:g} s")
    if skipped:
        notes.append(skipped)
    c.report("Comfy API v2 with comfy-sdk: bridge vs comfy-api-proxy (one backend), bridge with 4", args,
             rows, notes, extra={"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
