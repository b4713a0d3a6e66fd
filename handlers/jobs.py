"""Per-client job endpoints: GET /execution-info, POST /interrupt, POST /free."""
from __future__ import annotations

from balancer.jobs import CONNECTED_DETAIL, JobState, status_message

from .base import ApiError, JsonHandler

NOT_RECOGNIZED = "The client ID has not been submitted to the server before. It is not recognized. / {}"


class ExecutionInfoHandler(JsonHandler):
    def get(self) -> None:
        client_id = self.client_id()
        job = self.service.get(client_id)
        if job is not None:
            self.write_json(self.service.status(job))
        elif self.hub.connected(client_id):  # its websocket is open; generate has not come yet
            self.write_json(status_message("connected", CONNECTED_DETAIL))
        else:
            raise ApiError(400, NOT_RECOGNIZED.format(client_id))


class InterruptHandler(JsonHandler):
    def post(self) -> None:
        client_id = self.client_id()
        job = self.service.get(client_id)
        if job is None:
            raise ApiError(400, NOT_RECOGNIZED.format(client_id))
        if job.active:
            self.service.cancel(client_id)
        if job.state is JobState.ERROR:
            job.error_reported = True
        self.write_json({"detail": f"interrupted that clientId will be ignored. / {client_id}"})


class FreeHandler(JsonHandler):
    async def post(self) -> None:
        client_id = self.client_id(required=False)
        if client_id is not None and self.service.get(client_id) is None:
            raise ApiError(400, NOT_RECOGNIZED.format(client_id))
        await self.service.free(client_id)
        if self.metrics is not None:
            self.metrics.count_free(client_id)
        self.write_json({"detail": f"server memory free now / {client_id or 'ALL'}"})


routes = [
    (r"/execution-info", ExecutionInfoHandler),
    (r"/interrupt", InterruptHandler),
    (r"/free", FreeHandler),
]
