"""Per-client job endpoints: GET /execution-info, POST /interrupt, POST /free."""
from __future__ import annotations

from .base import JsonHandler


class ExecutionInfoHandler(JsonHandler):
    def get(self) -> None:
        self.write_json(self.service.status_of(self.client_id(), self.tenant))


class InterruptHandler(JsonHandler):
    def post(self) -> None:
        client_id = self.client_id()
        self.service.interrupt(client_id, self.tenant)
        self.write_json({"detail": f"interrupted that clientId will be ignored. / {client_id}"})


class FreeHandler(JsonHandler):
    async def post(self) -> None:
        client_id = self.client_id(required=False)
        await self.service.free(client_id, self.tenant)
        if self.metrics is not None:
            self.metrics.count_free(client_id)
        self.write_json({"detail": f"server memory free now / {client_id or 'ALL'}"})


routes = [
    (r"/execution-info", ExecutionInfoHandler),
    (r"/interrupt", InterruptHandler),
    (r"/free", FreeHandler),
]
