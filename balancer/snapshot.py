"""What GET /status shows: each backend, the queue, the jobs by state, queued and running jobs
per tenant, the catalog's broken files. Any valid key sees every tenant's name and counts
(never a key): how busy the bridge is, and for whom, is what an operator and a client need to
judge a wait."""
from __future__ import annotations

import time


def service_snapshot(service, now: float) -> dict:
    oldest = min((job.created for job in service.queue.every_job()), default=None)
    states: dict[str, int] = {}
    for job in service.jobs.values():
        states[job.state.value] = states.get(job.state.value, 0) + 1
    return {
        "backends": [_backend(b) for b in service.backends],
        "queue": {"length": len(service.queue), "oldest_wait": round(now - oldest, 3) if oldest else 0.0},
        "jobs": states,
        "tenants": service.tenant_counts(),
        "generation_count": service.state.generation_count,
        # Files the catalog could not load; what they held before is still served.
        "catalog": {"broken": service.intake.catalog.broken()},
    }


def _backend(backend) -> dict:
    stats = backend.stats
    mean = stats.mean_duration()
    return {
        "address": backend.address,
        "up": backend.up,
        "since": round(backend.state_since, 3),
        "in_flight": backend.load,
        "completed": stats.completed,
        "failed": stats.failed,
        "last_error": stats.last_error,
        "consecutive_failures": stats.consecutive_failures,
        "last_failure": stats.last_failure,
        "mean_duration": None if mean is None else round(mean, 3),
        # What the scheduler believes (affinity.py): the model files loaded there, most recent
        # last, and the seconds of expected work ahead of its GPU.
        "models": list(backend.gpu.models),
        "backlog": round(backend.backlog(time.monotonic()), 3),
    }
