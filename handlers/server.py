"""The bridge itself: GET /generation-count, /healthz, /status, and the test page at /."""
from __future__ import annotations

import time

from tornado import web

from balancer.service import why_down
from logs import request_summary

from .base import JsonHandler, write_detail


class GenerationCountHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(str(self.application.settings["state"].generation_count))


class HealthHandler(JsonHandler):
    public = True

    def get(self) -> None:
        """503 when no backend is up, so a load balancer stops sending traffic here."""
        backends = self.service.backends
        up = sum(1 for b in backends if b.up)
        if up:
            return self.write_json({"status": "ok", "backends_up": up, "backends": len(backends)})
        self.write_json({"status": "unavailable", "backends_up": 0, "backends": len(backends),
                         "detail": f"no backend is up ({why_down(backends)})"}, status=503)


class StatusHandler(JsonHandler):
    def get(self) -> None:
        self.write_json(self.service.snapshot(time.time()))


class PageHandler(web.StaticFileHandler):
    """Static test page; no API key needed to load it (the page asks for one)."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise web.HTTPError(404) from None

    def write_error(self, status_code: int, **kwargs) -> None:
        # JSON like every other answer of the bridge; never tornado's page, never a path on disk.
        reasons = {403: "not a file of the test page", 404: "no such file"}
        write_detail(self, status_code, f"{reasons.get(status_code, self._reason)}: {self.request.path}")

    def _request_summary(self) -> str:
        return request_summary(self.request)


routes = [
    (r"/generation-count", GenerationCountHandler),
    (r"/healthz", HealthHandler),
    (r"/status", StatusHandler),
]


def static_routes(static_dir: str) -> list:
    return [(r"/()", PageHandler, {"path": static_dir, "default_filename": "index.html"}),
            (r"/static/(.*)", PageHandler, {"path": static_dir})]
