"""POST /generate-based-workflow: read the request, queue the job.

With `wait=<seconds>` the request is held until the job ends and answered as GET /history
would (or `202` when the wait runs out first; the job goes on). A client that disconnects
while held cancels its job, as closing its websocket does.
"""
from __future__ import annotations

import math

from balancer.errors import Busy
from balancer.jobs import PRIORITY_RANGE, status_message
from balancer.progress import format_percent

from .base import ApiError, JsonHandler, http_error
from .history import HistoryAnswer

# The longest `wait` accepted, in seconds: a request held longer is usually cut by a proxy or
# client timeout anyway; longer jobs are followed by the websocket or /execution-info.
MAX_WAIT = 600.0
WAIT_GONE = "interrupted: the client closed its connection while waiting (wait=)"


def parse_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT:  # NaN fails too
        shown = raw if len(raw) <= 32 else raw[:32] + "..."
        raise ApiError(400, f"query parameter 'wait' must be a number of seconds from 0 to {MAX_WAIT:g}; "
                            f"got {shown!r}")
    return value


def parse_priority(value) -> int:
    """The body's `priority` (0 when absent): an integer in PRIORITY_RANGE; null, a bool or 1.0
    is not one."""
    low, high = PRIORITY_RANGE
    if type(value) is not int or not low <= value <= high:
        raise ApiError(400, f"field 'priority' must be an integer from {low} to {high} (higher runs first "
                            "among your own jobs); default 0")
    return value


class GenerateHandler(HistoryAnswer, JsonHandler):
    _held = None      # the job this request waits for (wait=)
    _gone = False     # the client closed the connection

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "POST":
            # A full queue is answered before the body is read or parsed: under a flood of
            # submissions that is most requests, and the loop belongs to the accepted jobs.
            # (connections.py drains or closes what the client still sends.)
            self.service.refuse_if_full(self.client_id(), self.tenant)

    async def post(self) -> None:
        client_id = self.client_id()
        try:
            wait = parse_wait(self.get_query_argument("wait", None))
            body = self.json_body()
            alias = body.pop("workflow", None)
            if not isinstance(alias, str) or not alias:
                raise ApiError(400, "field 'workflow' is required: the alias of a workflow (see GET /workflow-list)")
            # Options are top-level keys without a '/' (inputs always have one).
            webhook = body.pop("webhook", None)
            priority = parse_priority(body.pop("priority", 0))
            # File inputs by URL or inline become stored uploads first: the core sees uploads only.
            # A refusal that does not depend on them comes before the fetches it would waste.
            webhook = await self.service.check_webhook(webhook)
            self.service.check_can_submit(client_id, self.tenant)
            await self.application.settings["remote_inputs"].resolve(alias, body)
            position = await self.service.submit(client_id, alias, body, webhook=webhook, tenant=self.tenant,
                                                 priority=priority)
        except Exception as exc:
            self._tell_socket(client_id, exc)
            raise
        if wait is None:
            return self.write_json({"detail": f"queued / {position}"})
        job = self._held = self.service.get(client_id, self.tenant)
        if self._gone:  # it left while its inputs were fetched or its job written
            return self._cancel_held()
        ended = await self.service.wait_for_end(job, wait)
        self._held = None
        if self._gone:
            return
        if not ended:
            return self.write_json({"detail": f"still running / {format_percent(job.percent)}"}, status=202)
        await self.answer_history(client_id)

    def on_connection_close(self) -> None:
        self._gone = True
        self._cancel_held()
        super().on_connection_close()

    def _cancel_held(self) -> None:
        job, self._held = self._held, None
        if job is not None and self.service.get(job.client_id, self.tenant) is job:
            self.service.cancel(job.client_id, WAIT_GONE)  # nobody is left to take the result

    def _tell_socket(self, client_id: str, exc: Exception) -> None:
        """A refused generate also reaches the clientId's open socket (`error`, then close):
        a client waiting there for its job would otherwise wait for ever. Not when that
        clientId still has a job: the socket is that job's. Not for "retry later" (Busy), nor to
        another tenant's socket."""
        error = http_error(exc)
        if error is None or isinstance(exc, Busy) or self.service.holder(client_id) not in (None, self.tenant):
            return
        job = self.service.get(client_id)
        if error.status_code < 500 and (job is None or not job.active):
            self.hub.publish(client_id, status_message("error", error.detail), final=True)


routes = [(r"/generate-based-workflow", GenerateHandler)]
