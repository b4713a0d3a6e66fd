"""bench/plans.py: the mixed-checkpoint workload and the offline best plans bench/mixed.py
measures the scheduler against (a wrong bound would make its figure meaningless)."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_plans", Path(__file__).resolve().parent.parent / "bench" / "plans.py")
plans = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plans)


def brute_force(counts, r, L):
    """{loads: best makespan} over every assignment of every job to a backend."""
    jobs = [m for m, n in enumerate(counts) for _ in range(n)]
    best = {}
    for choice in itertools.product(range(len(r)), repeat=len(jobs)):
        times, loads = [], 0
        for b in range(len(r)):
            mine = [m for m, where in zip(jobs, choice) if where == b]
            distinct = len(set(mine))
            loads += distinct
            times.append(len(mine) * r[b] + distinct * L[b])
        best[loads] = min(best.get(loads, float("inf")), max(times))
    return best


def test_best_plans_match_every_assignment_tried_by_hand():
    for counts, r, L in [([3, 2, 1], [1.0, 2.0], [2.0, 1.0]), ([2, 2, 2], [1.0, 1.0], [4.0, 4.0]),
                         ([4, 1], [1.0, 1.5, 3.0], [0.5, 2.0, 1.0])]:
        got = plans.best_plans(counts, r, L)
        want = brute_force(counts, r, L)
        assert set(got) == set(want)
        for loads, T in want.items():
            assert abs(got[loads] - T) < 1e-9, (counts, loads, got[loads], T)


def test_three_equal_checkpoints_on_four_backends_need_six_loads_for_the_best_makespan():
    # 40 jobs each, run 1, load 4: one backend per checkpoint plus a shared one -> 44;
    # every checkpoint on two backends -> 36 (1.5 x the lower bound of 4 loads).
    frontier = plans.best_plans([40, 40, 40], [1.0] * 4, [4.0] * 4)
    assert frontier[4] == 44 and frontier[5] == 44 and frontier[6] == 36
    assert min(frontier.values()) == 36
    assert plans.lower_bound_loads([40, 40, 40], 4) == 4


def test_lower_bound_counts_models_and_the_backends_there_are_jobs_for():
    assert plans.lower_bound_loads([60, 30, 30], 4) == 4
    assert plans.lower_bound_loads([5, 5, 5, 5, 5], 4) == 5
    assert plans.lower_bound_loads([1, 1, 0], 4) == 2


def test_workload_has_the_exact_counts_in_an_order_fixed_by_its_seed():
    order = plans.workload(120, ["a", "b", "c"], [2, 1, 1], seed=15)
    assert [order.count(x) for x in "abc"] == [60, 30, 30]
    assert order == plans.workload(120, ["a", "b", "c"], [2, 1, 1], seed=15)
    assert order != plans.workload(120, ["a", "b", "c"], [2, 1, 1], seed=16)
    assert sorted(plans.workload(10, ["a", "b", "c"], [1, 1, 1], seed=1)).count("a") in (3, 4)
