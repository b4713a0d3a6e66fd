#!/usr/bin/env python3
"""Overload: a flood of generate requests far above what the backends can run, while a few
legit clients run whole jobs; do the backends stay busy, and is every refusal quick and proper?

Simulated backends run near-zero jobs: EmptyImage 64x64 (a colour of its own per job, so the
cache never answers) -> one SimSlowProgress tick of `--job-ms` (10 ms by default: the time a
GPU would take, spent waiting, not on this machine's two cores; 0 = no tick) -> SaveImage.
Each run has three phases on the same simulators:
  straight  the simulators driven directly, as a ComfyUI client does (POST /prompt with the
            client's websocket, wait for `executing {node: null}`, GET /history/{id}, GET /view),
            4 closed-loop clients per backend so that each always has a prompt waiting: the
            completed jobs/s the backends can do on this machine now.
  bridge    the bridge (MAX_QUEUE small, 8 by default) in front of them, 2 x `--legit`
            closed-loop clients and no flood: what the bridge completes unflooded.
  flood     a flooder process (32 aiohttp keep-alive connections) posts
            `POST /generate-based-workflow` for a fresh clientId each time and, refused, posts
            again at once (a naive or abusive client that ignores Retry-After; nobody fetches
            the flood's accepted jobs). Meanwhile `--legit` (4) closed-loop clients run whole
            jobs: websocket, generate (after a refusal they retry 20 ms later), wait for
            `closed`, GET /history.
Figures: completed jobs/s of the backends (from the simulators' own timeline) under flood / the
same backends straight (goal >= 0.95) and / the bridge unflooded, the flood's rate / the
backends' capacity (goal >= 10x), refusals/s, refusal latency p50/p99, that every refusal was a
503/429 with a `Retry-After` (and no request got a reset instead of its answer), the legit
clients' jobs, the bridge's log lines per refusal, and the CPU of the bridge, the flooder and
the simulators.

Client: aiohttp (bench/requirements.txt) for the flood, the legit clients and the straight
clients; the flooder is a process of its own, so it does not slow the legit clients' loop.

    .venv/bin/python bench/flood.py                       # 3 runs x (5 s straight, 5 s bridge, 10 s flood)
    .venv/bin/python bench/flood.py --runs 1 --seconds 5 --profile /tmp/flood.pyspy
    .venv/bin/python bench/flood.py --runs 1 --pad-kb 512   # half the flood's requests carry a large body
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

import aiohttp  # noqa: E402

GOAL_RATIO = 0.95     # completed jobs/s under flood / straight
GOAL_FLOOD = 10.0     # flood rate / the backends' capacity
SIDE = 64
DIRECT_PER_BACKEND = 4
LEGIT_RETRY = 0.02    # seconds a legit client waits after a refusal before it tries again
TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ALIAS = "flood-tick"


def job_graph(color: int) -> dict:
    """One job: a blank image of its own colour, one progress tick, saved."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1,
                                                         "color": color}},
            "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": 1}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "flood"}}}


def job_inputs() -> dict:
    return {"workflow": ALIAS, "1/color": random.getrandbits(24)}


def write_workflow(folder: Path) -> dict[str, str]:
    """The bench's workflow in a folder of its own; the bridge settings that point at it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ALIAS}.json").write_text(json.dumps(job_graph(0)))
    (folder / "aliases.json").write_text(json.dumps({ALIAS: {"file": f"{ALIAS}.json", "inputs": ["1/color"]}}))
    return {"WORKFLOW_DIR": str(folder), "WORKFLOW_ALIAS": str(folder / "aliases.json")}


def session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT))


# ----------------------------------------------------------------------------- straight

async def direct_client(http: aiohttp.ClientSession, address: str, stop_at: float) -> int:
    """Closed loop straight to one simulator; returns the jobs it completed."""
    client_id = f"direct-{random.getrandbits(48):x}"
    done = 0
    async with http.ws_connect(f"http://{address}/ws?clientId={client_id}") as ws:
        while time.monotonic() < stop_at:
            prompt_id = str(uuid.uuid4())
            async with http.post(f"http://{address}/prompt", json={"prompt": job_graph(random.getrandbits(24)), "client_id": client_id,
                                                                    "prompt_id": prompt_id}) as r:
                assert r.status == 200, (r.status, await r.text())
            while True:
                msg = await ws.receive(TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.TEXT or msg.type == aiohttp.WSMsgType.BINARY, msg
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if (data.get("type") == "executing" and data["data"].get("node") is None
                        and data["data"].get("prompt_id") == prompt_id):
                    break
            async with http.get(f"http://{address}/history/{prompt_id}") as r:
                entry = (await r.json())[prompt_id]
            image = next(iter(entry["outputs"].values()))["images"][0]
            async with http.get(f"http://{address}/view", params={k: image[k] for k in ("filename", "subfolder", "type")}) as r:
                assert r.status == 200 and (await r.read())[:4] == b"\x89PNG"
            done += 1
    return done


async def straight(sims: list[c.Sim], seconds: float) -> None:
    async with session(DIRECT_PER_BACKEND * len(sims) * 2) as http:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(direct_client(http, sim.address, stop_at)
                               for sim in sims for _ in range(DIRECT_PER_BACKEND)))


# ----------------------------------------------------------------------------- flood (its own process)

async def flood(port: int, connections: int, seconds: float, pad: int, tag: str) -> dict:
    """`connections` loops posting generate for fresh clientIds, retrying a refusal at once."""
    url = f"http://{c.LOOPBACK}:{port}/generate-based-workflow"
    # A colour of its own per request (an accepted job must not be answered by the cache).
    # With `pad`, every other connection pads its bodies: those are refused (400: not an input)
    # whenever the queue has room, while the others keep it full.
    def body_parts(padded: bool) -> tuple[bytes, bytes]:
        body = {**job_inputs(), "1/color": 1234567, **({"pad": "x" * pad} if padded else {})}
        head, _, tail = json.dumps(body).encode().partition(b"1234567")
        return head, tail
    refusal_times: list[float] = []
    statuses: dict[str, int] = {}
    bad: list[str] = []       # refusals without Retry-After, resets instead of an answer
    counter = 0

    async def loop(http: aiohttp.ClientSession, stop_at: float, padded: bool) -> None:
        nonlocal counter
        head, tail = body_parts(padded)
        while time.monotonic() < stop_at:
            counter += 1
            t = time.perf_counter()
            try:
                async with http.post(url, params={"clientId": f"fl{tag}-{counter}"},
                                     data=b"%s%d%s" % (head, counter % 2**24, tail),
                                     headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    status, retry_after = r.status, r.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                statuses["error"] = statuses.get("error", 0) + 1
                if len(bad) < 20:
                    bad.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status in (429, 503):
                refusal_times.append(elapsed)
                if not (retry_after or "").strip().isdigit() and len(bad) < 20:
                    bad.append(f"{status} without a Retry-After header")

    async with session(connections) as http:
        me = os.getpid()
        cpu0, t0 = cpu_seconds(me), time.perf_counter()
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(loop(http, stop_at, bool(pad) and i % 2 == 1) for i in range(connections)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(me) - cpu0
    return {"statuses": statuses, "elapsed": elapsed, "refusals": len(refusal_times),
            "refusal_p50_ms": 1000 * c.percentile(refusal_times, 50),
            "refusal_p99_ms": 1000 * c.percentile(refusal_times, 99),
            "without_retry_after": sum(1 for b in bad if "Retry-After" in b),
            "errors": statuses.get("error", 0), "bad_examples": bad[:5], "cpu": cpu / elapsed}


def _flood_process(out, port, connections, seconds, pad, tag) -> None:
    out.put(asyncio.run(flood(port, connections, seconds, pad, tag)))


# ----------------------------------------------------------------------------- legit clients

async def legit_client(http: aiohttp.ClientSession, port: int, stop_at: float, stats: dict) -> None:
    base = f"http://{c.LOOPBACK}:{port}"
    while time.monotonic() < stop_at:
        client_id = f"legit-{random.getrandbits(64):x}"
        t0 = time.perf_counter()
        async with http.ws_connect(f"{base}/ws?clientId={client_id}") as ws:
            while time.monotonic() < stop_at:
                async with http.post(f"{base}/generate-based-workflow", params={"clientId": client_id},
                                     json=job_inputs()) as r:
                    await r.read()
                    if r.status == 200:
                        break
                    assert r.status in (429, 503), (r.status, await r.text())
                    stats["refused"] += 1
                await asyncio.sleep(LEGIT_RETRY)
            else:
                return
            stats["accepted"] += 1
            t_accepted = time.perf_counter()
            while True:
                msg = await ws.receive(TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                status = json.loads(msg.data)["status"]
                assert status != "error", msg.data
                if status == "closed":
                    break
        async with http.get(f"{base}/history", params={"clientId": client_id}) as r:
            assert r.status == 200 and b"\x89PNG" in (await r.read())[:2048], r.status
        t_done = time.perf_counter()
        stats["done"] += 1
        stats["job_s"].append(t_done - t_accepted)
        stats["whole_s"].append(t_done - t0)


async def legit(port: int, clients: int, seconds: float) -> dict:
    stats = {"accepted": 0, "refused": 0, "done": 0, "job_s": [], "whole_s": []}
    async with session(clients * 3) as http:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(legit_client(http, port, stop_at, stats) for _ in range(clients)))
    return stats


# ----------------------------------------------------------------------------- one run

def completed_in(timeline: list[dict], t0: float, t1: float) -> int:
    return sum(1 for e in timeline if e["success"] and t0 <= e["ended"] < t1)


def busy_share(timeline: list[dict], t0: float, t1: float) -> float:
    busy = sum(max(0.0, min(e["ended"], t1) - max(e["started"], t0)) for e in timeline)
    return busy / (t1 - t0)


def one_run(args, run: int, profile: Path | None) -> dict:
    with c.Stack(args, "flood") as stack:
        settings = {"MAX_QUEUE": str(args.max_queue), "RESULT_TTL": "3600",
                    **write_workflow(stack.dir / "workflows"), **c.extra_settings(args)}
        sims = [stack.sim(f"sim-flood-{i}", tick_seconds=args.job_ms / 1000, timeline=True)
                for i in range(args.backends)]
        for sim in sims:
            sim.wait_ready()
        sim_cpu0 = sum(cpu_seconds(s.pid) for s in sims)
        s0 = time.time()
        asyncio.run(straight(sims, args.straight_seconds))
        s1 = time.time()
        sim_cpu_straight = (sum(cpu_seconds(s.pid) for s in sims) - sim_cpu0) / (s1 - s0)

        bridge = stack.start_bridge(settings, profile)
        asyncio.run(legit(bridge.port, 2, 1.0))  # warm-up: a few whole jobs through the bridge
        b0 = time.time()
        unflooded = asyncio.run(legit(bridge.port, 2 * args.legit, args.bridge_seconds))
        b1 = time.time()
        pid = bridge.python_pid
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        flooder = ctx.Process(target=_flood_process, args=(out, bridge.port, args.connections, args.seconds,
                                                            args.pad_kb * 1024, f"{run}-{random.getrandbits(24):x}"))
        log_lines0 = sum(1 for _ in open(bridge.log_path, "rb"))
        bridge_cpu0, sim_cpu0 = cpu_seconds(pid), sum(cpu_seconds(s.pid) for s in sims)
        f0 = time.time()
        flooder.start()
        legit_stats = asyncio.run(legit(bridge.port, args.legit, args.seconds))
        flooded = out.get(timeout=args.seconds + 60)
        flooder.join(30)
        f1 = time.time()
        bridge_cpu = (cpu_seconds(pid) - bridge_cpu0) / (f1 - f0)
        sim_cpu_flood = (sum(cpu_seconds(s.pid) for s in sims) - sim_cpu0) / (f1 - f0)
        log_lines = sum(1 for _ in open(bridge.log_path, "rb")) - log_lines0
        bridge.stop()
        for sim in sims:
            sim.stop()
        timelines = [sim.timeline() for sim in sims]
    # The flood's window: from the flooder's start to its end (f1 includes collecting its result).
    w1 = f0 + flooded["elapsed"]
    straight_rate = sum(completed_in(t, s0, s1) for t in timelines) / (s1 - s0)
    bridge_rate = sum(completed_in(t, b0, b1) for t in timelines) / (b1 - b0)
    flood_rate = sum(completed_in(t, f0, w1) for t in timelines) / (w1 - f0)
    refusals_s = flooded["refusals"] / flooded["elapsed"]
    requests_s = sum(v for k, v in flooded["statuses"].items() if k != "error") / flooded["elapsed"]
    return {
        "straight_jobs_s": straight_rate, "bridge_jobs_s": bridge_rate, "flood_jobs_s": flood_rate,
        "ratio": flood_rate / straight_rate, "ratio_bridge": flood_rate / bridge_rate,
        "busy_straight": c.median([busy_share(t, s0, s1) for t in timelines]),
        "busy_bridge": c.median([busy_share(t, b0, b1) for t in timelines]),
        "busy_flood": c.median([busy_share(t, f0, w1) for t in timelines]),
        "flood_requests_s": requests_s, "refusals_s": refusals_s, "flood_x": requests_s / straight_rate,
        "refusal_p50_ms": flooded["refusal_p50_ms"], "refusal_p99_ms": flooded["refusal_p99_ms"],
        "statuses": flooded["statuses"], "without_retry_after": flooded["without_retry_after"],
        "errors": flooded["errors"], "bad_examples": flooded["bad_examples"],
        "legit_done": legit_stats["done"], "legit_accepted": legit_stats["accepted"],
        "legit_refused": legit_stats["refused"],
        "legit_job_p50_ms": 1000 * c.percentile(legit_stats["job_s"], 50),
        "legit_whole_p50_ms": 1000 * c.percentile(legit_stats["whole_s"], 50),
        "unflooded_job_p50_ms": 1000 * c.percentile(unflooded["job_s"], 50),
        "bridge_cpu": bridge_cpu, "flooder_cpu": flooded["cpu"],
        "sim_cpu_straight": sim_cpu_straight, "sim_cpu_flood": sim_cpu_flood,
        "bridge_log_lines_per_refusal": log_lines / max(1, flooded["refusals"]),
    }


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--seconds", type=float, default=10.0, help="flood seconds per run (default 10)")
    p.add_argument("--straight-seconds", type=float, default=5.0, help="straight seconds per run (default 5)")
    p.add_argument("--bridge-seconds", type=float, default=5.0, help="unflooded bridge seconds per run (default 5)")
    p.add_argument("--job-ms", type=float, default=10.0, help="a job's tick on the simulator (default 10 ms)")
    p.add_argument("--backends", type=int, default=2, help="simulated backends (default 2)")
    p.add_argument("--connections", type=int, default=32, help="flood connections (default 32)")
    p.add_argument("--legit", type=int, default=4, help="legit closed-loop clients (default 4)")
    p.add_argument("--max-queue", type=int, default=8, help="the bridge's MAX_QUEUE (default 8)")
    p.add_argument("--pad-kb", type=int, default=0, help="extra KB in the bodies of every other flood connection (default 0)")
    p.add_argument("--quiet-wait", type=float, default=c.QUIET_WAIT,
                   help=f"seconds to wait for a quiet machine before each run (default {c.QUIET_WAIT:g})")
    p.add_argument("--max-foreign", type=float, default=c.MAX_FOREIGN,
                   help=f"cores of foreign load above which a run is repeated (default {c.MAX_FOREIGN:g})")
    args = p.parse_args()
    # On a machine shared with other work that does not stop: compare alternately, and say so.
    quiet = c.wait_quiet
    c.wait_quiet = lambda: quiet(max_wait=args.quiet_wait)
    c.MAX_FOREIGN = args.max_foreign
    c.raise_nofile()
    runs = []
    for r in range(args.runs):
        profile = c.profile_path(args) if r == args.runs - 1 else None
        res = c.quiet_run(lambda: one_run(args, r, profile))
        runs.append(res)
        print(f"run {r + 1}/{args.runs}: completed {res['flood_jobs_s']:.1f} jobs/s under flood vs "
              f"{res['straight_jobs_s']:.1f} straight (= {res['ratio']:.2f}); flood {res['flood_requests_s']:.0f} "
              f"req/s ({res['flood_x']:.1f} x capacity), statuses {res['statuses']}, refusal p50 "
              f"{res['refusal_p50_ms']:.1f} / p99 {res['refusal_p99_ms']:.1f} ms; legit {res['legit_done']} done, "
              f"{res['legit_refused']} refused; cpu bridge {100 * res['bridge_cpu']:.0f}%, flooder "
              f"{100 * res['flooder_cpu']:.0f}%, sims {100 * res['sim_cpu_flood']:.0f}% (straight "
              f"{100 * res['sim_cpu_straight']:.0f}%)", file=sys.stderr, flush=True)
        if res["bad_examples"]:
            print(f"  bad answers: {res['bad_examples']}", file=sys.stderr, flush=True)

    def med(key):
        return c.median([r[key] for r in runs])
    ratio = c.spread([r["ratio"] for r in runs])
    bad = sum(r["without_retry_after"] + r["errors"] for r in runs)
    rows = [
        {"figure": "completed jobs/s under flood / straight", "goal": f">= {GOAL_RATIO}",
         "value": (f"{c.fmt_spread(ratio)}; {med('flood_jobs_s'):.1f} vs {med('straight_jobs_s'):.1f} jobs/s on "
                   f"{args.backends} backends; backends busy {100 * med('busy_flood'):.0f}% vs "
                   f"{100 * med('busy_straight'):.0f}% of the time"),
         "met": ratio["median"] >= GOAL_RATIO, "number": ratio["median"], "data": ratio},
        {"figure": "completed jobs/s under flood / the bridge unflooded", "goal": "(1.0: the flood costs nothing)",
         "value": (f"{c.fmt_spread(c.spread([r['ratio_bridge'] for r in runs]))}; unflooded {med('bridge_jobs_s'):.1f} "
                   f"jobs/s with {2 * args.legit} closed-loop clients, backends busy {100 * med('busy_bridge'):.0f}%"),
         "met": None, "number": c.median([r["ratio_bridge"] for r in runs])},
        {"figure": "flood rate / the backends' capacity", "goal": f">= {GOAL_FLOOD:g} x",
         "value": f"{med('flood_x'):.1f} x ({med('flood_requests_s'):.0f} req/s, {med('refusals_s'):.0f} refusals/s)",
         "met": med("flood_x") >= GOAL_FLOOD, "number": med("flood_x")},
        {"figure": "refusals/s", "goal": "(as many as come)", "value": f"{med('refusals_s'):.0f}",
         "met": None, "number": med("refusals_s")},
        {"figure": "refusal latency p50", "goal": "quick", "value": f"{med('refusal_p50_ms'):.2f} ms",
         "met": None, "number": med("refusal_p50_ms")},
        {"figure": "refusal latency p99", "goal": "quick", "value": f"{med('refusal_p99_ms'):.2f} ms",
         "met": None, "number": med("refusal_p99_ms")},
        {"figure": "refusals without Retry-After, or a reset instead of an answer", "goal": "0",
         "value": f"{bad} (statuses per run: {[r['statuses'] for r in runs]})", "met": bad == 0, "number": bad},
        {"figure": "legit whole jobs done per run", "goal": "> 0",
         "value": (f"{med('legit_done'):.0f} (refused {med('legit_refused'):.0f} times first); accepted to results "
                   f"p50 {med('legit_job_p50_ms'):.1f} ms (unflooded {med('unflooded_job_p50_ms'):.1f} ms)"),
         "met": min(r["legit_done"] for r in runs) > 0, "number": med("legit_done")},
        {"figure": "bridge CPU under flood", "goal": "(cores)", "value": f"{med('bridge_cpu'):.2f} cores",
         "met": None, "number": med("bridge_cpu")},
        {"figure": "bridge log lines per refusal", "goal": "(rate lines)",
         "value": f"{med('bridge_log_lines_per_refusal'):.3f}", "met": None,
         "number": med("bridge_log_lines_per_refusal")},
    ]
    notes = [f"{args.backends} simulators, EmptyImage {SIDE}x{SIDE} + one {args.job_ms:g} ms tick per job; straight: {DIRECT_PER_BACKEND} aiohttp clients "
             f"per backend for {args.straight_seconds:g} s; flood: {args.connections} aiohttp connections in a "
             f"process of their own, retrying at once, for {args.seconds:g} s, with {args.legit} legit clients "
             f"(retry after {1000 * LEGIT_RETRY:.0f} ms); MAX_QUEUE={args.max_queue}"
             + (f"; half the flood connections' bodies padded by {args.pad_kb} KB" if args.pad_kb else ""),
             f"CPU: flooder {100 * med('flooder_cpu'):.0f}% of a core, simulators {100 * med('sim_cpu_flood'):.0f}% "
             f"under flood vs {100 * med('sim_cpu_straight'):.0f}% straight"]
    c.report("overload: a flood of submissions against the backends' throughput", args, rows, notes,
             {"runs": runs, "client": "aiohttp"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
