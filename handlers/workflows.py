"""GET /workflow-list and GET /workflow-info."""
from __future__ import annotations

from storage.catalog import CatalogError

from .base import ApiError, JsonHandler


class WorkflowListHandler(JsonHandler):
    def get(self) -> None:
        self.write_json(self.catalog.aliases())


class WorkflowInfoHandler(JsonHandler):
    def get(self) -> None:
        alias = self.get_query_argument("workflow", None)
        if not alias:
            raise ApiError(400, "query parameter 'workflow' is required: an alias from GET /workflow-list")
        try:
            workflow = self.catalog.get(alias)
        except CatalogError as exc:
            raise ApiError(400, str(exc)) from None
        # The specification's keys, and beside them what a form needs (limits, description).
        self.write_json(self.service.intake.describe(workflow, self.service.backends))


routes = [
    (r"/workflow-list", WorkflowListHandler),
    (r"/workflow-info", WorkflowInfoHandler),
]
