"""The bridge's queue of jobs waiting for a backend, in the order free slots should go.

Fair shares: each tenant (API key, `Job.tenant`) has its own line, and iterating the queue
goes round-robin over the tenants with waiting jobs, starting after the tenant served last
(`served`), so one tenant's 1,000 jobs do not starve another's 3. Within a tenant, a higher
`priority` goes first, then the oldest; a job moved back from a lost backend goes to the front
of its tenant's jobs of equal priority. A tenant at its running limit (`max_running`, read
through `running(tenant)`) is skipped: each pass counts the jobs it offered a tenant, since
the scheduler dispatches them only after the pass (one it leaves waiting holds that room
until the next pass, which any slot freed or job queued starts). Iteration is lazy (the
scheduler stops after a few jobs while 10,000 may wait); do not change the queue while
iterating it.

A job's place is found without walking the queue. Within one class (tenant, priority) each job
gets a ticket, increasing from the front to the back; the class holds every ticket between its
first and its last job's except the `holes` left by jobs taken out from the middle, so a place
in the class is the distance from the first ticket minus the holes before it. Across classes
and tenants the place follows from the counts (`position`).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from typing import Callable, Iterator

from .jobs import DEFAULT_TENANT


def _tenant_of(job) -> str:
    return getattr(job, "tenant", DEFAULT_TENANT)


def _priority_of(job) -> int:
    return getattr(job, "priority", 0)


class _Line:
    """One class's jobs (one tenant, one priority), oldest first, with tickets for places."""

    def __init__(self):
        self._jobs: deque = deque()
        self._ticket: dict = {}        # job -> its ticket
        self._holes: list[int] = []    # sorted tickets of jobs taken out between the first and the last

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self):
        return iter(self._jobs)

    def append(self, job) -> None:
        self._ticket[job] = self._ticket[self._jobs[-1]] + 1 if self._jobs else 0
        self._jobs.append(job)

    def push_front(self, job) -> None:
        self._ticket[job] = self._ticket[self._jobs[0]] - 1 if self._jobs else 0
        self._jobs.appendleft(job)

    def remove(self, job) -> None:
        ticket = self._ticket.pop(job)
        if job is self._jobs[0]:
            self._jobs.popleft()
            self._drop_holes_outside()
        elif job is self._jobs[-1]:
            self._jobs.pop()
            self._drop_holes_outside()
        else:
            self._jobs.remove(job)
            insort(self._holes, ticket)

    def position(self, job) -> int:
        """1 for the first job of the class."""
        ticket = self._ticket[job]
        return ticket - self._ticket[self._jobs[0]] - bisect_left(self._holes, ticket) + 1

    def _drop_holes_outside(self) -> None:
        """Holes count only between the first and the last job."""
        holes = self._holes
        if not holes:
            return
        if not self._jobs:
            holes.clear()
            return
        first, last = self._ticket[self._jobs[0]], self._ticket[self._jobs[-1]]
        del holes[:bisect_left(holes, first)]
        del holes[bisect_left(holes, last):]


class _TenantJobs:
    """One tenant's waiting jobs: a line per priority, highest first."""

    def __init__(self):
        self.count = 0
        self.lines: dict[int, _Line] = {}
        self.order: list[int] = []     # the priorities that have jobs, negated and ascending (highest first)

    def line(self, priority: int) -> _Line:
        line = self.lines.get(priority)
        if line is None:
            line = self.lines[priority] = _Line()
            insort(self.order, -priority)
        return line

    def drop_if_empty(self, priority: int) -> None:
        if not self.lines[priority]:
            del self.lines[priority]
            del self.order[bisect_left(self.order, -priority)]

    def __iter__(self) -> Iterator:
        for negated in self.order:
            yield from self.lines[-negated]

    def rank(self, job, priority: int) -> int:
        """How many of this tenant's jobs go before `job` (O(priority classes))."""
        ahead = 0
        for negated in self.order:
            if -negated == priority:
                return ahead + self.lines[priority].position(job) - 1
            ahead += len(self.lines[-negated])
        raise KeyError(job)


class JobQueue:
    def __init__(self, max_running: int = 0, running: Callable[[str], int] | None = None):
        """`max_running`: jobs a tenant may run at once (0 = no limit); `running(tenant)`: how
        many it runs now (the service counts them)."""
        self.max_running = max_running
        self._running = running
        self._tenants: dict[str, _TenantJobs] = {}
        self._ring: list[str] = []     # tenants with waiting jobs, sorted: the round-robin's order
        self._where: dict = {}         # job -> (tenant, priority) of its line
        self._count = 0
        self._last_served: str | None = None

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------------ changes
    def append(self, job) -> None:
        self._line_for(job).append(job)

    def push_front(self, job) -> None:
        """Before the tenant's jobs of the same priority (a job whose backend was lost)."""
        self._line_for(job).push_front(job)

    def remove(self, job) -> None:
        """Take the job out if it is there."""
        where = self._where.pop(job, None)
        if where is None:
            return
        tenant, priority = where
        jobs = self._tenants[tenant]
        jobs.lines[priority].remove(job)
        jobs.drop_if_empty(priority)
        jobs.count -= 1
        self._count -= 1
        if not jobs.count:
            del self._tenants[tenant]
            del self._ring[bisect_left(self._ring, tenant)]

    def served(self, tenant: str) -> None:
        """A slot went to one of `tenant`'s jobs: the next round-robin starts after it."""
        self._last_served = tenant

    def _line_for(self, job) -> _Line:
        if job in self._where:
            raise ValueError("the job is queued already")
        tenant, priority = _tenant_of(job), _priority_of(job)
        jobs = self._tenants.get(tenant)
        if jobs is None:
            jobs = self._tenants[tenant] = _TenantJobs()
            insort(self._ring, tenant)
        jobs.count += 1
        self._count += 1
        self._where[job] = (tenant, priority)
        return jobs.line(priority)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator:
        """The waiting jobs in the order free slots should go to them (see the module's doc)."""
        if len(self._ring) == 1 and not self.max_running:
            return iter(self._tenants[self._ring[0]])
        return self._round_robin()

    def _round_robin(self) -> Iterator:
        active = []   # [the tenant's jobs in its order, room left in this pass (None: no limit)]
        for tenant in self._pass_order():
            room = self._room(tenant)
            if room != 0:
                active.append([iter(self._tenants[tenant]), room])
        while active:
            still = []
            for entry in active:
                job = next(entry[0], None)
                if job is None:
                    continue
                yield job
                if entry[1] is not None:
                    entry[1] -= 1
                if entry[1] != 0:
                    still.append(entry)
            active = still

    def every_job(self) -> Iterator:
        """All waiting jobs, tenants at their limit included, in no particular order (upkeep)."""
        for jobs in list(self._tenants.values()):
            yield from jobs

    def waiting_of(self, tenant: str) -> int:
        jobs = self._tenants.get(tenant)
        return jobs.count if jobs is not None else 0

    def waiting_by_tenant(self) -> dict[str, int]:
        return {tenant: self._tenants[tenant].count for tenant in self._ring}

    def position(self, job) -> int | None:
        """1 for the next job to run: 1 + the jobs the round-robin offers before it. A job of a
        tenant at its running limit gets the place it has once its tenant may run again."""
        where = self._where.get(job)
        if where is None:
            return None
        tenant, priority = where
        rank = self._tenants[tenant].rank(job, priority)
        if len(self._ring) == 1:
            return rank + 1
        place = rank + 1
        before = True  # other tenants served before `tenant` in the round of `rank`
        for other in self._pass_order():
            if other == tenant:
                before = False
                continue
            offered = self._tenants[other].count
            room = self._room(other)
            if room is not None:
                offered = min(offered, room)
            place += min(offered, rank) + (1 if before and offered > rank else 0)
        return place

    def _pass_order(self) -> list[str]:
        """The tenants with waiting jobs, starting after the one served last."""
        ring = self._ring
        if self._last_served is None:
            return ring
        start = bisect_right(ring, self._last_served)
        return ring[start:] + ring[:start]

    def _room(self, tenant: str) -> int | None:
        if not self.max_running or self._running is None:
            return None
        return max(0, self.max_running - self._running(tenant))
