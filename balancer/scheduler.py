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
    able = [b for b in backends if can_run(job, b)]
    if any(b.up for b in able):
        return None
    return f"waiting for a backend: none is up ({why_down(able)})"


def given_up(job, backends, now: float, limit: float) -> bool:
    """QUEUE_TIMEOUT: queued longer than `limit`, and no backend that can run it has been up
    during that time (a long queue in front of working backends is not a reason)."""
    if now - job.created <= limit:
        return False
    return not any(b.up or now - b.state_since < limit for b in backends if can_run(job, b))


class Scheduler:
    def __init__(self, slots_per_backend: int):
        self.slots_per_backend = slots_per_backend
        self._next = 0  # round-robin start: the backend after the last one chosen

    def free_slots(self, backends: Sequence) -> int:
        limit = self.slots_per_backend
        return sum(limit - b.load for b in backends if b.up and b.load < limit)

    def pick(self, job, backends: Sequence, extra_load: dict | None = None):
        """The best backend for the job now, or None when none can take it."""
        limit, count = self.slots_per_backend, len(backends)
        best, best_key = None, None
        for index, backend in enumerate(backends):
            load = backend.load + (extra_load or {}).get(index, 0)
            if not backend.up or load >= limit or not can_run(job, backend):
                continue
            key = (load, backend.mean_duration(job.alias) or 0.0, (index - self._next) % count)
            if best_key is None or key < best_key:
                best, best_key = index, key
        if best is None:
            return None
        self._next = (best + 1) % count
        return backends[best]

    def plan(self, queue: Iterable, backends: Sequence) -> list[tuple[object, object]]:
        """(job, backend) pairs for the queued jobs that can start now, in queue order."""
        free = self.free_slots(backends)
        if not free:
            return []  # the common case under load: O(1) in the queue's length
        positions = {id(b): i for i, b in enumerate(backends)}
        extra: dict[int, int] = {}
        placed = []
        for job in queue:
            backend = self.pick(job, backends, extra)
            if backend is None:
                continue
            placed.append((job, backend))
            extra[positions[id(backend)]] = extra.get(positions[id(backend)], 0) + 1
            free -= 1
            if not free:
                break
        return placed
