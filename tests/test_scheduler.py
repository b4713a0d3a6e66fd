"""The scheduler alone: plain objects, no IOLoop, no backend."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from balancer.scheduler import Scheduler, can_run


@dataclass
class FakeBackend:
    address: str
    up: bool = True
    load: int = 0
    node_classes: frozenset = frozenset()
    durations: dict = field(default_factory=dict)

    def mean_duration(self, alias):
        return self.durations.get(alias)


@dataclass
class FakeJob:
    alias: str = "invert"
    class_types: frozenset = frozenset({"LoadImage", "SaveImage"})
    allowed_backends: tuple | None = None
    refused_by: dict = field(default_factory=dict)


def backends(n, **kw):
    return [FakeBackend(f"b{i}:1", **kw) for i in range(n)]


def test_fewest_running_jobs_first():
    fleet = backends(3)
    fleet[0].load, fleet[1].load, fleet[2].load = 1, 0, 1
    assert Scheduler(2).pick(FakeJob(), fleet) is fleet[1]


def test_full_down_or_lacking_backends_are_never_chosen():
    fleet = backends(3)
    fleet[0].load = 1                                   # full at one slot
    fleet[1].up = False
    fleet[2].node_classes = frozenset({"LoadImage"})    # no SaveImage
    assert Scheduler(1).pick(FakeJob(), fleet) is None


def test_unknown_node_classes_do_not_exclude_a_backend():
    fleet = backends(1)
    assert Scheduler(1).pick(FakeJob(class_types=frozenset({"Anything"})), fleet) is fleet[0]


def test_allowed_backends_restrict_the_choice():
    fleet = backends(3)
    job = FakeJob(allowed_backends=("b2:1",))
    assert Scheduler(1).pick(job, fleet) is fleet[2]
    assert not can_run(job, fleet[0])


def test_ties_go_to_the_shorter_recent_duration_of_that_workflow():
    fleet = backends(2)
    fleet[0].durations = {"invert": 3.0, "other": 0.1}
    fleet[1].durations = {"invert": 1.0, "other": 9.0}
    assert Scheduler(1).pick(FakeJob(), fleet) is fleet[1]
    assert Scheduler(1).pick(FakeJob(alias="other"), fleet) is fleet[0]


def test_equal_backends_take_turns():
    fleet = backends(3)
    scheduler = Scheduler(1)
    chosen = [scheduler.pick(FakeJob(), fleet).address for _ in range(6)]
    assert chosen == ["b0:1", "b1:1", "b2:1", "b0:1", "b1:1", "b2:1"]


def test_plan_fills_every_free_slot_and_counts_its_own_placements():
    fleet = backends(2)
    queue = [FakeJob() for _ in range(5)]
    plan = Scheduler(2).plan(queue, fleet)
    assert [job for job, _ in plan] == queue[:4]
    assert sorted(b.address for _, b in plan) == ["b0:1", "b0:1", "b1:1", "b1:1"]


def test_plan_skips_a_job_no_free_backend_can_run_and_places_the_next():
    fleet = backends(2)
    fleet[1].node_classes = frozenset({"LoadImage", "SaveImage"})
    fleet[0].node_classes = frozenset({"LoadImage", "SaveImage", "Special"})
    fleet[0].load = 1
    special, plain = FakeJob(class_types=frozenset({"Special"})), FakeJob()
    assert Scheduler(1).plan([special, plain], fleet) == [(plain, fleet[1])]


def test_plan_is_empty_without_a_free_slot():
    fleet = backends(2, load=1)
    assert Scheduler(1).free_slots(fleet) == 0
    assert Scheduler(1).plan([FakeJob()] * 3, fleet) == []


def test_a_backend_that_refused_the_job_is_not_chosen_for_it_again():
    fleet = backends(2)
    job = FakeJob(refused_by={"b0:1": "HTTP 500"})
    assert Scheduler(1).pick(job, fleet) is fleet[1]
    assert Scheduler(1).pick(job, fleet[:1]) is None


def test_a_job_is_given_up_only_when_no_able_backend_was_up_for_the_whole_limit():
    from types import SimpleNamespace

    from balancer.scheduler import given_up, waiting_reason
    down = FakeBackend("b0:1", up=False)
    down.state_since, down.stats = 100.0, SimpleNamespace(last_error="connection refused")
    job = FakeJob()
    job.created = 0.0
    assert waiting_reason(job, [down]) == "waiting for a backend: none is up (b0:1: connection refused)"
    assert given_up(job, [down], now=200.0, limit=50.0)          # down since 100, queued since 0
    assert not given_up(job, [down], now=120.0, limit=50.0)      # it was up 20 s ago
    job.created = 180.0
    assert not given_up(job, [down], now=200.0, limit=50.0)      # queued only 20 s
    assert waiting_reason(job, [FakeBackend("b1:1")]) is None


# Cost: counted in operations, not time. A farm of hundreds of backends with a long queue must
# not pay per job for every busy backend, nor per pass for every job behind those placed.

class CountingBackend(FakeBackend):
    """Counts how often the scheduler reads its load."""
    reads = 0

    def __init__(self, *args, load: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._load = load

    @property
    def load(self):
        CountingBackend.reads += 1
        return self._load

    @load.setter
    def load(self, value):
        self._load = value


def test_plan_looks_at_each_backend_once_and_then_only_at_the_free_ones():
    fleet = [CountingBackend(f"b{i}:1", load=0 if i % 30 == 0 else 1) for i in range(300)]  # 10 free
    CountingBackend.reads = 0
    plan = Scheduler(1).plan([FakeJob() for _ in range(1000)], fleet)
    assert sorted(b.address for _, b in plan) == sorted(f"b{i}:1" for i in range(0, 300, 30))
    # one pass over all 300, then each of the 10 jobs placed compares the 10 free backends
    # (it was 300 + 10 x 300 when every choice walked the whole fleet)
    assert CountingBackend.reads <= 300 + 10 * 10 + 10


@pytest.fixture
def can_run_calls(monkeypatch):
    """The scheduler's `can_run` calls, counted in `[0]`."""
    import balancer.scheduler as scheduler_module
    calls = [0]
    real_can_run = scheduler_module.can_run

    def counting_can_run(job, backend):
        calls[0] += 1
        return real_can_run(job, backend)
    monkeypatch.setattr(scheduler_module, "can_run", counting_can_run)
    return calls


def test_plan_passes_over_the_jobs_alike_once_one_found_no_backend(can_run_calls):
    fleet = backends(3)
    fleet[0].load = 1                                   # the only backend the first 10,000 may use: busy
    pinned = [FakeJob(allowed_backends=("b0:1",)) for _ in range(10_000)]
    refused = FakeJob(refused_by={"b1:1": "HTTP 500"})  # may go to b2 only
    anywhere = FakeJob()
    plan = Scheduler(1).plan([*pinned, refused, anywhere], fleet)
    assert plan == [(refused, fleet[2]), (anywhere, fleet[1])]
    assert can_run_calls[0] <= 2 * 2 + 2 + 2  # the first pinned job tries b1 and b2; the rest of them are not looked at


def test_waiting_reason_stops_at_the_first_backend_up_and_able(can_run_calls):
    import balancer.scheduler as scheduler_module
    assert scheduler_module.waiting_reason(FakeJob(), backends(300)) is None
    assert can_run_calls[0] == 1
