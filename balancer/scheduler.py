"""Which backend runs which queued job: a pure decision over plain objects.

A backend here is anything with `address`, `up`, `load` (slots its jobs hold),
`node_classes` (empty while unknown) and `mean_duration(alias)`; a job anything with
`alias`, `class_types`, `allowed_backends` (None = any) and `refused_by` (addresses of
backends that refused its prompt). Nothing here waits, calls or
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
