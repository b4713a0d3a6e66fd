"""POST /generate-based-workflow: read the request, queue the job."""
from __future__ import annotations

from balancer.jobs import status_message

from .base import ApiError, JsonHandler, http_error


class GenerateHandler(JsonHandler):
    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "POST":
            # A full queue is answered before the body is read or parsed: under a flood of
            # submissions that is most requests, and the loop belongs to the accepted jobs.
            # (connections.py drains or closes what the client still sends.)
            self.service.refuse_if_full(self.client_id())

    async def post(self) -> None:
        client_id = self.client_id()
        try:
            body = self.json_body()
            alias = body.pop("workflow", None)
            if not isinstance(alias, str) or not alias:
                raise ApiError(400, "field 'workflow' is required: the alias of a workflow (see GET /workflow-list)")
            # Options are top-level keys without a '/' (inputs always have one).
            webhook = body.pop("webhook", None)
            position = await self.service.submit(client_id, alias, body, webhook=webhook)
        except Exception as exc:
            self._tell_socket(client_id, exc)
            raise
        self.write_json({"detail": f"queued / {position}"})

    def _tell_socket(self, client_id: str, exc: Exception) -> None:
        """A refused generate also reaches the clientId's open socket (`error`, then close):
        a client waiting there for its job would otherwise wait for ever. Not when that
        clientId still has a job: the socket is that job's."""
        error = http_error(exc)
        job = self.service.get(client_id)
        if error is not None and error.status_code < 500 and (job is None or not job.active):
            self.hub.publish(client_id, status_message("error", error.detail), final=True)


routes = [(r"/generate-based-workflow", GenerateHandler)]
