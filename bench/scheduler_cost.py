#!/usr/bin/env python3
"""The dispatcher's own cost, without processes: `Scheduler.plan` and `JobQueue.position` of a
checkout (--root) on plain objects, for a farm of backends and a long queue.

One pass = what the bridge does when one backend finishes a job: every backend busy but one,
the queue long, and (with --pinned) the first jobs of the queue allowed only on a backend that
is busy (a workflow pinned to a few servers piles up at the head). Timed in this process,
best of --repeat; the figure that matters is how a pass grows with the queue and the fleet.

    .venv/bin/python bench/scheduler_cost.py
    .venv/bin/python bench/compare.py --roots base=/work/main,fix=. --rounds 1 -- scheduler_cost.py
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


@dataclass
class Backend:
    """Speaks both schedulers: before issue 15 (mean_duration) and after (backlog, gpu)."""
    address: str
    up: bool = True
    load: int = 1
    node_classes: frozenset = frozenset()
    gpu: object = None

    def mean_duration(self, alias):
        return None

    def backlog(self, now, run_time=None):
        return 0.5 * self.load


@dataclass(eq=False)
class Job:
    alias: str = "scale"
    class_types: frozenset = frozenset({"EmptyImage", "SaveImage"})
    allowed_backends: tuple | None = None
    refused_by: dict = field(default_factory=dict)
    models: frozenset = frozenset({"sdxl.safetensors"})


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=1)
    p.add_argument("--backends", default="30,300")
    p.add_argument("--queued", default="1000,10000")
    p.add_argument("--pinned", type=int, default=100, help="jobs at the head allowed on a busy backend only")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.root).resolve()))
    from balancer.queue import JobQueue
    from balancer.scheduler import Scheduler
    try:
        from balancer.affinity import GpuBelief
    except ImportError:          # a checkout from before issue 15
        GpuBelief = None
    import inspect
    takes_now = "now" in inspect.signature(Scheduler.plan).parameters
    rows = []
    for n in (int(x) for x in args.backends.split(",")):
        for q in (int(x) for x in args.queued.split(",")):
            fleet = [Backend(f"10.0.{i // 250}.{i % 250}:8188") for i in range(n)]
            fleet[-1].load = 0  # one slot free
            for i, backend in enumerate(fleet):
                if GpuBelief is not None:
                    backend.gpu = GpuBelief(2)
                    backend.gpu.loaded(frozenset({"sdxl.safetensors" if i % 2 else "sd15.safetensors"}))
                    backend.gpu.record("scale", True, 1.0 if backend.load == 0 else 1.0 + i % 3)  # the free one ends it first
                    backend.gpu.record("scale", False, 5.0)
            pinned = tuple(fleet[0].address for _ in range(1))
            queue = JobQueue()
            jobs = [Job(allowed_backends=pinned if i < args.pinned else None) for i in range(q)]
            for job in jobs:
                queue.append(job)
            scheduler = Scheduler(1)

            def plan():
                placed = scheduler.plan(queue, fleet, time.monotonic()) if takes_now else scheduler.plan(queue, fleet)
                assert len(placed) == 1
            plan_s = best_of(args.repeat, plan)
            sample = jobs[::max(1, q // 100)]
            position_s = best_of(args.repeat, lambda: [queue.position(j) for j in sample]) / len(sample)
            tag = f"{n} backends, {q:,} queued, {args.pinned} pinned at the head"
            rows.append({"figure": f"one dispatch pass (Scheduler.plan), {tag}", "goal": "flat in the queue",
                         "value": f"{1e6 * plan_s:,.1f} us", "met": None, "number": 1e6 * plan_s})
            rows.append({"figure": f"one queue position (JobQueue.position), {n} backends, {q:,} queued",
                         "goal": "flat in the queue", "value": f"{1e6 * position_s:,.2f} us", "met": None,
                         "number": 1e6 * position_s})
    c.report("the dispatcher's own cost", args, rows,
             [f"best of {args.repeat}; plain objects, no IOLoop; every backend busy but one"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
