"""POST /generate-based-workflow: read the request, queue the job."""
from __future__ import annotations

from .base import ApiError, JsonHandler


class GenerateHandler(JsonHandler):
    async def post(self) -> None:
        client_id = self.client_id()
        body = self.json_body()
        alias = body.pop("workflow", None)
        if not isinstance(alias, str) or not alias:
            raise ApiError(400, "field 'workflow' is required: the alias of a workflow (see GET /workflow-list)")
        position = await self.service.submit(client_id, alias, body)
        self.write_json({"detail": f"queued / {position}"})


routes = [(r"/generate-based-workflow", GenerateHandler)]
