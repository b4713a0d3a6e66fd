"""GET /metrics: the bridge's Prometheus series (text format; OpenMetrics when asked for)."""
from __future__ import annotations

from prometheus_client.exposition import choose_encoder

from .base import JsonHandler


class MetricsHandler(JsonHandler):
    """Behind the API key like every endpoint but /healthz (Prometheus: `authorization:
    {credentials: <key>}` in the scrape config)."""

    def get(self) -> None:
        encoder, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(encoder(self.application.settings["metrics"].registry))


routes = [(r"/metrics", MetricsHandler)]
