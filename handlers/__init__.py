"""Every route of the bridge, joined from each module's own list."""
from __future__ import annotations

from . import docs, generate, history, jobs, metrics, openapi, server, upload, v2, workflows, ws
from .base import NotFoundHandler


def all_routes(static_dir: str) -> list:
    return [
        *workflows.routes,
        *upload.routes,
        *generate.routes,
        *history.routes,
        *jobs.routes,
        *ws.routes,
        *server.routes,
        *metrics.routes,
        *v2.routes,
        *openapi.routes,
        *docs.routes(),
        *server.static_routes(static_dir),
    ]


__all__ = ["all_routes", "NotFoundHandler"]
