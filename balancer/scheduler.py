"""Which backend runs which queued job: a pure decision over plain objects.

A backend here is anything with `address`, `up`, `load` (slots its jobs hold),
`node_classes` (empty while unknown) and `mean_duration(alias)`; a job anything with
`alias`, `class_types`, `allowed_backends` (None = any) and `refused_by` (addresses of
backends that refused its prompt). Why a job waits also reads a backend's `state_since`
(when it last went up or down) and `stats.last_error`. Nothing here waits, calls or
changes a backend: the service dispatches what `plan` returns.

Rule: among healthy backends with a free slot that may and can run the job, the one with
the fewest running jobs, ties broken by the shortest recent duration of that workflow, then
round robin, so no backend idles while a job waits.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def can_run(job, backend) -> bool:
    """May and can this backend run the job (leaving aside whether it is free now)?"""
    if job.allowed_backends is not None and backend.address not in job.allowed_backends:
        return False
    if backend.address in job.refused_by:
        return False
    return not backend.node_classes or job.class_types <= backend.node_classes


def why_down(backends) -> str:
    """Each backend's address and why it cannot be reached, for a person."""
    return "; ".join(f"{b.address}: {b.stats.last_error or 'not connected yet'}" for b in backends)


def waiting_reason(job, backends) -> str | None:
    """Why a queued job cannot start while no backend that can run it is up, else None."""
    if any(b.up and can_run(job, b) for b in backends):
        return None  # the common case: stops at the first backend that is up and able
    able = [b for b in backends if can_run(job, b)]
    return f"waiting for a backend: none is up ({why_down(able)})"


def given_up(job, backends, now: float, limit: float) -> bool:
    """QUEUE_TIMEOUT: queued longer than `limit`, and no backend that can run it has been up
    during that time (a long queue in front of working backends is not a reason)."""
    if now - job.created <= limit:
        return False
    return not any(b.up or now - b.state_since < limit for b in backends if can_run(job, b))


def _constraints(job) -> tuple:
    """What `can_run` reads of a job: jobs alike in it fit on the same backends."""
    return job.allowed_backends, job.class_types, tuple(job.refused_by) if job.refused_by else ()


class Scheduler:
    def __init__(self, slots_per_backend: int):
        self.slots_per_backend = slots_per_backend
        self._next = 0  # round-robin start: the backend after the last one chosen

    def free_slots(self, backends: Sequence) -> int:
        limit = self.slots_per_backend
        return sum(limit - b.load for b in backends if b.up and b.load < limit)

    def pick(self, job, backends: Sequence):
        """The best backend for the job now, or None when none can take it."""
        chosen = self._choose(job, list(enumerate(backends)), len(backends), {})
        return None if chosen is None else chosen[1]

    def _choose(self, job, candidates: list, count: int, extra: dict):
        """The best of `candidates` ((index in the full list, backend) pairs, `extra` slots
        already promised per index) for the job; advances the round robin."""
        limit = self.slots_per_backend
        best, best_key = None, None
        for index, backend in candidates:
            load = backend.load + extra.get(index, 0)
            if not backend.up or load >= limit or not can_run(job, backend):
                continue
            key = (load, backend.mean_duration(job.alias) or 0.0, (index - self._next) % count)
            if best_key is None or key < best_key:
                best, best_key = (index, backend), key
        if best is None:
            return None
        self._next = (best[0] + 1) % count
        return best

    def plan(self, queue: Iterable, backends: Sequence) -> list[tuple[object, object]]:
        """(job, backend) pairs for the queued jobs that can start now, in queue order.

        Its cost does not grow with the number of backends busy or with the queue behind the
        jobs placed: only backends with a free slot are considered, and once a job found none
        that can take it, the jobs alike in what they may run on (`_constraints`) are passed over."""
        limit = self.slots_per_backend
        candidates = [(i, b) for i, b in enumerate(backends) if b.up and b.load < limit]
        free = sum(limit - b.load for _, b in candidates)
        if not free:
            return []  # the common case under load: one pass over the backends, none over the queue
        extra: dict[int, int] = {}
        placed = []
        stuck: set[tuple] = set()
        for job in queue:
            kind = _constraints(job)
            if kind in stuck:
                continue
            chosen = self._choose(job, candidates, len(backends), extra)
            if chosen is None:
                stuck.add(kind)  # loads only grow during a plan: none fits a job alike either
                continue
            index, backend = chosen
            placed.append((job, backend))
            extra[index] = extra.get(index, 0) + 1
            free -= 1
            if not free:
                break
        return placed
