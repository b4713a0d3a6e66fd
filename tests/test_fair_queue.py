"""The queue's fair shares, alone (no IOLoop): round-robin between tenants, priority and requeue
within a tenant, the running limit, and places that agree with the order."""
from __future__ import annotations

import itertools
import random

from balancer.queue import JobQueue, _Line


class Job:
    def __init__(self, name, tenant="default", priority=0):
        self.name, self.tenant, self.priority = name, tenant, priority

    def __repr__(self):
        return self.name


def fill(queue, tenant, count, priority=0):
    jobs = [Job(f"{tenant}{i}", tenant, priority) for i in range(count)]
    for job in jobs:
        queue.append(job)
    return jobs


def test_one_tenants_flood_does_not_starve_anothers_few():
    queue = JobQueue()
    flood = fill(queue, "a", 1000)
    few = fill(queue, "b", 3)
    first = list(itertools.islice(queue, 6))
    assert set(few) <= set(first)
    assert first == [flood[0], few[0], flood[1], few[1], flood[2], few[2]]
    assert [queue.position(job) for job in few] == [2, 4, 6]
    assert queue.position(flood[3]) == 7 and queue.position(flood[999]) == 1003
    assert len(queue) == 1003


def test_the_round_robin_starts_after_the_tenant_served_last():
    queue = JobQueue()
    a, b, c = fill(queue, "a", 3), fill(queue, "b", 3), fill(queue, "c", 1)
    assert list(queue)[:3] == [a[0], b[0], c[0]]
    queue.remove(a[0])
    queue.served("a")
    assert list(queue) == [b[0], c[0], a[1], b[1], a[2], b[2]]
    queue.remove(b[0])
    queue.served("b")
    assert list(queue)[:2] == [c[0], a[1]]
    queue.remove(c[0])
    queue.served("c")         # c has no job left: the round goes on from its place in the ring
    assert list(queue) == [a[1], b[1], a[2], b[2]]
    queue.served("bb")        # a tenant never seen: its place in the (sorted) ring still counts
    assert list(queue)[0] is a[1]


def test_one_tenant_and_no_priority_keeps_the_first_come_order():
    queue = JobQueue()
    jobs = fill(queue, "default", 5)
    queue.push_front(front := Job("front"))
    assert list(queue) == [front, *jobs]
    assert [queue.position(job) for job in [front, *jobs]] == [1, 2, 3, 4, 5, 6]


def test_priority_orders_a_tenants_own_jobs_only():
    queue = JobQueue()
    low = Job("a-low", "a", -5)
    plain = Job("a-plain", "a")
    high = [Job("a-high1", "a", 10), Job("a-high2", "a", 10)]
    other = Job("b-plain", "b")
    for job in (low, plain, other, *high):
        queue.append(job)
    assert list(queue) == [high[0], other, high[1], plain, low]
    # b's job keeps its turn in the round-robin: a's priorities do not pass other tenants.
    assert queue.position(other) == 2


def test_a_requeued_job_goes_to_the_front_of_its_tenant_before_equal_priority():
    queue = JobQueue()
    jobs = fill(queue, "a", 3)
    urgent = Job("a-urgent", "a", 1)
    queue.append(urgent)
    lost = Job("a-lost", "a")
    queue.push_front(lost)
    assert list(queue) == [urgent, lost, *jobs]
    assert queue.position(lost) == 2


def test_a_tenant_at_its_running_limit_is_skipped():
    running = {"a": 2, "b": 0}
    queue = JobQueue(max_running=2, running=lambda tenant: running.get(tenant, 0))
    a, b = fill(queue, "a", 3), fill(queue, "b", 3)
    assert list(queue) == [b[0], b[1]]          # a runs 2 already; b may get 2 in this pass
    running["a"] = 1
    assert list(queue) == [a[0], b[0], b[1]]    # each pass offers a tenant no more than its room
    assert len(queue) == 6
    assert sorted(map(repr, queue.every_job())) == sorted(map(repr, a + b))
    # a's later jobs keep a place: the one they get once a may run them.
    assert queue.position(a[1]) == 3


def test_iteration_is_lazy_and_a_place_is_found_without_walking():
    walks = 0
    original = _Line.__iter__

    def counting(line):
        nonlocal walks
        walks += 1
        return original(line)

    queue = JobQueue()
    jobs = {t: fill(queue, t, 5000) for t in ("a", "b")}
    for job in jobs["a"][:100]:
        queue.remove(job)
    queue.remove(jobs["b"][2500])
    _Line.__iter__ = counting
    try:
        assert queue.position(jobs["a"][100]) == 1
        assert queue.position(jobs["b"][2501]) == 2500 + 2500 + 1 + 1   # b0..b2499, a100..a2600, itself
        assert walks == 0
        assert len(list(itertools.islice(queue, 4))) == 4
        assert walks == 2        # one per tenant started, not one per job
    finally:
        _Line.__iter__ = original


def expected_order(entries, last_served, room):
    """Brute force: each tenant's jobs sorted by (priority desc, arrival), where a push_front
    arrives before everything; then rounds over the tenants in name order after `last_served`."""
    by_tenant = {}
    for job, seq in entries.items():
        by_tenant.setdefault(job.tenant, []).append((-job.priority, seq, job))
    tenants = sorted(by_tenant)
    if last_served is not None:
        after = [t for t in tenants if t > last_served]
        tenants = after + [t for t in tenants if t <= last_served]
    lines = {t: [job for _, _, job in sorted(by_tenant[t], key=lambda e: e[:2])] for t in tenants}
    limits = {t: len(lines[t]) if room(t) is None else min(len(lines[t]), room(t)) for t in tenants}
    order = []
    for rank in range(max(limits.values(), default=0)):
        order.extend(lines[t][rank] for t in tenants if rank < limits[t])
    return order


def test_order_and_places_match_a_brute_force_on_random_cases():
    rng = random.Random(15)
    for case in range(300):
        running = {t: rng.randrange(3) for t in "abcd"}
        limit = rng.choice([0, 0, 1, 2, 3])
        queue = JobQueue(max_running=limit, running=running.get)
        entries, seq_back, seq_front, made, last = {}, 0, 0, 0, None

        def room(tenant, lifted=None):
            return None if not limit or tenant == lifted else max(0, limit - running[tenant])

        for _ in range(rng.randrange(1, 40)):
            op = rng.random()
            if op < 0.6 or not entries:
                made += 1
                job = Job(f"j{made}", rng.choice("abcd"), rng.choice([0, 0, 1, -1, 5]))
                if rng.random() < 0.2:
                    seq_front -= 1
                    entries[job] = seq_front
                    queue.push_front(job)
                else:
                    seq_back += 1
                    entries[job] = seq_back
                    queue.append(job)
            elif op < 0.85:
                job = rng.choice(list(entries))
                del entries[job]
                queue.remove(job)
                if rng.random() < 0.5:
                    last = job.tenant
                    queue.served(last)
            else:
                running[rng.choice("abcd")] = rng.randrange(3)
            order = expected_order(entries, last, room)
            assert list(queue) == order, case
            assert len(queue) == len(entries)
            for job in entries:
                # A job the pass offers: its place there; one held back by its tenant's limit:
                # its place once that tenant may run it.
                place = expected_order(entries, last, lambda t: room(t, lifted=job.tenant)).index(job) + 1
                assert queue.position(job) == place, (case, job)
