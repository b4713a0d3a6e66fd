"""The bridge's queue alone: order, places, and that finding a place does not walk the queue."""
from __future__ import annotations

import random
from collections import deque

from balancer.queue import JobQueue


class Job:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def test_places_follow_every_kind_of_change():
    rng = random.Random(14)
    queue, mirror = JobQueue(), []
    made = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.45 or not mirror:
            made += 1
            job = Job(f"j{made}")
            queue.append(job)
            mirror.append(job)
        elif op < 0.55:
            made += 1
            job = Job(f"j{made}")
            queue.push_front(job)
            mirror.insert(0, job)
        elif op < 0.8:
            job = mirror.pop(0)       # dispatched from the front
            queue.remove(job)
        elif op < 0.9:
            job = mirror.pop(rng.randrange(len(mirror)))  # cancelled anywhere
            queue.remove(job)
        else:
            job = mirror.pop()        # the newest cancelled
            queue.remove(job)
        queue.remove(Job("never queued"))  # harmless
        assert list(queue) == mirror
        assert len(queue) == len(mirror)
        for sample in rng.sample(mirror, min(5, len(mirror))):
            assert queue.position(sample) == mirror.index(sample) + 1
        if mirror:
            assert queue.position(mirror[0]) == 1 and queue.position(mirror[-1]) == len(mirror)
    assert queue.position(Job("gone")) is None


class CountingDeque(deque):
    walks = 0

    def __iter__(self):
        CountingDeque.walks += 1
        return super().__iter__()


def test_a_place_is_found_without_walking_the_queue():
    queue = JobQueue()
    queue._jobs = CountingDeque()
    jobs = [Job(str(i)) for i in range(10_000)]
    for job in jobs:
        queue.append(job)
    for job in jobs[:100]:           # the front moves on, as dispatches take jobs
        queue.remove(job)
    queue.remove(jobs[5000])         # and a cancel leaves a hole
    CountingDeque.walks = 0
    assert queue.position(jobs[100]) == 1
    assert queue.position(jobs[4999]) == 4900
    assert queue.position(jobs[5001]) == 4901
    assert queue.position(jobs[-1]) == 9899
    assert CountingDeque.walks == 0
