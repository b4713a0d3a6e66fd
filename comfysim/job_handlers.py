"""Today's jobs routes (profile "current"): GET /api/jobs, GET /api/jobs/{id},
POST /api/jobs/{id}/cancel and POST /api/jobs/cancel.

ComfyUI declares them with the /api prefix already in their path, so with its usual
"every route also under /api" they answer at /api/jobs and /api/api/jobs, not at /jobs.
"""
from __future__ import annotations

import json
import logging

from . import jobs
from .handlers import BaseHandler, is_canonical_uuid

log = logging.getLogger("comfysim")

# What cancelling one id did (SimulatedComfy.cancel_calls): a running prompt was
# interrupted, a pending one dequeued, or nothing ("terminal": already in history).
INTERRUPTED, DEQUEUED, TERMINAL, UNKNOWN = "interrupted", "dequeued", "terminal", "unknown"


class JobsHandler(BaseHandler):
    def get(self):
        query = {k: v[0].decode("utf-8", "replace") for k, v in self.request.query_arguments.items()}
        sort_by = query.get("sort_by", "created_at").lower()
        sort_order = query.get("sort_order", "desc").lower()
        statuses = None
        if query.get("status"):
            statuses = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            invalid = [s for s in statuses if s not in jobs.ALL_STATUSES]
            if invalid:
                return self.error(f"Invalid status value(s): {', '.join(invalid)}. "
                                  f"Valid values: {', '.join(jobs.ALL_STATUSES)}")
        if sort_by not in ("created_at", "execution_duration"):
            return self.error("sort_by must be 'created_at' or 'execution_duration'")
        if sort_order not in ("asc", "desc"):
            return self.error("sort_order must be 'asc' or 'desc'")
        limit = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return self.error("limit must be an integer")
            if limit <= 0:
                return self.error("limit must be a positive integer")
        offset = 0
        if "offset" in query:
            try:
                offset = max(int(query["offset"]), 0)
            except ValueError:
                return self.error("offset must be an integer")
        running, pending = self.queue.current()
        page, total = jobs.listing(running, pending, self.queue.history, statuses, query.get("workflow_id"),
                                   sort_by, sort_order, limit, offset)
        self.send_json({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                     "has_more": offset + len(page) < total}})

    def error(self, message: str, status: int = 400, **extra):
        self.send_json({"error": message, **extra}, status)


class JobHandler(JobsHandler):
    """GET /api/jobs/{id}; a POST here is only the batch cancel (/api/jobs/cancel)."""

    def get(self, job_id):
        running, pending = self.queue.current()
        job = jobs.find(job_id, running, pending, self.queue.get_history(job_id))
        if job is None:
            return self.error("Job not found", 404)
        self.send_json(job)

    def post(self, job_id):
        if job_id != "cancel":
            self.send_error(405)
            return
        try:
            data = json.loads(self.request.body or b"")
        except ValueError:
            return self.error("Request body must be valid JSON")
        job_ids = data.get("job_ids") if isinstance(data, dict) else None
        if not isinstance(job_ids, list):
            return self.error("job_ids must be a list")
        invalid = [j if isinstance(j, str) else _python_repr(j) for j in job_ids if not is_canonical_uuid(j)]
        if invalid:
            return self.error("job_ids contains invalid id(s)", invalid_ids=invalid)
        cancelled = False
        for job_id in job_ids:
            cancelled = cancel(self.sim, self.rt, job_id) or cancelled
        self.send_json({"cancelled": cancelled})


class JobCancelHandler(JobsHandler):
    def post(self, job_id):
        self.send_json({"cancelled": cancel(self.sim, self.rt, job_id)})


def cancel(sim, rt, job_id: str) -> bool:
    """Stop one job whatever its state; True when a running or pending prompt was hit.

    The queue snapshot decides what to try; each action re-checks the live state (the
    interrupt fires only while that very prompt runs), so a cancel never lands on another
    prompt that started in between."""
    queue = rt.queue
    running, pending = queue.current()
    if any(item[1] == job_id for item in running):
        outcome = INTERRUPTED if _interrupt_if_running(sim, queue, job_id) else UNKNOWN
    elif any(item[1] == job_id for item in pending):
        if queue.delete_pending(job_id):
            outcome = DEQUEUED
        else:  # it left the queue meanwhile: running now, or already done
            outcome = INTERRUPTED if _interrupt_if_running(sim, queue, job_id) else UNKNOWN
    else:
        outcome = TERMINAL if job_id in queue.history else UNKNOWN
    log.info("comfysim %s: cancel %s -> %s", sim.name, job_id, outcome)
    sim.cancel_calls.append((job_id, outcome))
    return outcome in (INTERRUPTED, DEQUEUED)


def _interrupt_if_running(sim, queue, prompt_id) -> bool:
    if queue.is_running(prompt_id):
        sim.interrupt()
        return True
    return False


def _python_repr(value) -> str:
    """How ComfyUI (Python) spells a non-string id in "invalid_ids": repr(5) == "5"."""
    return repr(value)
