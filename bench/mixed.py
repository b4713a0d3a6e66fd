#!/usr/bin/env python3
"""Mixed checkpoints: model loads and makespan against the best plan computed offline.

Workload. Four simulators of equal speed (`--ticks` makes them unequal) run `text-to-image`
(CheckpointLoaderSimple -> KSampler of `3/steps` ticks -> VAEDecode 64x64 -> SaveImage), each
job its own `3/seed` so no simulator answers from its cache. The jobs use 3 checkpoints
(`--checkpoints`), in proportion to `--weights` (default equal): the exact counts are
fixed, their order is a random shuffle drawn from `--seed` (the same workload for every bridge
and run). The simulated GPU keeps the last K model files it loaded (`--kept`, default 1) and
loading one takes L = `--load-ratio` x the nominal run time (default 4 x steps x tick); the
bridge is told the same K (MODELS_KEPT_PER_SERVER). Every job's websocket is opened first,
then all jobs are queued at once; makespan = first generate request -> last `closed`. No
warm-up: the simulators start with nothing loaded and the bridge has observed nothing, so
learning the run times is part of what is measured.

Why K = 1. With K >= 3 every backend can keep all three checkpoints once it has loaded each,
so even a scheduler blind to models pays at most 3 loads per backend (12 in all) and the
figure would not tell schedulers apart. With K = 1 every change of checkpoint on a backend is
a load costing 4 job run times: only a scheduler that keeps each backend on one checkpoint
(or a few, in long runs) avoids paying it on most jobs. K = 2 lies in between.

Measured per backend b, from the simulators' own timelines (each prompt's start, end and the
model files it loaded): r_b = median run time of its prompts that loaded nothing (warm),
L_b = median run time of its prompts that loaded a model - r_b. (A backend with no warm or no
cold prompt takes the median over all backends.) Loads = the prompts' loaded files, summed.

Lower bound of the loads (the issue's figure): LB = max(M, B), M = checkpoints the workload
uses, B = backends (N >= B jobs). Every checkpoint must be loaded somewhere at least once, and
every backend that runs a job must load at least one checkpoint (it starts empty); a plan that
leaves a backend without jobs cannot come near the makespan below. So any schedule using all
backends loads at least LB times, whatever K.

The offline best plan. A plan gives backend b n_bm jobs of checkpoint m (sum over b of
n_bm = N_m, the workload's count). Backend b then needs at least
    T_b = r_b * sum_m n_bm + L_b * |{m : n_bm > 0}|
since each of its jobs runs r_b and each distinct checkpoint it serves is loaded at least once;
grouping its jobs by checkpoint reaches exactly that, for any K >= 1. So
    T* = min over plans of max_b T_b
is both a lower bound on the makespan of any schedule of this workload on these backends (for
these r_b and L_b, with a bridge that costs nothing) and the makespan of a plan that achieves it.
Computed exactly (bench/plans.py, checked against every assignment on small cases in
tests/test_bench_plans.py): for every support (which checkpoints S_b each backend serves, at
least one job of each: (2^M)^B choices, 4,096 here), the smallest T at which the jobs fit is
found by bisection over the values k * r_b + j * L_b. At a given T backend b takes
cap_b = floor((T - L_b * |S_b|) / r_b) jobs; one job of each of its pairs is given first, and
the rest fit exactly when, for every set Q of checkpoints, what Q still needs <= the remaining
cap_b of the backends serving some of Q (the supply-demand theorem for a transport problem).
The report gives T*, the fewest loads of a plan reaching T*, and per number of loads the best
makespan a plan with that many loads can have (what a load saved costs in time).

Today's scheduler (d3e38b5, no MODELS_KEPT_PER_SERVER: it is left out and said so) is measured
on the same workload with `--root /work/wt-old --sim-root .` (compare.py alternates the two).

    .venv/bin/python bench/mixed.py                        # 3 runs x 120 jobs
    .venv/bin/python bench/mixed.py --runs 1 --root /work/wt-old --sim-root .
    .venv/bin/python bench/compare.py --roots new=.,old=/work/wt-old --rounds 2 -- mixed.py --sim-root .
"""
from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from makespan import run_jobs  # noqa: E402
from plans import MAX_SUPPORTS, best_plans, lower_bound_loads, workload  # noqa: E402

GOAL_LOADS = 1.2        # loads / LB
GOAL_MAKESPAN = 1.1     # makespan / T*
CHECKPOINTS = ["v1-5-pruned-emaonly-fp16.safetensors", "sd_xl_base_1.0.safetensors", "dreamshaper_8.safetensors"]
SIDE = 64


def per_backend_times(timelines: list[list[dict]]) -> tuple[list[float], list[float]]:
    warm_all = [e["ended"] - e["started"] for t in timelines for e in t if e["success"] and not e["models_loaded"]]
    cold_all = [e["ended"] - e["started"] for t in timelines for e in t if e["success"] and e["models_loaded"]]
    pooled_r = c.median(warm_all) if warm_all else float("nan")
    pooled_cold = c.median(cold_all) if cold_all else float("nan")
    r, L = [], []
    for timeline in timelines:
        warm = [e["ended"] - e["started"] for e in timeline if e["success"] and not e["models_loaded"]]
        cold = [e["ended"] - e["started"] for e in timeline if e["success"] and e["models_loaded"]]
        rb = c.median(warm) if warm else pooled_r
        r.append(rb)
        L.append(max(0.0, (c.median(cold) if cold else pooled_cold) - rb))
    return r, L


def one_run(args, run: int, profile: Path | None) -> dict:
    order = workload(args.jobs, args.checkpoints, args.weights, args.seed)
    nominal = args.steps * min(args.ticks)
    load_seconds = args.load_ratio * nominal
    settings = {"MODELS_KEPT_PER_SERVER": str(args.kept), **c.extra_settings(args)}
    with c.Stack(args, "mixed") as stack:
        sims = [stack.sim(f"sim-{i}-tick{tick:g}", tick_seconds=tick, timeline=True, models_kept=args.kept,
                          model_load_seconds=load_seconds) for i, tick in enumerate(args.ticks)]
        bridge = stack.start_bridge(settings, profile)
        base_seed = random.getrandbits(40)
        bodies = [{"workflow": "text-to-image", "4/ckpt_name": ckpt, "3/steps": args.steps, "3/seed": base_seed + i,
                   "5/width": SIDE, "5/height": SIDE} for i, ckpt in enumerate(order)]
        makespan, _ = asyncio.run(run_jobs(bridge.port, bodies, run, prefix="mx"))
        bridge.stop()
        timelines = []
        for sim in sims:
            sim.stop()
            timelines.append(sim.timeline())
    counts = [order.count(ckpt) for ckpt in args.checkpoints]
    r, L = per_backend_times(timelines)
    frontier = best_plans(counts, r, L)
    optimum = min(frontier.values())
    optimum_loads = min(n for n, T in frontier.items() if T <= optimum + 1e-9)
    lb = lower_bound_loads(counts, len(args.ticks))
    backends = []
    for sim, timeline in zip(sims, timelines):
        by_model = {ckpt: 0 for ckpt in args.checkpoints}
        loads = 0
        for e in timeline:
            loads += len(e["models_loaded"])
        backends.append({"jobs": len(timeline), "loads": loads, "failed": sum(1 for e in timeline if not e["success"]),
                         "busy": sum(e["ended"] - e["started"] for e in timeline)})
        for e in timeline:
            for f in e["models_loaded"]:
                name = f.split("/", 1)[-1]
                if name in by_model:
                    by_model[name] += 1
        backends[-1]["loads_by_model"] = by_model
    loads = sum(b["loads"] for b in backends)
    return {"makespan": makespan, "loads": loads, "lb": lb, "optimum": optimum, "optimum_loads": optimum_loads,
            "frontier": frontier, "r": r, "L": L, "counts": counts, "backends": backends,
            "loads_ratio": loads / lb, "makespan_ratio": makespan / optimum,
            "failed": sum(b["failed"] for b in backends)}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=3)
    p.add_argument("--jobs", type=int, default=120)
    p.add_argument("--checkpoints", type=lambda s: s.split(","), default=CHECKPOINTS,
                   help="checkpoint files the jobs use (comma-separated; default the simulator's first three)")
    p.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="share of each checkpoint (default equal)")
    p.add_argument("--seed", type=int, default=15, help="seed of the jobs' order (default 15: same workload each run)")
    p.add_argument("--steps", type=int, default=20, help="KSampler ticks per job (default 20)")
    p.add_argument("--ticks", type=lambda s: [float(x) for x in s.split(",")], default=[0.01] * 4,
                   help="tick seconds of each simulator (default 0.01 x 4)")
    p.add_argument("--load-ratio", type=float, default=4.0, help="load time / nominal run time (default 4)")
    p.add_argument("--kept", type=int, default=1,
                   help="model files a simulated GPU keeps, and the bridge's MODELS_KEPT_PER_SERVER (default 1)")
    args = p.parse_args()
    args.weights = args.weights or [1.0] * len(args.checkpoints)
    if len(args.weights) != len(args.checkpoints):
        raise SystemExit("--weights needs one value per checkpoint")
    if (2 ** len(args.checkpoints)) ** len(args.ticks) > MAX_SUPPORTS:
        raise SystemExit(f"{len(args.checkpoints)} checkpoints on {len(args.ticks)} backends: too many plans "
                         "for the exact offline computation")
    runs = []
    for r in range(args.runs):
        res = c.quiet_run(lambda: one_run(args, r, c.profile_path(args) if r == args.runs - 1 else None))
        runs.append(res)
        detail = "; ".join(f"backend {i}: {b['jobs']} jobs, {b['loads']} loads" for i, b in enumerate(res["backends"]))
        print(f"run {r + 1}/{args.runs}: makespan {res['makespan']:.2f} s, best plan {res['optimum']:.2f} s "
              f"({res['optimum_loads']} loads), ratio {res['makespan_ratio']:.3f}; loads {res['loads']} "
              f"(lower bound {res['lb']}); {detail}", file=sys.stderr, flush=True)
    loads = c.spread([r["loads_ratio"] for r in runs])
    mk = c.spread([r["makespan_ratio"] for r in runs])
    last = runs[-1]
    rows = [
        {"figure": f"model loads / lower bound, {args.jobs} jobs over {len(args.checkpoints)} checkpoints on "
                   f"{len(args.ticks)} backends, K={args.kept}",
         "goal": f"<= {GOAL_LOADS:g}",
         "value": (f"{c.fmt_spread(loads, '', 2)}; loads {c.median([r['loads'] for r in runs]):.0f} "
                   f"(runs: {', '.join(str(r['loads']) for r in runs)}), lower bound {last['lb']}; the best plan "
                   f"loads {last['optimum_loads']}"),
         "met": loads["median"] <= GOAL_LOADS, "number": loads["median"], "data": {"ratio": loads}},
        {"figure": "model loads (count)", "goal": f"(lower bound {last['lb']}, best plan {last['optimum_loads']})",
         "value": f"{c.median([r['loads'] for r in runs]):.0f}", "met": None,
         "number": c.median([r["loads"] for r in runs])},
        {"figure": "makespan / the offline best plan T*", "goal": f"<= {GOAL_MAKESPAN:g}",
         "value": (f"{c.fmt_spread(mk, '', 3)}; makespan {c.median([r['makespan'] for r in runs]):.2f} s, "
                   f"T* {c.median([r['optimum'] for r in runs]):.2f} s"),
         "met": mk["median"] <= GOAL_MAKESPAN, "number": mk["median"], "data": {"ratio": mk}},
    ]
    r_ms = ", ".join(f"{1000 * x:.0f}" for x in last["r"])
    L_ms = ", ".join(f"{1000 * x:.0f}" for x in last["L"])
    notes = [
        f"workload: counts per checkpoint {dict(zip(args.checkpoints, last['counts']))}, order shuffled with seed "
        f"{args.seed}; text-to-image {SIDE}x{SIDE}, 3/steps={args.steps}, ticks {','.join(f'{t:g}' for t in args.ticks)} s; "
        f"simulators --models-kept {args.kept} --model-load-seconds {args.load_ratio * args.steps * min(args.ticks):g}",
        f"measured (last run): warm run time r per backend {r_ms} ms, load time L {L_ms} ms "
        f"(L / r = {c.median(last['L']) / c.median(last['r']):.2f})",
        "best makespan per number of loads (last run): " + ", ".join(
            f"{n} loads {T:.2f} s" for n, T in last["frontier"].items() if n <= last["lb"] + 8),
        "per backend (last run): " + "; ".join(
            f"{i}: {b['jobs']} jobs, loads {b['loads']} ({', '.join(f'{k.rsplit(chr(46), 1)[0]} {v}' for k, v in b['loads_by_model'].items() if v)})"
            for i, b in enumerate(last["backends"])),
        c.settings_note(args, {"MODELS_KEPT_PER_SERVER": str(args.kept)}),
    ]
    if any(r["failed"] for r in runs):
        notes.append(f"FAILED prompts: {[r['failed'] for r in runs]}")
    c.report("mixed checkpoints: model loads and makespan against the offline best plan", args, rows, notes,
             extra={"client": "tornado websocket + raw keep-alive HTTP",
                    "runs": [{k: v for k, v in r.items() if k != "frontier"} | {"frontier": {str(k): v for k, v in r["frontier"].items()}} for r in runs]})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
