"""The bridge itself: GET /generation-count, /healthz, /status, and the test page at /."""
from __future__ import annotations

import time

from tornado import web

from .base import JsonHandler


class GenerationCountHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(str(self.application.settings["state"].generation_count))


class HealthHandler(JsonHandler):
    public = True

    def get(self) -> None:
        up = sum(1 for b in self.service.backends if b.up)
        self.write_json({"status": "ok", "backends_up": up, "backends": len(self.service.backends)})


class StatusHandler(JsonHandler):
    def get(self) -> None:
        self.write_json(self.service.snapshot(time.time()))


class PageHandler(web.StaticFileHandler):
    """Static test page; no API key needed to load it (the page asks for one)."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


routes = [
    (r"/generation-count", GenerationCountHandler),
    (r"/healthz", HealthHandler),
    (r"/status", StatusHandler),
]


def static_routes(static_dir: str) -> list:
    return [(r"/()", PageHandler, {"path": static_dir, "default_filename": "index.html"}),
            (r"/static/(.*)", PageHandler, {"path": static_dir})]
