"""/api/v2/jobs: submit a whole graph, follow it (poll or server-sent events), cancel it, list."""
from __future__ import annotations

import base64
import re

from tornado.iostream import StreamClosedError

from balancer.v2.errors import V2Refused
from balancer.v2.idempotency import check_key
from balancer.v2.view import TERMINAL

from ..base import to_json
from .base import API, V2Handler

KEEPALIVE = 15.0   # seconds of silence on a stream before a ':' comment (the SDK gives up after 45)
_METADATA_ARG = re.compile(r"metadata\[(.{1,64})\]")
JOB_ID = r"([^/]{1,64})"


class JobsHandler(V2Handler):
    async def post(self) -> None:
        key = check_key(self.request.headers.get("Idempotency-Key"))
        answer, replayed = await self.v2.submit(self.json_body(), key, self.origin, self.tenant)
        if replayed:
            self.set_header("Idempotency-Replayed", "true")
        self.set_header("Location", answer["urls"]["self"])
        self.write_json(answer, 201)

    def get(self) -> None:
        metadata = {}
        for name, values in self.request.query_arguments.items():
            match = _METADATA_ARG.fullmatch(name)
            if match:
                metadata[match.group(1)] = self.decode_argument(values[-1], name)
            elif name.startswith("metadata"):
                raise V2Refused("invalid_metadata_filter", "filter by metadata as metadata[<key>]=<value>")
        limit = self.get_query_argument("limit", None)
        if limit is not None and not limit.isdigit():
            raise V2Refused("invalid_request", "limit must be a whole number")
        self.write_json(self.v2.list(metadata, int(limit) if limit else None, self.get_query_argument("cursor", None), self.tenant))


class JobHandler(V2Handler):
    def get(self, job_id: str) -> None:
        self.write_json(self.v2.view(self.v2.job(job_id, self.tenant), self.origin))


class JobCancelHandler(V2Handler):
    def post(self, job_id: str) -> None:
        job = self.v2.job(job_id, self.tenant)
        self.v2.cancel(job)
        self.write_json(self.v2.view(job, self.origin))


class JobWorkflowHandler(V2Handler):
    def get(self, job_id: str) -> None:
        self.write_json({"workflow": self.v2.job(job_id, self.tenant).v2["workflow"], "format": "api"})


class JobEventsHandler(V2Handler):
    """A snapshot on connect (status, then progress), then what changes; the outputs, then the
    terminal status, end it. Derived from the job record at each wake-up (balancer/v2/events.py)."""

    _follower = None
    _gone = False

    async def get(self, job_id: str) -> None:
        job = self.v2.job(job_id, self.tenant)
        follower = self._follower = self.v2.followers.follow(job.client_id)   # before the snapshot
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")   # nginx: pass frames on at once
        sent_status, sent_progress, sent_preview = None, None, None
        try:
            while not self._gone and not follower.dropped:
                if self.v2.service.get(job.client_id) is not job:   # swept at its expires_at
                    self._frame("status", {"status": "expired", "queue_position": None})
                    break
                view = self.v2.view(job, self.origin)
                status = view["status"]
                if status not in TERMINAL and (status, view["queue_position"]) != sent_status:
                    sent_status = (status, view["queue_position"])
                    self._frame("status", {"status": status, "queue_position": view["queue_position"]})
                if view["progress"] is not None and view["progress"] != sent_progress:
                    sent_progress = view["progress"]
                    self._frame("progress", sent_progress)
                preview = self.v2.previews.get(job.client_id)
                if preview is not None and preview is not sent_preview and status not in TERMINAL:
                    sent_preview = preview   # only the latest: a slow stream skips the ones between
                    self._frame("preview", {"node_id": str(preview[0] or ""), "content_type": preview[1],
                                            "data_base64": base64.b64encode(preview[2]).decode()})
                if status in TERMINAL and self.v2.outputs_ready(job):
                    if status == "canceled" and sent_status and sent_status[0] == "running":
                        self._frame("status", {"status": "canceling", "queue_position": None})
                    for output in view["outputs"]:
                        self._frame("output", output)
                    self._frame("status", {"status": status, "queue_position": None})
                    await self.flush()
                    break
                await self.flush()
                if not await follower.wait(KEEPALIVE):
                    self.write(": keep-alive\n\n")
        except StreamClosedError:
            return
        finally:
            self.v2.followers.unfollow(job.client_id, follower)
        if not self._gone:
            self.finish()

    def _frame(self, event: str, data: dict) -> None:
        self.write(f"event: {event}\ndata: {to_json(data)}\n\n")

    def on_connection_close(self) -> None:
        self._gone = True
        if self._follower is not None:
            self._follower.woken.set()
        super().on_connection_close()


routes = [
    (rf"{API}/jobs", JobsHandler),
    (rf"{API}/jobs/{JOB_ID}/events", JobEventsHandler),
    (rf"{API}/jobs/{JOB_ID}/cancel", JobCancelHandler),
    (rf"{API}/jobs/{JOB_ID}/workflow", JobWorkflowHandler),
    (rf"{API}/jobs/{JOB_ID}", JobHandler),
]
