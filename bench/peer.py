#!/usr/bin/env python3
"""A peer side by side: the bridge, Comfy-Org's own gateway `comfy-api-proxy`, and the backend
straight, all in front of the same simulated ComfyUI (`python -m comfysim`, `current` profile) and
driven by the same aiohttp client (`bench/clients.py`: keep-alive session, aiohttp's defaults).

Paths (one job = a 64x64 `blank-image` of its own colour, results in hand at the end):
  straight   POST /prompt on the client's one websocket, `executing {node: null}`, GET /history/{id},
             GET /view
  bridge     WS /ws?clientId= with POST /generate-based-workflow, `closed`, GET /history?clientId=
             (the websocket over a reused kept-alive connection, as aiohttp does by default); one
             bridge per --inflight value (MAX_INFLIGHT_PER_SERVER), all running during the run
  peer       comfy-api-proxy's v2 API: POST /api/v2/jobs, poll GET /api/v2/jobs/{id} (at once, then
             every --poll-ms) until `succeeded`, GET the output asset's content. Polling, not its
             SSE stream: the proxy serves at most 8 streams (429 past that), and a zero-time job
             that ends before the stream's ComfyUI websocket connects is reported only at the
             stream's 15 s keep-alive.
Two phases per run, each path in turn, the order rotating from block to block:
  latency      one client, jobs one after another (--jobs per path, in blocks of --block)
  closed loop  --clients clients, each submitting its next job when the last one's results are
               in hand, for --duration s after --loop-warmup s: accepted jobs/s (submissions
               answered 2xx), completed jobs/s, and CPU per completed job of the gateway (bridge or
               proxy process), of the simulator and of this load generator (/proc, in jiffies).
               The peer's loop is also run with each --loop-poll-ms pause: every poll costs the
               backend two requests (/history/{id}, /queue), so its rate depends on the pause.

    .venv/bin/pip install -r bench/requirements.txt   # aiohttp, and the peer: comfy-api-proxy==0.1.6
    .venv/bin/python bench/peer.py                     # 3 runs
    .venv/bin/python bench/peer.py --runs 1 --jobs 100 --duration 5 --inflight 1

Without comfy-api-proxy installed the peer is skipped (a line says so); straight and bridge
still run. The figures need aiohttp.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import clients as cl  # noqa: E402

SIDE = 64
GOAL_ADDED_P50_MS = 3.0
GOAL_ADDED_P99_MS = 10.0
GOAL_LOOP_RATIO = 0.98
PEER_PACKAGE = "comfy-api-proxy==0.1.6"


def peer_missing() -> str | None:
    if importlib.util.find_spec("comfy_api_proxy") is None:
        return (f"{PEER_PACKAGE} is not installed (.venv/bin/pip install -r bench/requirements.txt); "
                "the peer is skipped")
    return None


class PeerProc(c.Proc):
    """comfy-api-proxy in front of one simulator, on a port of its own (its defaults otherwise)."""

    def __init__(self, workdir: Path, sim: c.Sim):
        self.port = c.free_port()
        self.base = f"http://{c.LOOPBACK}:{self.port}"
        argv = [c.PYTHON, "-m", "comfy_api_proxy.cli", "run", "--comfyui", f"http://{sim.address}",
                "--host", c.LOOPBACK, "--port", str(self.port)]
        super().__init__("peer", argv, workdir, workdir / "peer.log")

    def wait_ready(self, deadline: float = 30.0) -> None:
        c.wait_http(f"{self.base}/api/v2/health", deadline, self)


def extra_bridge(stack: c.Stack, settings: dict, name: str) -> c.BridgeProc:
    """A second bridge in front of the same simulators, with its own data dir and log."""
    workdir = stack.dir / name
    workdir.mkdir()
    (workdir / "no.env").write_text("")
    bridge = c.BridgeProc(stack.root, workdir, stack.sims, settings)
    stack.add(bridge)
    bridge.wait_ready()
    return bridge


def blank_graph(_) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1,
                                                         "color": random.getrandbits(24)}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "peer_blank"}}}


def blank_inputs(_) -> dict:
    return {"workflow": "blank-image", "1/width": SIDE, "1/height": SIDE, "1/color": random.getrandbits(24)}


class Route:
    """One way to run a job: how to make a client, what it is given, which process is the gateway."""

    def __init__(self, name: str, make, builder, gateway: c.Proc | None):
        self.name, self.make, self.builder, self.gateway = name, make, builder, gateway


def jiffies(procs) -> int:
    return sum(c.process_jiffies(pid) for proc in procs for pid in proc.pids())


async def latency(paths: list[Route], jobs: int, block: int, warmup: int) -> dict:
    clients = {p.name: p.make() for p in paths}
    for client in clients.values():
        await client.open()
    times = {p.name: [] for p in paths}
    try:
        for p in paths:
            for _ in range(warmup):
                await clients[p.name].job(p.builder, None)
        for b in range(-(-jobs // block)):
            order = paths[b % len(paths):] + paths[:b % len(paths)]
            for p in order:
                for _ in range(min(block, jobs - b * block)):
                    _, gen = await clients[p.name].job(p.builder, None)
                    times[p.name].append(gen)
    finally:
        extras = {name: {"polls": client.polls, "expired_seen": client.expired_seen}
                  for name, client in clients.items() if isinstance(client, cl.AiohttpPeer)}
        for client in clients.values():
            await client.close()
    return {"times": times, "peer": extras}


async def closed_loop(p: Route, sim: c.Sim, n: int, warmup: float, duration: float) -> dict:
    clients = [p.make() for _ in range(n)]
    await asyncio.gather(*(client.open() for client in clients))
    ends: list[float] = []
    errors: list[str] = []
    stop = False

    async def worker(client) -> None:
        while not stop:
            try:
                await client.job(p.builder, None)
                ends.append(time.perf_counter())
            except Exception as exc:  # counted and shown; the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.01)

    tasks = [asyncio.ensure_future(worker(client)) for client in clients]
    try:
        await asyncio.sleep(warmup)
        gateway = [p.gateway] if p.gateway else []
        t0, acc0 = time.perf_counter(), sum(client.accepted for client in clients)
        g0, s0, me0 = jiffies(gateway), jiffies([sim]), c.process_jiffies(os.getpid())
        await asyncio.sleep(duration)
        t1, acc1 = time.perf_counter(), sum(client.accepted for client in clients)
        g1, s1, me1 = jiffies(gateway), jiffies([sim]), c.process_jiffies(os.getpid())
    finally:
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
        extras = {}
        if isinstance(clients[0], cl.AiohttpPeer):
            extras = {"polls": sum(x.polls for x in clients), "expired_seen": sum(x.expired_seen for x in clients),
                      "jobs": sum(x.accepted for x in clients)}
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    completed = sum(1 for t in ends if t0 <= t <= t1)
    per_job = 1000 / os.sysconf("SC_CLK_TCK") / max(1, completed)   # ms per job, per jiffy
    return {"accepted_per_s": (acc1 - acc0) / (t1 - t0), "completed_per_s": completed / (t1 - t0),
            "gateway_cpu_ms": (g1 - g0) * per_job if gateway else None, "sim_cpu_ms": (s1 - s0) * per_job,
            "client_cpu_ms": (me1 - me0) * per_job, "errors": len(errors), "first_error": errors[:1], **extras}


async def one_run(args, stack: c.Stack, paths: list[Route], loop_only: list[Route], rotate: int) -> dict:
    paths = paths[rotate % len(paths):] + paths[:rotate % len(paths)]
    out = {"latency": await latency(paths, args.jobs, args.block, args.warmup), "loop": {}}
    for p in paths + loop_only:
        out["loop"][p.name] = await closed_loop(p, stack.sims[0], args.clients, args.loop_warmup, args.duration)
    return out


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--jobs", type=int, default=200, help="latency: measured jobs per path and run (default 200)")
    p.add_argument("--block", type=int, default=50, help="latency: jobs of one path in a row (default 50)")
    p.add_argument("--warmup", type=int, default=20, help="latency: unmeasured jobs per path first (default 20)")
    p.add_argument("--clients", type=int, default=32, help="closed loop: concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=8.0, help="closed loop: measured seconds per path (default 8)")
    p.add_argument("--loop-warmup", type=float, default=2.0, help="closed loop: unmeasured seconds first (default 2)")
    p.add_argument("--poll-ms", type=float, default=2.0,
                   help="peer: pause between two polls of a job, after a first poll at once (default 2)")
    p.add_argument("--loop-poll-ms", default="100",
                   help="peer: further poll pauses measured in the closed loop only, comma-separated "
                        "(default 100: polling costs the backend, so the loop's rate depends on it)")
    p.add_argument("--inflight", default="1,2",
                   help="MAX_INFLIGHT_PER_SERVER of each bridge measured, comma-separated (default 1,2)")
    args = p.parse_args()
    if cl.missing("aiohttp-reused"):
        raise SystemExit(cl.missing("aiohttp-reused"))
    inflight = [int(x) for x in args.inflight.split(",") if x.strip()]
    loop_polls = [float(x) for x in args.loop_poll_ms.split(",") if x.strip()]
    skipped = peer_missing()
    if skipped:
        print(skipped, file=sys.stderr, flush=True)
    settings = c.extra_settings(args)
    runs = []
    for r in range(args.runs):
        profile = c.profile_path(args) if r == args.runs - 1 else None

        def run_once():
            with c.Stack(args, "peer") as stack:
                sim = stack.sim("sim-peer", tick_seconds=0.01)
                paths = [Route("straight", lambda: cl.AiohttpDirect(sim.address), blank_graph, None)]
                for k, n in enumerate(inflight):
                    wanted = {**settings, "MAX_INFLIGHT_PER_SERVER": str(n)}
                    bridge = (stack.start_bridge(wanted, profile) if k == 0
                              else extra_bridge(stack, wanted, f"bridge-{n}"))
                    paths.append(Route(f"bridge inflight {n}",
                                       lambda b=bridge: cl.AiohttpBridge(b.base, "reused"), blank_inputs, bridge))
                loop_only = []
                if not skipped:
                    peer = stack.add(PeerProc(stack.dir, sim))
                    peer.wait_ready()
                    paths.append(Route("peer", lambda: cl.AiohttpPeer(peer.base, args.poll_ms / 1000),
                                       blank_graph, peer))
                    loop_only = [Route(f"peer poll {ms:g} ms", lambda ms=ms: cl.AiohttpPeer(peer.base, ms / 1000),
                                       blank_graph, peer) for ms in loop_polls]
                return asyncio.run(one_run(args, stack, paths, loop_only, r))

        result = c.quiet_run(run_once)
        runs.append(result)
        lat = result["latency"]["times"]
        print(f"run {r + 1}/{args.runs}: " + "; ".join(
            f"{name} p50 {1000 * c.median(t):.2f} ms, {result['loop'][name]['completed_per_s']:.0f} jobs/s"
            for name, t in lat.items()), file=sys.stderr, flush=True)
    rows, notes = report_rows(runs, inflight)
    notes += [f"latency: {args.jobs} jobs per path and run in blocks of {args.block}, after {args.warmup} warm-up "
              f"jobs; closed loop: {args.clients} clients, {args.duration:g} s measured after "
              f"{args.loop_warmup:g} s; {SIDE}x{SIDE} blank-image, one simulator (tick 0.01 s, profile current)",
              f"client: aiohttp {cl.aiohttp.__version__} (one ClientSession per client, default connector); "
              f"peer polled at once, then every {args.poll_ms:g} ms",
              "all bridges and the peer run during the whole run (idle ones only hold their connections "
              "to the simulator)"]
    if skipped:
        notes.append(skipped)
    c.report("a peer side by side: bridge, comfy-api-proxy and straight, one simulated backend, aiohttp client",
             args, rows, notes, extra={"per_run": runs})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


def report_rows(runs: list[dict], inflight: list[int]) -> tuple[list[dict], list[str]]:
    names = list(runs[0]["latency"]["times"])
    names.sort(key=lambda n: (n != "straight", n))
    pct = {(n, q): [1000 * c.percentile(run["latency"]["times"][n], q) for run in runs]
           for n in names for q in (50, 99)}
    loop_names = [n for n in runs[0]["loop"] if n not in names]
    loop = {n: [run["loop"][n] for run in runs] for n in [*names, *loop_names]}
    peers = [n for n in [*names, *loop_names] if n.startswith("peer")]
    rows, notes = [], []
    added = {}
    for n in names:
        for q in (50, 99):
            s = c.spread(pct[(n, q)])
            value = f"{c.fmt_spread(s, ' ms')}"
            met = None
            if n != "straight":
                added[(n, q)] = c.spread([b - a for a, b in zip(pct[("straight", q)], pct[(n, q)])])
                value += f"; added vs straight {c.fmt_spread(added[(n, q)], ' ms')}"
            goal = "(reference)" if n == "straight" else "(figure)"
            if n.startswith("bridge"):
                limit = GOAL_ADDED_P50_MS if q == 50 else GOAL_ADDED_P99_MS
                goal = f"added <= {limit:g} ms"
                met = added[(n, q)]["median"] <= limit
            rows.append({"figure": f"latency p{q}, {n}", "goal": goal, "value": value, "met": met,
                         "client": "aiohttp", "number": s["median"]})
    if "peer" in names:
        for n in names:
            if n.startswith("bridge"):
                for q in (50, 99):
                    b, pe = added[(n, q)]["median"], added[("peer", q)]["median"]
                    rows.append({"figure": f"added p{q}: {n} vs peer", "goal": "bridge < peer",
                                 "value": f"{b:.2f} ms vs {pe:.2f} ms", "met": b < pe, "client": "aiohttp",
                                 "number": b - pe})
    straight_rate = [x["completed_per_s"] for x in loop["straight"]]
    for n in [*names, *loop_names]:
        comp = c.spread([x["completed_per_s"] for x in loop[n]])
        acc = c.spread([x["accepted_per_s"] for x in loop[n]])
        ratio = c.spread([x["completed_per_s"] / s for x, s in zip(loop[n], straight_rate)])
        met = ratio["median"] >= GOAL_LOOP_RATIO if n.startswith("bridge") else None
        rows.append({"figure": f"closed loop completed jobs/s, {n}",
                     "goal": f">= {GOAL_LOOP_RATIO:g} x straight" if n.startswith("bridge") else "(figure)",
                     "value": (f"{c.fmt_spread(comp, '/s', 1)}; {ratio['median']:.3f} x straight; "
                               f"accepted {acc['median']:.1f}/s"),
                     "met": met, "client": "aiohttp", "number": comp["median"]})
        cpu = [x["gateway_cpu_ms"] for x in loop[n]]
        sim_cpu = c.spread([x["sim_cpu_ms"] for x in loop[n]])
        me = c.spread([x["client_cpu_ms"] for x in loop[n]])
        text = f"simulator {sim_cpu['median']:.2f} ms/job, load generator {me['median']:.2f} ms/job"
        if cpu[0] is not None:
            g = c.spread(cpu)
            rows.append({"figure": f"gateway CPU per job (closed loop), {n}", "goal": "(figure)",
                         "value": f"{c.fmt_spread(g, ' ms')}; {text}", "met": None, "client": "aiohttp",
                         "number": g["median"]})
        else:
            notes.append(f"{n}: CPU per job: {text}")
        errors = sum(x["errors"] for x in loop[n])
        if errors:
            notes.append(f"{n}: {errors} failed jobs in the closed loops, e.g. {loop[n][0]['first_error'] or loop[n][-1]['first_error']}")
    for peer in peers:
        for n in names:
            if n.startswith("bridge"):
                b = c.median([x["gateway_cpu_ms"] for x in loop[n]])
                pe = c.median([x["gateway_cpu_ms"] for x in loop[peer]])
                rows.append({"figure": f"gateway CPU per job: {n} vs {peer}", "goal": "bridge <= peer",
                             "value": f"{b:.2f} ms vs {pe:.2f} ms", "met": b <= pe, "client": "aiohttp",
                             "number": b - pe})
    if "peer" in names:
        polls = sum(run["latency"]["peer"]["peer"]["polls"] for run in runs)
        jobs = sum(len(run["latency"]["times"]["peer"]) for run in runs)
        loops = ", ".join(f"{sum(x['polls'] for x in loop[n]) / max(1, sum(x['jobs'] for x in loop[n])):.1f} "
                          f"({n})" for n in peers)
        expired = (sum(run["latency"]["peer"]["peer"]["expired_seen"] for run in runs)
                   + sum(x.get("expired_seen", 0) for n in peers for x in loop[n]))
        notes.append(f"peer: {polls / max(1, jobs):.1f} polls per job one after another (warm-up included); "
                     f"in the closed loop {loops}; {expired} polls answered `expired` for a "
                     "job that then succeeded (the proxy reads /history/{id}, then /queue: a job ending between "
                     "the two is in neither)")
    return rows, notes


if __name__ == "__main__":
    sys.exit(main())
