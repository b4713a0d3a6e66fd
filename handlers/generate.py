"""POST /generate-based-workflow: validate, build the prompt, queue the job."""
from __future__ import annotations

from .base import JsonHandler


class GenerateHandler(JsonHandler):
    async def post(self) -> None:
        client_id = self.client_id()
        position = await self.service.submit(client_id, self.json_body())
        self.write_json({"detail": f"queued / {position}"})


routes = [(r"/generate-based-workflow", GenerateHandler)]
