"""Comfy API v2 under /api/v2 (balancer/v2/ is what they call): jobs and assets."""
from __future__ import annotations

from . import assets, jobs

routes = [*jobs.routes, *assets.routes]
