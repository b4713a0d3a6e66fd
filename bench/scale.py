#!/usr/bin/env python3
"""Scale of one bridge: many backends, a long queue, every backend busy and jobs flowing.

For each (backends, queued) pair: simulated servers run as a few farms (`python -m comfysim
--count N`, one process for many servers), the bridge starts with all of them, then

  idle     the bridge with every backend up and nothing to do (health probes and websockets
           only): its CPU and event-loop lag;
  enqueue  `--queued` jobs sent by 64 keep-alive clients, as fast as the bridge takes them;
  flow     once as many jobs ended as there are backends (all busy, jobs flowing), a window
           of `--window` seconds (shorter if the queue left would run dry before its end):
           jobs dispatched, bridge CPU per dispatched job, event-loop lag
           p99, the dispatcher's time per decision, and what clients see meanwhile (GET
           /execution-info of random queued jobs at `--poll-rate`, GET /status every 2 s).

Each job is 1 to 4 SimSlowProgress ticks (drawn per job, so the backends do not finish in
waves) on a tiny EmptyImage (its colour differs per job, so no cache hit); its mean run time is
backends / `--rate`, so every pair dispatches about `--rate` jobs/s and the per-job figures
compare across pairs. Event-loop lag and scheduling time come from the
bridge's own /metrics (`bridge_event_loop_lag_seconds`, `bridge_scheduler_*`): p99 is read from
the histogram's buckets (linear inside the bucket). Nobody fetches results (GET /history):
done jobs stay in memory, as they would for clients that collect them late.

    .venv/bin/python bench/scale.py                                   # 30 and 300 backends x 1,000 and 10,000 queued
    .venv/bin/python bench/scale.py --backends 300 --queued 10000 --profile /tmp/scale.pyspy
    .venv/bin/python bench/scale.py --backends 300 --queued 10000 --pinned-share 0.1   # a pinned workflow
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

GOAL_LAG_P99_MS = 50.0
CLIENTS = 64
ALIAS = "scale"
PINNED = "scale-pinned"   # the same workflow, allowed on a few backends only (--pinned-share)
MAX_STEPS = 4   # a job is 1..4 ticks, 2.5 on average
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": 2}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scale"}},
}


class Farm(c.Proc):
    """`python -m comfysim --count N`: N servers in one process; `addresses` once they listen."""

    def __init__(self, root: Path, workdir: Path, name: str, count: int, tick_seconds: float):
        self.ports_file = workdir / f"{name}.ports.json"
        argv = [c.PYTHON, "-m", "comfysim", "--count", str(count), "--port", "0", "--ports-file", str(self.ports_file),
                "--host", c.LOOPBACK, "--name", name, "--tick-seconds", repr(tick_seconds),
                "--data-dir", str(workdir / name), "--log-level", "WARNING"]
        super().__init__(name, argv, root, workdir / f"{name}.log")
        self.addresses: list[str] = []

    def wait_ready(self, deadline: float = 120.0) -> None:
        end = time.monotonic() + deadline
        while not self.ports_file.exists():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name}: no ports file after {deadline}s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.addresses = json.loads(self.ports_file.read_text())


class _Address:
    def __init__(self, address: str):
        self.address = address


# ----------------------------------------------------------------------------- /metrics

def parse_metrics(text: str) -> dict:
    """name -> value for plain samples; histogram buckets under (name, le)."""
    out: dict = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        if "{" in head:
            name, _, labels = head.partition("{")
            if name.endswith("_bucket") and 'le="' in labels:
                le = labels.split('le="', 1)[1].split('"', 1)[0]
                out[(name, float(le))] = number
                continue
            out[head] = number
        else:
            out[head] = number
    return out


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def histogram_quantile(after: dict, before: dict, name: str, q: float) -> tuple[float, float, int]:
    """(q-quantile, upper bound of the highest bucket used, count) of the observations between two scrapes."""
    bounds = sorted(key[1] for key in after if isinstance(key, tuple) and key[0] == f"{name}_bucket")
    cumulative = [after.get((f"{name}_bucket", le), 0) - before.get((f"{name}_bucket", le), 0) for le in bounds]
    total = cumulative[-1] if cumulative else 0
    if not total:
        return float("nan"), float("nan"), 0
    rank = q * total
    lower, below, value = 0.0, 0.0, bounds[-1]
    for le, count in zip(bounds, cumulative):
        if count >= rank:
            value = le if le == float("inf") else lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
            break
        lower, below = le, count
    worst = next((le for le, count in zip(bounds, cumulative) if count >= total), bounds[-1])
    return value, worst, int(total)


async def get(conn: c.HttpConn, path: str) -> tuple[int, bytes]:
    status, _, body = await conn.request("GET", path)
    return status, body


def scrape(port: int) -> dict:
    async def once():
        conn = await c.HttpConn(c.LOOPBACK, port).open()
        try:
            status, body = await get(conn, "/metrics")
        finally:
            conn.close()
        assert status == 200, status
        return parse_metrics(body.decode())
    return asyncio.run(once())


def status_of(port: int) -> dict:
    async def once():
        conn = await c.HttpConn(c.LOOPBACK, port).open()
        try:
            return json.loads((await get(conn, "/status"))[1])
        finally:
            conn.close()
    return asyncio.run(once())


def cpu_seconds(pid: int) -> float:
    return c.process_jiffies(pid) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- load

async def enqueue(port: int, client_ids: list[str], pinned_share: float) -> dict:
    conns = [await c.HttpConn(c.LOOPBACK, port).open() for _ in range(CLIENTS)]
    statuses: dict[int, int] = {}
    pending = iter(enumerate(client_ids))
    draw = random.Random(14)
    steps = [draw.randint(1, MAX_STEPS) for _ in client_ids]
    every = round(1 / pinned_share) if pinned_share else 0

    async def worker(conn):
        for index, client_id in pending:
            alias = PINNED if every and index % every == every - 1 else ALIAS
            body = json.dumps({"workflow": alias, "1/color": index % 0xFFFFFF, "2/steps": steps[index]}).encode()
            status, _, _ = await conn.request("POST", f"/generate-based-workflow?clientId={client_id}", body,
                                              {"Content-Type": "application/json"})
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(conn) for conn in conns))
    elapsed = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return {"rps": statuses.get(200, 0) / elapsed, "statuses": statuses, "seconds": elapsed}


async def watch(port: int, client_ids: list[str], seconds: float, poll_rate: float) -> dict:
    """What clients see during the window: GET /healthz every 20 ms (round trips: the lag seen
    from outside), /execution-info of random jobs, /status every 2 s."""
    polls: list[float] = []
    statuses: list[float] = []
    rtts: list[float] = []
    end = time.perf_counter() + seconds

    async def healthz():
        conn = await c.HttpConn(c.LOOPBACK, port).open()
        while time.perf_counter() < end:
            t = time.perf_counter()
            await get(conn, "/healthz")
            rtts.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
        conn.close()

    async def poller():
        conn = await c.HttpConn(c.LOOPBACK, port).open()
        pace = 1.0 / poll_rate
        next_at = time.perf_counter()
        while time.perf_counter() < end:
            t = time.perf_counter()
            await get(conn, f"/execution-info?clientId={random.choice(client_ids)}")
            polls.append(time.perf_counter() - t)
            next_at += pace
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        conn.close()

    async def status_reader():
        conn = await c.HttpConn(c.LOOPBACK, port).open()
        while time.perf_counter() < end:
            t = time.perf_counter()
            await get(conn, "/status")
            statuses.append(time.perf_counter() - t)
            await asyncio.sleep(2.0)
        conn.close()

    if not client_ids:
        await healthz()
        return {"rtts": rtts}
    await asyncio.gather(*([poller()] if poll_rate > 0 else []), status_reader(), healthz())
    return {"rtts": rtts,"poll_p50_ms": 1000 * c.median(polls) if polls else float("nan"),
            "poll_p99_ms": 1000 * c.percentile(polls, 99) if polls else float("nan"),
            "polls": len(polls), "status_max_ms": 1000 * max(statuses) if statuses else float("nan")}


# ----------------------------------------------------------------------------- one run

def one_run(args, backends: int, queued: int, run: int, profile: Path | None) -> dict:
    job_seconds = backends / args.rate
    with c.Stack(args, f"scale-{backends}-{queued}") as stack:
        workflows = stack.dir / "workflows"
        workflows.mkdir()
        (workflows / "scale.json").write_text(json.dumps(WORKFLOW))
        farms_n = max(1, min(args.farms, backends))
        sizes = [backends // farms_n + (1 if i < backends % farms_n else 0) for i in range(farms_n)]
        tick = job_seconds / ((1 + MAX_STEPS) / 2)
        # The simulators of this checkout whatever --root is: they are the harness, not what is measured.
        farms = [Farm(c.REPO, stack.dir, f"farm{i}", n, tick) for i, n in enumerate(sizes)]
        stack.sims.extend(farms)  # stopped, and their CPU counted as ours, by the Stack
        for farm in farms:
            farm.wait_ready()
        addresses = [_Address(a) for farm in farms for a in farm.addresses]
        entry = {"file": "scale.json", "inputs": ["1/color", "2/steps"]}
        pinned_to = [a.address for a in addresses[:args.pinned_backends]]
        (workflows / "aliases.json").write_text(json.dumps({ALIAS: entry, PINNED: {**entry, "backends": pinned_to}}))
        settings = {"MAX_QUEUE": str(queued + 1000), "RESULT_TTL": "3600",
                    "WORKFLOW_DIR": str(workflows), "WORKFLOW_ALIAS": str(workflows / "aliases.json"),
                    **c.extra_settings(args)}
        t_start = time.monotonic()
        bridge = stack.bridge = c.BridgeProc(stack.root, stack.dir, addresses, settings, profile)
        bridge.wait_ready(deadline=180.0)
        ready_seconds = time.monotonic() - t_start
        pid = bridge.python_pid

        # idle: every backend up, nothing queued
        time.sleep(1.0)
        m0, cpu0, t0 = scrape(bridge.port), cpu_seconds(pid), time.monotonic()
        idle_rtts = asyncio.run(watch(bridge.port, [], args.idle, 0))["rtts"]
        m1, cpu1, t1 = scrape(bridge.port), cpu_seconds(pid), time.monotonic()
        idle_lag, idle_worst, _ = histogram_quantile(m1, m0, "bridge_event_loop_lag_seconds", 0.99)
        idle_cpu = (cpu1 - cpu0) / (t1 - t0)

        client_ids = [f"scale-{run}-{i}" for i in range(queued)]
        sent = asyncio.run(enqueue(bridge.port, client_ids, args.pinned_share))

        # flow: wait until as many jobs ended as there are backends (the first round is over and
        # the backends, running jobs of different lengths, no longer finish together), then
        # measure a window that ends before the queue could run dry
        deadline = time.monotonic() + job_seconds * 3 + 60
        while True:
            st = status_of(bridge.port)
            done = sum(b["completed"] for b in st["backends"])
            if done >= backends:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} jobs of {backends} backends ended in time")
            time.sleep(0.5)
        queue_start = st["queue"]["length"]
        window = min(args.window, 0.6 * queue_start / args.rate)
        m0, cpu0, t0 = scrape(bridge.port), cpu_seconds(pid), time.monotonic()
        completed0 = sum(b["completed"] for b in st["backends"])
        seen = asyncio.run(watch(bridge.port, client_ids, window, args.poll_rate))
        m1, cpu1, t1 = scrape(bridge.port), cpu_seconds(pid), time.monotonic()
        st = status_of(bridge.port)
        busy = sum(1 for b in st["backends"] if b["in_flight"] >= 1)
        completed = sum(b["completed"] for b in st["backends"]) - completed0
        # nan on a bridge without these series (an older checkout under --root)
        placed = delta(m1, m0, "bridge_scheduler_placed_total") if "bridge_scheduler_placed_total" in m1 else float("nan")
        runs = delta(m1, m0, "bridge_scheduler_runs_total")
        sched = delta(m1, m0, "bridge_scheduler_seconds_total")
        plan = delta(m1, m0, "bridge_scheduler_plan_seconds_total")
        lag, worst, probes = histogram_quantile(m1, m0, "bridge_event_loop_lag_seconds", 0.99)
        lag50, _, _ = histogram_quantile(m1, m0, "bridge_event_loop_lag_seconds", 0.50)
        rtts, idle_rtt = seen.pop("rtts"), c.median(idle_rtts)
        return {
            "backends": backends, "queued": queued, "job_seconds": job_seconds, "ready_seconds": ready_seconds,
            "idle_cpu": idle_cpu, "idle_lag_p99_ms": 1000 * idle_lag, "idle_lag_worst_ms": 1000 * idle_worst,
            "enqueue_rps": sent["rps"], "enqueue_statuses": sent["statuses"],
            "queue_start": queue_start, "queue_end": st["queue"]["length"], "busy_end": busy,
            "window": t1 - t0, "completed": completed, "placed": placed, "jobs_per_s": completed / (t1 - t0),
            "cpu": (cpu1 - cpu0) / (t1 - t0), "cpu_ms_per_job": 1000 * (cpu1 - cpu0) / max(completed, 1),
            "healthz_lag_p99_ms": 1000 * (c.percentile(rtts, 99) - idle_rtt),
            "healthz_lag_max_ms": 1000 * (max(rtts) - idle_rtt), "idle_rtt_ms": 1000 * idle_rtt,
            "lag_p99_ms": 1000 * lag, "lag_p50_ms": 1000 * lag50, "lag_worst_ms": 1000 * worst, "probes": probes,
            "sched_us_per_job": 1e6 * sched / max(placed, 1), "sched_us_per_run": 1e6 * sched / max(runs, 1),
            "plan_us_per_job": 1e6 * plan / max(placed, 1), "plan_us_per_run": 1e6 * plan / max(runs, 1),
            "sched_runs_per_job": runs / max(placed, 1), "sched_share": sched / (t1 - t0), **seen,
        }


def describe(r: dict) -> str:
    return (f"{r['backends']} backends, {r['queued']} queued: ready in {r['ready_seconds']:.1f} s, idle cpu "
            f"{100 * r['idle_cpu']:.1f}% lag p99 {r['idle_lag_p99_ms']:.1f} ms; enqueue {r['enqueue_rps']:.0f} req/s "
            f"{r['enqueue_statuses']}; flow {r['jobs_per_s']:.1f} jobs/s (queue {r['queue_start']} -> {r['queue_end']}, "
            f"{r['busy_end']} busy), cpu {100 * r['cpu']:.0f}% = {r['cpu_ms_per_job']:.2f} ms/job, lag p50 "
            f"{r['lag_p50_ms']:.1f} p99 {r['lag_p99_ms']:.1f} ms (worst <= {r['lag_worst_ms']:.0f} ms, {r['probes']} "
            f"probes; from outside: /healthz p99 +{r['healthz_lag_p99_ms']:.1f} ms, max +{r['healthz_lag_max_ms']:.0f} ms), scheduler {r['sched_us_per_job']:.0f} us/job (plan {r['plan_us_per_job']:.0f}), "
            f"{r['sched_us_per_run']:.0f} us/run (plan {r['plan_us_per_run']:.0f}), "
            f"{r['sched_runs_per_job']:.1f} runs/job ({100 * r['sched_share']:.1f}% of the time); execution-info "
            f"p50 {r['poll_p50_ms']:.1f} p99 {r['poll_p99_ms']:.1f} ms ({r['polls']} polls), /status max "
            f"{r['status_max_ms']:.0f} ms")


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=1)
    p.add_argument("--backends", default="30,300", help="comma-separated backend counts (default 30,300)")
    p.add_argument("--queued", default="1000,10000", help="comma-separated queue lengths (default 1000,10000)")
    p.add_argument("--rate", type=float, default=30.0, help="jobs/s the backends finish together (default 30)")
    p.add_argument("--window", type=float, default=15.0, help="measured seconds of flow (default 15)")
    p.add_argument("--idle", type=float, default=5.0, help="measured idle seconds (default 5)")
    p.add_argument("--poll-rate", type=float, default=20.0, help="GET /execution-info per second (default 20)")
    p.add_argument("--pinned-share", type=float, default=0.0,
                   help="share of the jobs whose workflow may run only on --pinned-backends backends "
                        "(e.g. 0.1: every 10th job); they pile up at the head of the queue (default 0)")
    p.add_argument("--pinned-backends", type=int, default=3)
    p.add_argument("--farms", type=int, default=2, help="simulator processes (default 2)")
    p.add_argument("--quiet-wait", type=float, default=c.QUIET_WAIT,
                   help=f"longest wait for a quiet machine before a run (default {c.QUIET_WAIT:g} s)")
    p.add_argument("--attempts", type=int, default=1, help="repeat a run with foreign load up to this often")
    args = p.parse_args()
    c.raise_nofile()
    c.wait_quiet = functools.partial(c.wait_quiet, max_wait=args.quiet_wait)
    pairs = [(int(b), int(q)) for b in args.backends.split(",") for q in args.queued.split(",")]
    rows, results = [], []
    for i, (backends, queued) in enumerate(pairs):
        runs = []
        for r in range(args.runs):
            profile = c.profile_path(args) if (i == len(pairs) - 1 and r == args.runs - 1) else None
            res = c.quiet_run(lambda: one_run(args, backends, queued, r, profile), attempts=args.attempts)
            runs.append(res)
            print(describe(res), file=sys.stderr, flush=True)
        results.append(runs)
        tag = f"{backends} backends, {queued:,} queued" + (
            f", {100 * args.pinned_share:g}% pinned to {args.pinned_backends}" if args.pinned_share else "")
        lag = c.spread([x["lag_p99_ms"] for x in runs])
        rows += [
            {"figure": f"event-loop lag p99, {tag}, all busy, jobs flowing", "goal": f"<= {GOAL_LAG_P99_MS:g} ms",
             "value": f"{c.fmt_spread(lag, ' ms', 1)}; p50 {c.median([x['lag_p50_ms'] for x in runs]):.1f} ms",
             "met": lag["median"] <= GOAL_LAG_P99_MS, "number": lag["median"]},
            {"figure": f"event-loop lag p99 seen from outside (GET /healthz every 20 ms), {tag}",
             "goal": f"<= {GOAL_LAG_P99_MS:g} ms",
             "value": (f"{c.fmt_spread(c.spread([x['healthz_lag_p99_ms'] for x in runs]), ' ms', 1)} over the idle "
                       f"round trip ({c.median([x['idle_rtt_ms'] for x in runs]):.1f} ms); worst "
                       f"{c.median([x['healthz_lag_max_ms'] for x in runs]):.0f} ms"),
             "met": c.median([x["healthz_lag_p99_ms"] for x in runs]) <= GOAL_LAG_P99_MS,
             "number": c.median([x["healthz_lag_p99_ms"] for x in runs])},
            {"figure": f"scheduling time per dispatched job, {tag}", "goal": "flat in the queue's length",
             "value": (f"{c.fmt_spread(c.spread([x['sched_us_per_job'] for x in runs]), ' us', 0)} choosing and "
                       f"dispatching, of which choosing (Scheduler.plan) "
                       f"{c.median([x['plan_us_per_job'] for x in runs]):.0f} us; "
                       f"{c.median([x['sched_runs_per_job'] for x in runs]):.1f} runs/job"),
             "met": None, "number": c.median([x["sched_us_per_job"] for x in runs])},
            {"figure": f"bridge CPU per dispatched job, {tag}", "goal": "flat in backends and queue",
             "value": (f"{c.fmt_spread(c.spread([x['cpu_ms_per_job'] for x in runs]), ' ms', 2)} at "
                       f"{c.median([x['jobs_per_s'] for x in runs]):.1f} jobs/s"),
             "met": None, "number": c.median([x["cpu_ms_per_job"] for x in runs])},
            {"figure": f"bridge CPU idle, {backends} backends up", "goal": "small",
             "value": f"{c.fmt_spread(c.spread([100 * x['idle_cpu'] for x in runs]), '% of a core', 1)}",
             "met": None, "number": c.median([100 * x["idle_cpu"] for x in runs])},
            {"figure": f"GET /execution-info p99 during the flow, {tag}", "goal": "small",
             "value": f"{c.fmt_spread(c.spread([x['poll_p99_ms'] for x in runs]), ' ms', 1)}",
             "met": None, "number": c.median([x["poll_p99_ms"] for x in runs])},
            {"figure": f"enqueue rate, {tag} (64 clients)", "goal": "",
             "value": f"{c.fmt_spread(c.spread([x['enqueue_rps'] for x in runs]), ' req/s', 0)}",
             "met": None, "number": c.median([x["enqueue_rps"] for x in runs])},
        ]
    notes = [f"job run time = backends / {args.rate:g} s on average (1 to {MAX_STEPS} SimSlowProgress ticks), so every pair flows at about "
             f"{args.rate:g} jobs/s; {args.farms} simulator processes; window {args.window:g} s (at most 0.6 x what "
             f"the queue left lasts) once as many jobs ended as there are backends; idle {args.idle:g} s; "
             + (f"every {round(1 / args.pinned_share)}th job allowed on {args.pinned_backends} backends only; "
                if args.pinned_share else "")
             + "bridge at LOGGING_LEVEL="
             f"{c.extra_settings(args).get('LOGGING_LEVEL', 'INFO')}",
             "lag and scheduling time from the bridge's /metrics (lag probe every 50 ms; p99 interpolated in "
             "the histogram bucket); CPU from /proc of the bridge's process"]
    c.report("scale of one bridge: many backends, a long queue", args, rows, notes,
             extra={"results": results, "client": "raw keep-alive HTTP"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
