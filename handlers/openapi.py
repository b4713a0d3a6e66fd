"""GET /openapi.json: the hand-written OpenAPI 3.1 description of the bridge (openapi.json beside
this file; tests/test_openapi.py validates it and checks every route is described). Its
`info.version` is the bridge's own (comfy_bridge_version.py), set here; GET /docs renders it."""
from __future__ import annotations

import functools
from pathlib import Path

import ujson

from comfy_bridge_version import __version__

from .base import JsonHandler, to_json_bytes

DOCUMENT = Path(__file__).with_name("openapi.json")


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    document = ujson.loads(DOCUMENT.read_bytes())
    document["info"]["version"] = __version__
    return to_json_bytes(document)


class OpenApiHandler(JsonHandler):
    """Behind the API key like every endpoint but /healthz and the test page (API.md)."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(document_bytes())


routes = [(r"/openapi.json", OpenApiHandler)]
