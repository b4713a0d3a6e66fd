"""The mixed-checkpoint workload and its offline best plans (bench/mixed.py's docstring says
what they are and why T* is a lower bound). Pure: no processes, no I/O, so tests import it."""
from __future__ import annotations

import itertools
import math
import random

MAX_SUPPORTS = 200_000  # (2^M)^B supports enumerated at most


def workload(jobs: int, checkpoints: list[str], weights: list[float], seed: int) -> list[str]:
    """The checkpoint of each job: counts in proportion to `weights` (largest remainders), shuffled."""
    total = sum(weights)
    exact = [jobs * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:jobs - sum(counts)]:
        counts[i] += 1
    order = [ckpt for ckpt, n in zip(checkpoints, counts) for _ in range(n)]
    random.Random(seed).shuffle(order)
    return order


def lower_bound_loads(counts: list[int], backends: int) -> int:
    return max(sum(1 for n in counts if n), min(backends, sum(counts)))


def _fits(T: float, supports: tuple[int, ...], counts: list[int], r: list[float], L: list[float],
          subsets: list[int]) -> bool:
    """Do the jobs fit by T when backend b serves exactly the checkpoints of bit mask
    supports[b], at least one job of each (else its load would not be counted)? One job per
    (backend, checkpoint) pair is given first; the rest is a transport problem, checked with
    the supply-demand condition over every set of checkpoints."""
    caps, left = [], list(counts)
    for b, s in enumerate(supports):
        k = bin(s).count("1")
        cap = math.floor((T - L[b] * k) / r[b] + 1e-9) - k if s else 0
        if cap < 0:
            return False
        caps.append(cap)
        for m in range(len(counts)):
            if s >> m & 1:
                left[m] -= 1
    if min(left) < 0:
        return False
    for q in subsets:
        need = sum(n for m, n in enumerate(left) if q >> m & 1)
        have = sum(cap for cap, s in zip(caps, supports) if s & q)
        if need > have:
            return False
    return True


def best_plans(counts: list[int], r: list[float], L: list[float]) -> dict[int, float]:
    """{number of loads: the smallest makespan of a plan with that many loads} (see the docstring)."""
    models, backends = len(counts), len(r)
    if (2 ** models) ** backends > MAX_SUPPORTS:
        raise ValueError(f"{models} checkpoints on {backends} backends: too many plans to enumerate")
    used = [m for m, n in enumerate(counts) if n]
    subsets = [q for q in range(1, 2 ** models) if all(counts[m] for m in range(models) if q >> m & 1)]
    total = sum(counts)
    candidates = sorted({k * r[b] + j * L[b] for b in range(backends) for k in range(1, total + 1)
                         for j in range(1, len(used) + 1)})
    frontier: dict[int, float] = {}
    masks = [s for s in range(2 ** models) if all(counts[m] for m in range(models) if s >> m & 1)]
    for supports in itertools.product(masks, repeat=backends):
        covered = 0
        for s in supports:
            covered |= s
        if any(not covered >> m & 1 for m in used):
            continue
        loads = sum(bin(s).count("1") for s in supports)
        lo, hi = 0, len(candidates) - 1
        if not _fits(candidates[hi], supports, counts, r, L, subsets):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits(candidates[mid], supports, counts, r, L, subsets):
                hi = mid
            else:
                lo = mid + 1
        T = candidates[lo]
        if T < frontier.get(loads, float("inf")):
            frontier[loads] = T
    return dict(sorted(frontier.items()))
