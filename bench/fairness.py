#!/usr/bin/env python3
"""Fair shares between tenants: tenant A floods the queue, tenant B sends a few jobs one at a
time; how long does B wait?

Four simulators of equal speed run `text-to-image` with one checkpoint (loading it costs
nothing here: `--model-load-seconds 0`, this is about the queue, not the GPU), `3/steps` ticks,
each job its own `3/seed` so no simulator answers from its cache. Tenant A queues `--flood`
jobs at once over 8 keep-alive connections; as soon as all are accepted, tenant B sends
`--few` jobs one after the other: each opens its websocket, generates, waits for `closed`, and
only then sends the next. The run stops once B's last job has ended (A's remaining jobs are
dropped with the bridge): what is measured is B's wait, not A's drain.

B's wait = when the simulator's worker started running B's prompt (its own timeline, wall-clock
seconds) - when B's client sent the generate request (the same clock: one machine). It holds
the bridge's queue, the dispatch and any time the prompt waited in ComfyUI's own queue behind
another (pipelining). B's prompt is found through the bridge's job log (`clientId=... prompt=...`).
One job's run time = the median of end - start over every prompt the simulators ran. The figure
is B's p95 wait (linear between closest ranks, over its `--few` waits: with 5 waits, 0.2 x the
4th + 0.8 x the longest) / one job's run time.

Tenants: with a bridge that declares BRIDGE_API_KEYS (`--mode auto`, the default, picks it),
A and B have their own keys (BRIDGE_API_KEYS "a:KEY_A,b:KEY_B", sent as `Authorization:
Bearer`), and free slots go round-robin between tenants with waiting jobs. A bridge without
tenants (today's scheduler, d3e38b5) runs with one key for both (`--mode one-key` forces it):
its figure is B's wait in plain first come, first served.

    .venv/bin/python bench/fairness.py                       # 3 runs x (500 + 5) jobs
    .venv/bin/python bench/fairness.py --runs 1 --root /work/wt-old --sim-root .
    .venv/bin/python bench/compare.py --roots new=.,old=/work/wt-old --rounds 2 -- fairness.py --sim-root .
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from tornado import httpclient, websocket  # noqa: E402

GOAL_RUNS = 2.0       # B's p95 wait, in run times of one job
KEYS = {"a": "bench-key-a", "b": "bench-key-b"}
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SIDE = 64


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate_body(steps: int, seed: int) -> bytes:
    return json.dumps({"workflow": "text-to-image", "4/ckpt_name": CHECKPOINT, "3/steps": steps, "3/seed": seed,
                       "5/width": SIDE, "5/height": SIDE}).encode()


async def flood(port: int, jobs: int, steps: int, key: str, run: int) -> None:
    ids = [f"fa{run}-{i}-{random.getrandbits(32):x}" for i in range(jobs)]
    pending = list(range(jobs))
    seed = random.getrandbits(40)
    conns = [await c.HttpConn(c.LOOPBACK, port).open() for _ in range(8)]

    async def submit(conn) -> None:
        while pending:
            i = pending.pop(0)
            status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={ids[i]}",
                                                   generate_body(steps, seed + i),
                                                   {"Content-Type": "application/json", **auth(key)})
            assert status == 200, (status, answer)

    await asyncio.gather(*(submit(conn) for conn in conns))
    for conn in conns:
        conn.close()


async def one_at_a_time(port: int, jobs: int, steps: int, key: str, run: int) -> list[tuple[str, float]]:
    """B's jobs, each sent when the one before it ended: (clientId, wall-clock time it was sent)."""
    sent = []
    conn = await c.HttpConn(c.LOOPBACK, port).open()
    seed = random.getrandbits(40)
    for i in range(jobs):
        client_id = f"fb{run}-{i}-{random.getrandbits(32):x}"
        ws = await websocket.websocket_connect(httpclient.HTTPRequest(
            f"ws://{c.LOOPBACK}:{port}/ws?clientId={client_id}", headers=auth(key), request_timeout=30))
        await asyncio.wait_for(ws.read_message(), 30)   # connected
        sent.append((client_id, time.time()))
        status, _, answer = await conn.request("POST", f"/generate-based-workflow?clientId={client_id}",
                                               generate_body(steps, seed + i),
                                               {"Content-Type": "application/json", **auth(key)})
        assert status == 200, (status, answer)
        while True:
            message = await asyncio.wait_for(ws.read_message(), 600)
            if message is None:
                raise RuntimeError(f"B's socket {client_id} closed before its job ended")
            kind = json.loads(message)["status"]
            if kind == "closed":
                break
            if kind == "error":
                raise RuntimeError(f"B's job failed: {message}")
        ws.close()
    conn.close()
    return sent


async def workload(port: int, args, key_a: str, key_b: str, run: int) -> list[tuple[str, float]]:
    await flood(port, args.flood, args.steps, key_a, run)
    return await one_at_a_time(port, args.few, args.steps, key_b, run)


def prompts_by_client(log_text: str) -> dict[str, str]:
    """clientId -> the last prompt id the bridge's job lines name for it (a requeued job gets a new one)."""
    found = {}
    for client_id, prompt in re.findall(r"job \w+ clientId=(\S+) job=\S+ workflow=\S+ prompt=(\S+)", log_text):
        if prompt != "-":
            found[client_id] = prompt
    return found


def one_run(args, run: int, tenants: bool, profile: Path | None) -> dict:
    settings = ({"BRIDGE_API_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items())} if tenants
                else {"BRIDGE_API_KEY": KEYS["a"]})
    with c.Stack(args, "fairness") as stack:
        sims = [stack.sim(f"sim-{i}", tick_seconds=args.tick, timeline=True, model_load_seconds=0)
                for i in range(args.backends)]
        bridge = stack.start_bridge({**settings, **c.extra_settings(args)}, profile)
        key_b = KEYS["b"] if tenants else KEYS["a"]
        sent = asyncio.run(workload(bridge.port, args, KEYS["a"], key_b, run))
        bridge.stop()
        prompts = prompts_by_client(bridge.log_path.read_text(errors="replace"))
        started, durations = {}, []
        for sim in sims:
            sim.stop()
            for e in sim.timeline():
                started[e["prompt_id"]] = e["started"]
                if e["success"]:
                    durations.append(e["ended"] - e["started"])
    waits = []
    for client_id, at in sent:
        prompt = prompts.get(client_id)
        if prompt not in started:
            raise RuntimeError(f"B's job {client_id} (prompt {prompt}) is not in the simulators' timelines")
        waits.append(started[prompt] - at)
    run_time = c.median(durations)
    return {"waits": waits, "run_time": run_time, "p95": c.percentile(waits, 95),
            "ratio": c.percentile(waits, 95) / run_time, "prompts_run": len(durations)}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--flood", type=int, default=500, help="tenant A's jobs, queued at once (default 500)")
    p.add_argument("--few", type=int, default=5, help="tenant B's jobs, one at a time (default 5)")
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="KSampler ticks per job (default 10)")
    p.add_argument("--tick", type=float, default=0.01, help="simulator tick seconds (default 0.01)")
    p.add_argument("--mode", choices=["auto", "tenants", "one-key"], default="auto",
                   help="tenants (own keys), one-key (one key for both: first come, first served), or auto: "
                        "tenants when the measured bridge has BRIDGE_API_KEYS (default)")
    args = p.parse_args()
    known = c.bridge_setting_keys(Path(args.root).resolve()) or set()
    tenants = args.mode == "tenants" or (args.mode == "auto" and "BRIDGE_API_KEYS" in known)
    if tenants and "BRIDGE_API_KEYS" not in known:
        raise SystemExit(f"{args.root}: this bridge has no BRIDGE_API_KEYS (no tenants); use --mode one-key")
    mode = "tenants (BRIDGE_API_KEYS a, b)" if tenants else "one key for both (first come, first served)"
    runs = []
    for r in range(args.runs):
        res = c.quiet_run(lambda: one_run(args, r, tenants, c.profile_path(args) if r == args.runs - 1 else None))
        runs.append(res)
        print(f"run {r + 1}/{args.runs}: one job runs {1000 * res['run_time']:.0f} ms; B's waits "
              f"{', '.join(f'{1000 * w:.0f}' for w in res['waits'])} ms (p95 {res['ratio']:.2f} run times)",
              file=sys.stderr, flush=True)
    ratio = c.spread([r["ratio"] for r in runs])
    pooled = c.percentile([w for r in runs for w in r["waits"]], 95)
    run_time = c.median([r["run_time"] for r in runs])
    rows = [
        {"figure": f"B's p95 wait / one job's run time, A floods {args.flood}, B sends {args.few} one at a time, "
                   f"{args.backends} backends",
         "goal": f"<= {GOAL_RUNS:g}",
         "value": (f"{'tenants' if tenants else 'one key (first come, first served)'}: "
                   f"{c.fmt_spread(ratio, '', 2)} (pooled over runs: {pooled / run_time:.2f}; B's p95 "
                   f"{1000 * c.median([r['p95'] for r in runs]):.0f} ms, one job {1000 * run_time:.0f} ms)"),
         "met": ratio["median"] <= GOAL_RUNS, "number": ratio["median"], "data": {"ratio": ratio}},
    ]
    notes = [f"mode: {mode}; text-to-image {SIDE}x{SIDE} with 3/steps={args.steps} at tick {args.tick:g} s, one "
             "checkpoint, load time 0; B's wait: its generate request sent -> the simulator starting its prompt; "
             + c.settings_note(args),
             "B's waits per run (ms): " + "; ".join(", ".join(f"{1000 * w:.0f}" for w in r["waits"]) for r in runs)]
    c.report("fairness between tenants", args, rows, notes, extra={"client": "tornado websocket + raw keep-alive HTTP"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
