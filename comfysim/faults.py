"""Fault injection for tests: which route a request belongs to, and what to do to it.

The knobs live on SimulatedComfy (see its docstring); `apply()` runs in every handler's
prepare(), after the hang gate and the origin check, before the route does anything.
"""
from __future__ import annotations

import asyncio
import json
import logging

log = logging.getLogger("comfysim")

# Route names a fault key may use (the first path segment, /api prefixes removed).
ROUTES = frozenset({"prompt", "queue", "history", "view", "upload", "interrupt", "free", "object_info",
                    "system_stats", "features", "models", "embeddings", "jobs", "ws"})
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})

TEXT_500 = "500 Internal Server Error\n\nServer got itself in trouble"


def parse_key(key: str) -> tuple[str | None, str]:
    """"history" -> (None, "history"); "GET history" -> ("GET", "history"); unknown -> ValueError."""
    parts = key.split()
    method = None
    if len(parts) == 2 and parts[0].upper() in METHODS:
        method, parts = parts[0].upper(), parts[1:]
    if len(parts) != 1 or parts[0] not in ROUTES:
        raise ValueError(f"unknown fault route {key!r}: use one of {sorted(ROUTES)}, optionally after a method")
    return method, parts[0]


def route_of(path: str) -> str:
    """'/api/history/abc' -> 'history', '/upload/image' -> 'upload', '/api/api/jobs' -> 'jobs'."""
    while path == "/api" or path.startswith("/api/"):
        path = path[4:]
    return path.lstrip("/").split("/", 1)[0]


def _matches(key: str, method: str, route: str) -> bool:
    key_method, key_route = parse_key(key)
    return key_route == route and key_method in (None, method)


def _poisoned(sim, body: bytes) -> bool:
    markers = sim.fail_prompts_containing
    if not markers:
        return False
    if isinstance(markers, str):
        markers = (markers,)
    text = body.decode("utf-8", "replace")
    try:  # also the decoded form, for markers a client sent \\u-escaped
        text += "\n" + json.dumps(json.loads(body), ensure_ascii=False)
    except ValueError:
        pass
    return any(m in text for m in markers)


async def apply(handler, rt) -> bool:
    """Stall and/or fail this request as the knobs say; True if it was answered (500)."""
    sim, req = handler.sim, handler.request
    method, route = req.method, route_of(req.path)
    for key, pending in sim._stalls.items():
        if pending and _matches(key, method, route):
            seconds = pending.popleft()
            sim.fault_log.append(("stall", method, req.uri))
            released = asyncio.Event()
            sim._stall_releases.add(released)
            sim.stalling += 1
            try:
                await _sleep_unless(seconds, rt.dead, released)
            finally:
                sim.stalling -= 1
                sim._stall_releases.discard(released)
            if rt.dead.is_set():  # the process died meanwhile: no answer at all
                req.connection.close()
                return True
            break
    failed = None
    for key, every in sim._fail_every.items():
        if _matches(key, method, route):
            sim.fault_counts[key] += 1
            if sim.fault_counts[key] % every == 0:
                failed = "fail_every"
    if failed is None and route == "prompt" and method == "POST" and _poisoned(sim, req.body):
        failed = "poison"
    if failed is None:
        return False
    sim.fault_log.append((failed, method, req.uri))
    log.warning("comfysim %s: injected 500 (%s) for %s %s", sim.name, failed, method, req.uri)
    handler.clear_header("Content-Type")
    handler.set_status(500)
    handler.set_header("Content-Type", "text/plain; charset=utf-8")
    handler.finish(TEXT_500)
    return True


async def _sleep_unless(seconds: float, *events: asyncio.Event) -> None:
    """Sleep, or less if one of the events is set (the process died, the test released it)."""
    waiters = {asyncio.ensure_future(asyncio.sleep(seconds)), *(asyncio.ensure_future(e.wait()) for e in events)}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
