"""Which backend runs which queued job: a pure decision over plain objects.

A backend here is anything with `address`, `up`, `load` (prompts sent to it and not yet
ended), `backlog(now)` (seconds of expected work ahead of its GPU), `gpu`
(affinity.GpuBelief: its loaded models and run times) and `node_classes` (empty while
unknown); a job anything with `alias`, `models` (files it loads), `class_types`,
`allowed_backends` (None = any) and `refused_by` (addresses of backends that refused its
prompt). Why a job waits also reads a backend's `state_since` (when it last went up or down)
and `stats.last_error`. Nothing here waits, calls or changes a backend: the service dispatches
what `plan` returns.

Rule: earliest expected completion. Each job, in the queue's order, goes where it would end
first: the work already committed to that backend, plus the job's expected run time there,
warm or cold (a cold one loads its models first). A backend holds up to `slots_per_backend`
prompts: beyond the one running, they wait in ComfyUI's own queue, so its GPU never waits for
the bridge between two jobs. When the best place is a full backend, the job stays queued for
it, and counts in that backend's committed work for the jobs behind it, which then go where
they end first. A cold placement that would push out of the GPU a model that jobs waiting
near the front of the queue need is charged that model's reload too (only in the comparison):
one job's gain is not paid for by the jobs behind it. Ties: warm first, then fewer prompts,
then round robin.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Iterable, Sequence

from .affinity import Estimator, held_after


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


@dataclass(frozen=True)
class Placement:
    job: object
    backend: object
    expected: float             # seconds the job should run there once started, loads included
    cold: frozenset = frozenset()   # its model files not expected loaded there when it starts

    @property
    def warm(self) -> bool:
        return not self.cold


# Jobs looked at beyond the free slots in one pass, waiting for a busy backend that would end
# them sooner: enough to see past a few such jobs, bounded so a long queue costs nothing.
LOOKAHEAD = 16
# A prompt takes the bridge this long, at most, to send once the one before it on a backend
# ended (seeing the end, a commit, POST /prompt). A backend whose runs are shorter gets more
# prompts waiting, so that what waits covers this time and its GPU still never idles.
REACTION_SECONDS = 0.025
EXTRA_WAITING_MAX = 4
# An idle GPU takes the job unless a busy one is expected to end it this much sooner (or it would
# have to load a model the busy one holds): estimates are means of runs that vary (steps,
# inputs), and a GPU left idle on their noise is lost work.
IDLE_MARGIN = 0.25
# Jobs at the front of the queue whose models count as wanted soon (a cold placement that
# would evict one of them is charged its reload).
WANTED_WINDOW = 64


class Scheduler:
    def __init__(self, slots_per_backend: int):
        self.slots_per_backend = slots_per_backend
        self._next = 0  # round-robin start: the backend after the last one chosen

    def capacity(self, backend) -> int:
        """Prompts the backend may hold: `slots_per_backend`, and with pipelining on, enough more
        to cover REACTION_SECONDS when its runs are shorter than that."""
        limit = self.slots_per_backend
        typical = backend.gpu.typical_run
        if limit < 2 or typical is None or typical >= REACTION_SECONDS:
            return limit
        return limit + min(EXTRA_WAITING_MAX, math.ceil(REACTION_SECONDS / max(typical, 1e-4)) - 1)

    def pick(self, job, backends: Sequence, now: float = 0.0):
        """The backend the job would be sent to now, or None (full or unable)."""
        placed = self.plan([job], backends, now)
        return placed[0].backend if placed else None

    def plan(self, queue: Iterable, backends: Sequence, now: float) -> list[Placement]:
        """Placements for the queued jobs that should start now, in queue order (`now`: the
        backends' clock, time.monotonic()).

        Its cost does not grow with the queue: it returns at once when no backend has room, places
        or keeps waiting no more than the free slots + LOOKAHEAD jobs, reads no more than
        WANTED_WINDOW jobs ahead, and once a job found no backend with room that may run it,
        passes over the jobs alike in what they may run on (`_constraints`). Every backend up is
        compared, busy ones too, once per kind of job (`_Choices`): for the next job of that kind
        only the backends this pass already gave a job are compared again."""
        up = [(i, b) for i, b in enumerate(backends) if b.up]
        limit = {i: self.capacity(b) for i, b in up}
        free = sum(limit[i] - b.load for i, b in up if b.load < limit[i])
        if not free:
            return []  # the common case under load: one pass over the backends, none over the queue
        jobs = iter(queue)
        front = list(islice(jobs, WANTED_WINDOW))
        estimate = Estimator(list(backends))
        state = _PassState(
            backends=backends, estimate=estimate, count=len(backends), now=now,
            wanted=Counter(m for job in front for m in job.models),   # models the front of the queue needs
            ready={i: now + b.backlog(now, estimate.expected) for i, b in up},   # when each would have done what it has
            load={i: b.load for i, b in up})
        choices: dict[tuple, _Choices] = {}
        placed: list[Placement] = []
        stuck: set[tuple] = set()
        budget = free + LOOKAHEAD
        for job in chain(front, jobs):
            kind = _constraints(job)
            if kind in stuck:
                continue
            alike = choices.get((kind, job.alias, job.models))
            if alike is None:
                alike = choices[(kind, job.alias, job.models)] = _Choices(self, job, up, state, limit)
            best = alike.best(job)
            if best is None or (state.load[best[1]] >= limit[best[1]] and not alike.room(limit)):
                stuck.add(kind)  # none that may run it has room now: none has for a job alike either
                continue
            key, index, run, cold = best
            budget -= 1
            state.wanted.subtract(job.models)
            state.ready[index] += run     # committed there, for the jobs behind it, placed or not
            state.planned.setdefault(index, []).append(job.models)
            state.touch(index)
            if state.load[index] < limit[index]:
                placed.append(Placement(job, backends[index], run, cold))
                state.load[index] += 1
                self._next = (index + 1) % state.count
                free -= 1
                if not free:
                    break
            if not budget:
                break
        return placed

    def entry(self, job, index: int, state: "_PassState") -> tuple:
        """(key, index, run, cold) of the job on that backend: the smallest key wins."""
        backend = state.backends[index]
        before = state.planned.get(index, ())
        held = (held_after(backend.gpu.models, before, backend.gpu.kept) if before else backend.gpu.models) \
            if job.models else ()
        cold = job.models.difference(held)
        run = state.estimate.expected(backend, job.alias, cold)
        end = state.ready[index] + run + self._eviction_cost(state.estimate, backend, before, held, cold, job,
                                                            state.wanted)
        return (end, bool(cold), state.load[index], (index - self._next) % state.count), index, run, cold

    @staticmethod
    def _eviction_cost(estimate, backend, planned: list, held, cold, job, wanted: Counter) -> float:
        """Loading `cold` there pushes the oldest of `held` out of its GPU: the reload of each
        pushed-out model that other jobs near the front of the queue want."""
        if not cold or not any(wanted[m] > 0 for m in held if m not in job.models):
            return 0.0
        pushed = set(held).difference(held_after(backend.gpu.models, [*planned, job.models], backend.gpu.kept))
        return sum(estimate.load_time(backend, m) for m in pushed if wanted[m] > 0)


@dataclass
class _PassState:
    """What one `plan` pass knows and changes as it places jobs."""
    backends: Sequence
    estimate: Estimator
    count: int
    now: float
    wanted: Counter
    ready: dict
    load: dict
    planned: dict = field(default_factory=dict)   # index -> models of the jobs placed or waiting there, in order
    touched: dict = field(default_factory=dict)   # index this pass gave a job -> how many
    log: list = field(default_factory=list)       # those indexes, in the order given

    def touch(self, index: int) -> None:
        self.touched[index] = self.touched.get(index, 0) + 1
        self.log.append(index)


class _Choices:
    """One kind of job's entries on every backend that may run it, computed once in a pass: the
    entries of backends the pass has not touched since stay right (their work, load and models
    are unchanged), so the next job of the kind compares the best of them with the touched ones."""

    def __init__(self, scheduler: Scheduler, job, up: list, state: _PassState, limit: dict):
        self.scheduler, self.state = scheduler, state
        able = [i for i, b in up if can_run(job, b)]
        self.able = set(able)
        self.entries = sorted(scheduler.entry(job, i, state) for i in able if i not in state.touched)
        self.idle = [e for e in self.entries if state.load[e[1]] == 0]   # GPUs with nothing to do
        self.next = self.next_idle = 0
        self.with_room = [i for i in able if state.load[i] < limit[i]]
        # Touched backends: their entries computed again once per touch, in a heap; an entry is
        # stale when its backend was touched again since.
        self.heap: list = []
        self.seen = 0       # how much of the pass's touch log is in the heap

    def best(self, job):
        """The entry that ends the job first; an idle GPU's instead when it ends it within
        IDLE_MARGIN of that without a load the best one would not make (a touched backend is
        never idle: it was given a job, or is full)."""
        state = self.state
        for index in state.log[self.seen:]:
            if index in self.able:
                key, _, run, cold = self.scheduler.entry(job, index, state)
                heapq.heappush(self.heap, (key, index, state.touched[index], run, cold))
        self.seen = len(state.log)
        while self.heap and self.heap[0][2] != state.touched[self.heap[0][1]]:
            heapq.heappop(self.heap)
        while self.next < len(self.entries) and self.entries[self.next][1] in state.touched:
            self.next += 1
        while self.next_idle < len(self.idle) and self.idle[self.next_idle][1] in state.touched:
            self.next_idle += 1
        candidates = self.entries[self.next:self.next + 1]
        if self.heap:
            key, index, _, run, cold = self.heap[0]
            candidates.append((key, index, run, cold))
        best = min(candidates, default=None)
        if best is None or state.load[best[1]] == 0:
            return best
        idle = self.idle[self.next_idle] if self.next_idle < len(self.idle) else None
        if (idle is not None and (best[3] or not idle[3])   # never a load for the margin's sake
                and idle[0][0] - state.now <= (best[0][0] - state.now) * (1 + IDLE_MARGIN)):
            return idle
        return best

    def room(self, limit: dict) -> bool:
        """Has any backend that may run this kind a free slot left?"""
        load = self.state.load
        return any(load[i] < limit[i] for i in self.with_room)

