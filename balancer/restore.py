"""Jobs from the job database after a restart: what each one does next. Pure: the service
applies the plan (queues, slots, runs)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from storage.results import ResultFile
from .jobs import Job, JobState

log = logging.getLogger("bridge.jobs")


@dataclass
class RestorePlan:
    jobs: list[Job] = field(default_factory=list)      # every readable job, oldest first
    queue: list[Job] = field(default_factory=list)     # in the order they queue again
    resume: list[Job] = field(default_factory=list)    # running: follow their prompt on job.backend


def plan_restore(records: list[dict], backends) -> RestorePlan:
    """Queued jobs queue again in their order; running ones that reached a backend are looked
    up there by prompt_id; running ones that never did run first; ended ones wait for their
    client. Each job remembers its backend, so /free?clientId= still finds it."""
    by_address = {b.address: b for b in backends}
    plan, front = RestorePlan(), []
    for record in sorted(records, key=lambda r: r.get("created", 0)):
        try:
            job = Job.from_record(record, ResultFile)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("stored job %r unreadable, skipped: %s", record.get("client_id"), exc)
            continue
        plan.jobs.append(job)
        job.last_backend = by_address.get(record.get("backend"))
        if job.state is JobState.QUEUED:
            plan.queue.append(job)
        elif job.state is JobState.RUNNING and job.last_backend is not None and job.prompt_id:
            job.backend = job.last_backend
            plan.resume.append(job)
        elif job.state is JobState.RUNNING:
            job.state, job.prompt_id = JobState.QUEUED, None
            front.append(job)
    plan.queue[:0] = front
    return plan
