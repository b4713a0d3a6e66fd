"""The scheduler alone: plain objects, no IOLoop, no backend."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from balancer.affinity import GpuBelief
from balancer.scheduler import Scheduler, can_run


@dataclass
class FakeBackend:
    address: str
    up: bool = True
    load: int = 0
    node_classes: frozenset = frozenset()
    work: float = 0.0                   # seconds of expected work ahead of it
    gpu: GpuBelief = field(default_factory=lambda: GpuBelief(2))

    def backlog(self, now, run_time=None):
        return self.work


@dataclass
class FakeJob:
    alias: str = "invert"
    class_types: frozenset = frozenset({"LoadImage", "SaveImage"})
    allowed_backends: tuple | None = None
    refused_by: dict = field(default_factory=dict)
    models: frozenset = frozenset()


def pairs(plan):
    return [(p.job, p.backend) for p in plan]


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


def test_idle_backends_go_to_the_shorter_recent_duration_of_that_workflow():
    fleet = backends(2)
    for backend, invert, other in ((fleet[0], 3.0, 0.1), (fleet[1], 1.0, 9.0)):
        learned(backend, "invert", run=invert)
        learned(backend, "other", run=other)
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
    plan = pairs(Scheduler(2).plan(queue, fleet, 0.0))
    assert [job for job, _ in plan] == queue[:4]
    assert [b.address for _, b in plan] == ["b0:1", "b1:1", "b0:1", "b1:1"]


def test_plan_skips_a_job_no_free_backend_can_run_and_places_the_next():
    fleet = backends(2)
    fleet[1].node_classes = frozenset({"LoadImage", "SaveImage"})
    fleet[0].node_classes = frozenset({"LoadImage", "SaveImage", "Special"})
    fleet[0].load = 1
    special, plain = FakeJob(class_types=frozenset({"Special"})), FakeJob()
    assert pairs(Scheduler(1).plan([special, plain], fleet, 0.0)) == [(plain, fleet[1])]


def test_plan_is_empty_without_a_free_slot():
    fleet = backends(2, load=1)
    assert Scheduler(1).plan([FakeJob()] * 3, fleet, 0.0) == []


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


def test_plan_reads_each_backend_a_bounded_number_of_times_whatever_the_queue():
    fleet = [CountingBackend(f"b{i}:1", load=0 if i % 30 == 0 else 1, work=1.0) for i in range(300)]  # 10 free
    CountingBackend.reads = 0
    plan = pairs(Scheduler(1).plan([FakeJob() for _ in range(1000)], fleet, 0.0))
    assert sorted(b.address for _, b in plan) == sorted(f"b{i}:1" for i in range(0, 300, 30))
    # the loads are read once or twice per backend, then from the plan's own copy: not per job
    assert CountingBackend.reads <= 3 * 300


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
    plan = pairs(Scheduler(1).plan([*pinned, refused, anywhere], fleet, 0.0))
    assert plan == [(refused, fleet[2]), (anywhere, fleet[1])]
    # three jobs compared on three backends, and the first pinned one's look for any other with room;
    # the other pinned ones are not looked at
    assert can_run_calls[0] <= 3 * 3 + 2


def test_waiting_reason_stops_at_the_first_backend_up_and_able(can_run_calls):
    import balancer.scheduler as scheduler_module
    assert scheduler_module.waiting_reason(FakeJob(), backends(300)) is None
    assert can_run_calls[0] == 1


# Model affinity and earliest expected completion (issue 15).

from balancer.affinity import DEFAULT_RUN_SECONDS, Estimator, models_of  # noqa: E402


def test_models_of_names_the_files_loader_nodes_load_and_nothing_else():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors", "model": ["1", 0],
                                                      "strength_model": 1.0}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat.safetensors"}},  # not a loader
    }
    assert models_of(graph) == {"sdxl.safetensors", "ink.safetensors", "4x.pth"}
    assert models_of({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}) == frozenset()


def test_held_after_is_the_gpus_lru():
    from balancer.affinity import held_after
    assert held_after(["a", "b"], [frozenset({"a"}), frozenset({"c"})], 2) == ["a", "c"]
    assert held_after(["a"], [frozenset({"b", "c"})], 1) == ["c"]      # a job's own files: in name order
    assert held_after(["a"], [], 0) == []


def test_the_belief_keeps_the_last_models_used_and_forgets_all_after_a_free():
    gpu = GpuBelief(2)
    gpu.loaded(frozenset({"a"}))
    gpu.loaded(frozenset({"b"}))
    gpu.loaded(frozenset({"a"}))          # a used again: b is now the oldest
    gpu.loaded(frozenset({"c"}))
    assert gpu.models == ("a", "c")
    assert gpu.holds("a") and gpu.holds("c") and not gpu.holds("b")
    gpu.forget()
    assert gpu.models == ()


SDXL = "sdxl.safetensors"


def learned(backend, alias="t2i", run=None, load=None, model=SDXL):
    """Teach a backend's belief a run of `alias` (without loads) and a load of `model`."""
    if run is not None:
        backend.gpu.record(alias, True, run)
    if load is not None:
        backend.gpu.record_load(model, load)
    return backend


def sdxl_job():
    return FakeJob(alias="t2i", models=frozenset({SDXL}))


def test_a_cold_idle_backend_is_chosen_when_the_warm_one_is_busy_longer_than_a_load():
    warm_busy, cold_idle = backends(2)
    for b in (warm_busy, cold_idle):
        learned(b, run=1.0, load=4.0)
    warm_busy.gpu.loaded(frozenset({SDXL}))
    warm_busy.load, warm_busy.work = 1, 10.0
    [placed] = Scheduler(2).plan([sdxl_job()], [warm_busy, cold_idle], 0.0)
    assert (placed.backend, placed.cold, placed.expected) == (cold_idle, {SDXL}, 5.0)


def test_a_job_goes_behind_the_running_one_on_a_warm_backend_when_that_ends_it_first():
    warm_busy, cold_idle = backends(2)
    for b in (warm_busy, cold_idle):
        learned(b, run=1.0, load=4.0)
    warm_busy.gpu.loaded(frozenset({SDXL}))
    warm_busy.load, warm_busy.work = 1, 2.0      # ends at 2 + 1 = 3, before a cold start's 5
    [placed] = Scheduler(2).plan([sdxl_job()], [warm_busy, cold_idle], 0.0)
    assert (placed.backend, placed.warm) == (warm_busy, True)


def test_a_job_waits_for_a_full_warm_backend_that_ends_it_first_and_the_next_one_goes_elsewhere():
    warm_full, cold_idle = backends(2)
    for b in (warm_full, cold_idle):
        learned(b, run=1.0, load=4.0)
    warm_full.gpu.loaded(frozenset({SDXL}))
    warm_full.load, warm_full.work = 1, 1.0      # full at one slot; ends a warm job at 2
    sdxl = [sdxl_job() for _ in range(5)]
    plan = Scheduler(1).plan(sdxl, [warm_full, cold_idle], 0.0)
    # the first three end sooner on the warm backend (2, 3, 4, then a tie at 5 goes warm),
    # so they wait for it; the fifth ends first on the cold one (5 < 6)
    assert pairs(plan) == [(sdxl[4], cold_idle)]


def test_jobs_placed_in_one_pass_warm_the_backend_for_the_jobs_behind_them():
    a, b = backends(2)
    for backend in (a, b):
        learned(backend, run=1.0, load=4.0)
    b.work, b.load = 3.0, 1
    jobs = [sdxl_job() for _ in range(2)]
    plan = Scheduler(2).plan(jobs, [a, b], 0.0)
    assert [(p.backend, p.warm) for p in plan] == [(a, False), (a, True)]   # 5, then 6 < b's 3 + 5


def test_a_model_pushed_out_by_a_job_planned_before_it_in_the_pass_is_cold_again():
    only = FakeBackend("g:1", gpu=GpuBelief(1))
    learned(only, run=1.0, load=4.0)
    learned(only, load=4.0, model="sd15.safetensors")
    only.gpu.loaded(frozenset({SDXL}))
    sd15, sdxl = FakeJob(alias="t2i", models=frozenset({"sd15.safetensors"})), sdxl_job()
    plan = Scheduler(2).plan([sd15, sdxl], [only], 0.0)
    assert [(p.job, p.cold) for p in plan] == [(sd15, {"sd15.safetensors"}), (sdxl, {SDXL})]


def test_a_cold_placement_that_evicts_a_model_the_queue_still_wants_is_charged_its_reload():
    # Two backends with one model each (K=1): sdxl's holds three sdxl jobs' work, sd15's is idle.
    sdxl_gpu, sd15_gpu = FakeBackend("x:1", gpu=GpuBelief(1)), FakeBackend("y:1", gpu=GpuBelief(1))
    for b in (sdxl_gpu, sd15_gpu):
        learned(b, run=1.0, load=4.0)
        learned(b, load=4.0, model="sd15.safetensors")
    sdxl_gpu.gpu.loaded(frozenset({SDXL}))
    sd15_gpu.gpu.loaded(frozenset({"sd15.safetensors"}))
    sdxl_gpu.load, sdxl_gpu.work = 1, 4.5
    sd15_job = FakeJob(alias="t2i", models=frozenset({"sd15.safetensors"}))
    # On the sd15 backend the sdxl job would end at 5 (load 4 + run 1), before 5.5 on its own
    # busy one; but it would push out sd15, which the job behind it wants: 5 + 4 > 5.5.
    plan = Scheduler(2).plan([sdxl_job(), sd15_job], [sdxl_gpu, sd15_gpu], 0.0)
    assert [(p.backend, p.warm) for p in plan] == [(sdxl_gpu, True), (sd15_gpu, True)]
    # With no sd15 job waiting, the load pays: it goes to the idle backend.
    [placed] = Scheduler(2).plan([sdxl_job()], [sdxl_gpu, sd15_gpu], 0.0)
    assert (placed.backend, placed.warm) == (sd15_gpu, False)


def test_unequal_backends_take_jobs_by_expected_end_not_by_count():
    fast, slow = backends(2)
    learned(fast, run=1.0)
    learned(slow, run=3.0)
    plan = Scheduler(2).plan([FakeJob(alias="t2i") for _ in range(4)], [fast, slow], 0.0)
    # fast ends them at 1, 2 (then full); the third ends at 3 on either: fewer prompts wins;
    # the fourth ends at 3 on the fast one, not 6 on the slow one: it waits for the fast one
    assert [p.backend for p in plan] == [fast, fast, slow]


def test_a_backend_that_never_ran_a_workflow_or_loaded_a_file_is_estimated_from_the_farm():
    seen, new = backends(2)
    learned(seen, run=2.0, load=4.0)
    estimate = Estimator([seen, new])
    assert estimate.expected(new, "t2i") == 2.0
    assert estimate.expected(new, "t2i", frozenset({SDXL})) == 6.0
    assert estimate.load_time(new, "other.safetensors") == 4.0     # any file's load, when that one was never seen
    # no load seen anywhere yet: taken to cost UNSEEN_LOAD_RUNS runs
    from balancer.affinity import UNSEEN_LOAD_RUNS
    assert Estimator([new]).expected(new, "never-seen", frozenset({SDXL})) == DEFAULT_RUN_SECONDS * (1 + UNSEEN_LOAD_RUNS)


def test_the_lookahead_stops_a_pass_even_when_every_job_waits_for_a_busy_backend():
    busy, idle = backends(2)
    learned(busy, run=0.1)
    learned(idle, run=100.0)     # so slow that every job prefers waiting for the busy one
    busy.load, busy.work = 1, 0.1
    jobs = [FakeJob(alias="t2i") for _ in range(10_000)]
    looked = []
    assert Scheduler(1).plan((looked.append(j) or j for j in jobs), [busy, idle], 0.0) == []
    from balancer.scheduler import LOOKAHEAD, WANTED_WINDOW
    assert len(looked) == max(1 + LOOKAHEAD, WANTED_WINDOW)    # not the 10,000


def test_a_backend_whose_runs_are_shorter_than_the_bridges_reaction_gets_more_waiting():
    from balancer.scheduler import EXTRA_WAITING_MAX, REACTION_SECONDS
    tiny, short, normal, fresh = backends(4)
    learned(tiny, "blank", run=0.001)
    learned(short, "blank", run=REACTION_SECONDS * 0.6)
    learned(normal, "blank", run=REACTION_SECONDS * 4)
    scheduler = Scheduler(2)
    assert [scheduler.capacity(b) for b in (tiny, short, normal, fresh)] == [2 + EXTRA_WAITING_MAX, 3, 2, 2]
    assert Scheduler(1).capacity(tiny) == 1          # pipelining off: one prompt at a time, whatever
    tiny.load = 2
    plan = scheduler.plan([FakeJob(alias="blank") for _ in range(10)], [tiny], 0.0)
    assert len(plan) == EXTRA_WAITING_MAX


@pytest.mark.parametrize("idle_run, chosen", [(2.4, "idle"), (2.6, "busy")])
def test_an_idle_gpu_takes_the_job_unless_a_busy_one_ends_it_clearly_sooner(idle_run, chosen):
    from balancer.scheduler import IDLE_MARGIN
    busy, idle = backends(2)
    learned(busy, run=1.0)
    learned(idle, run=idle_run)
    busy.load, busy.work = 1, 1.0              # ends a new job at 2.0; the margin allows 2.0 x 1.25
    assert 1 + IDLE_MARGIN == 1.25
    [placed] = Scheduler(2).plan([FakeJob(alias="t2i")], [busy, idle], 0.0)
    assert placed.backend is {"idle": idle, "busy": busy}[chosen]
