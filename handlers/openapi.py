"""GET /openapi.json: the hand-written OpenAPI 3.1 description of the bridge (openapi.json beside
this file; tests/test_openapi.py validates it and checks every route is described)."""
from __future__ import annotations

import functools
from pathlib import Path

from .base import JsonHandler

DOCUMENT = Path(__file__).with_name("openapi.json")


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    return DOCUMENT.read_bytes()


class OpenApiHandler(JsonHandler):
    """Behind the API key like every endpoint but /healthz and the test page (API.md)."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(document_bytes())


routes = [(r"/openapi.json", OpenApiHandler)]
