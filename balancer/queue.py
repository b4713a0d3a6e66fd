"""The bridge's queue of jobs waiting for a backend, oldest first; jobs moved back from a lost
backend go to the front."""
from __future__ import annotations

from collections import deque


class JobQueue:
    def __init__(self):
        self._jobs: deque = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self):
        return iter(self._jobs)

    def append(self, job) -> None:
        self._jobs.append(job)

    def push_front(self, job) -> None:
        self._jobs.appendleft(job)

    def remove(self, job) -> None:
        """Take the job out if it is there."""
        try:
            self._jobs.remove(job)
        except ValueError:
            pass

    def position(self, job) -> int | None:
        """1 for the next job to run."""
        return next((i for i, queued in enumerate(self._jobs, start=1) if queued is job), None)
