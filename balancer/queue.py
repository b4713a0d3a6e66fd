"""The bridge's queue of jobs waiting for a backend, oldest first; jobs moved back from a lost
backend go to the front.

A job's place is found without walking the queue (clients ask for it while 10,000 wait): each
job gets a ticket, increasing from the front to the back; the queue holds every ticket between
the first and the last job's except the `holes` left by jobs taken out from the middle. So a
place is the distance from the first ticket minus the holes before it.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque


class JobQueue:
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
        """Take the job out if it is there."""
        ticket = self._ticket.pop(job, None)
        if ticket is None:
            return
        if job is self._jobs[0]:
            self._jobs.popleft()
            self._drop_holes_outside()
        elif job is self._jobs[-1]:
            self._jobs.pop()
            self._drop_holes_outside()
        else:
            self._jobs.remove(job)
            insort(self._holes, ticket)

    def position(self, job) -> int | None:
        """1 for the next job to run."""
        ticket = self._ticket.get(job)
        if ticket is None:
            return None
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
