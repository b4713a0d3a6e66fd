"""The ComfyUI calls the bridge makes, by what they mean. Each takes the `Backend` to ask."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .answers import queue_prompt_ids, refuses_prompt_id
from .http import BackendRejected, BackendUnavailable

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger("bridge.backend")
# Seconds a finished prompt's history entry waits for others to be deleted with it.
FORGET_AFTER = 0.5


async def submit_prompt(backend: "Backend", graph: dict, prompt_id: str):
    """POST /prompt under our websocket's client id; returns the answer (prompt_id, node_errors).

    `prompt_id` is canonical UUID text, which current servers require; a server that refuses
    a client-chosen id anyway is asked to make its own (the caller follows the answer's id)."""
    body = {"prompt": graph, "client_id": backend.ws_client_id}
    if backend.accepts_prompt_ids:
        try:
            return await backend.http.call("POST", "/prompt", {**body, "prompt_id": prompt_id}, refusable=True)
        except BackendRejected as exc:
            if not refuses_prompt_id(exc.body):
                raise
            log.warning("backend %s refuses client-chosen prompt ids; letting it choose", backend.address)
            backend.accepts_prompt_ids = False
    return await backend.http.call("POST", "/prompt", body, refusable=True)


async def has_prompt(backend: "Backend", prompt_id: str) -> bool:
    """Whether the backend knows the prompt: waiting, running or in its history."""
    running, pending = await prompts_on_backend(backend)
    return prompt_id in running | pending or await history_entry(backend, prompt_id) is not None


async def history_entry(backend: "Backend", prompt_id: str) -> dict | None:
    """The prompt's history entry, or None while ComfyUI has none (pending, running, unknown)."""
    answer = await backend.http.call("GET", f"/history/{prompt_id}")
    if isinstance(answer, dict) and isinstance(answer.get(prompt_id), dict):
        return answer[prompt_id]
    return None


async def prompts_on_backend(backend: "Backend") -> tuple[set[str], set[str]]:
    """Prompt ids running and waiting on the backend."""
    return queue_prompt_ids(await backend.http.call("GET", "/queue"))


async def stop_prompt(backend: "Backend", prompt_id: str) -> None:
    """Stop one prompt and nothing else: delete it if still waiting, interrupt it if running.
    Current servers do that atomically (POST /api/jobs/{id}/cancel); others are asked what
    runs first, which leaves a short window in which the next prompt could start."""
    try:
        if backend.has_cancel_route is not False:
            try:
                await backend.http.call("POST", f"/api/jobs/{prompt_id}/cancel", {})
                backend.has_cancel_route = True
                return
            except BackendRejected as exc:
                if exc.status not in (404, 405):
                    raise
                backend.has_cancel_route = False   # until it reconnects: perhaps upgraded
        running, pending = await prompts_on_backend(backend)
        if prompt_id in pending:
            await backend.http.call("POST", "/queue", {"delete": [prompt_id]})
        elif prompt_id in running:
            # Only when it runs now: servers older than 2025-09 ignore the prompt_id and
            # interrupt whatever runs, which is then this prompt.
            await backend.http.call("POST", "/interrupt", {"prompt_id": prompt_id})
    except (BackendUnavailable, BackendRejected) as exc:
        log.warning("could not stop prompt %s on %s: %s", prompt_id, backend.address, exc)


async def forget_prompts(backend: "Backend", prompt_ids: list[str]) -> None:
    """Delete history entries whose results the bridge has stored (or no longer wants)."""
    try:
        await backend.http.call("POST", "/history", {"delete": prompt_ids})
    except (BackendUnavailable, BackendRejected):
        pass


class HistoryCleanup:
    """History entries whose results the bridge has stored, deleted in batches: one POST /history
    per backend every FORGET_AFTER seconds at most, not one per job (a call costs both sides
    more than the entries it names). Entries still waiting when the bridge stops stay on their
    backend, under ComfyUI's own history limit, as after a crash."""

    def __init__(self):
        self._waiting: dict["Backend", list[str]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task] = set()

    def forget(self, backend: "Backend", prompt_id: str) -> None:
        self._waiting.setdefault(backend, []).append(prompt_id)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FORGET_AFTER, self.flush)

    def flush(self) -> None:
        """Send what waits now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, {}
        for backend, prompt_ids in waiting.items():
            call = asyncio.ensure_future(forget_prompts(backend, prompt_ids))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for call in self._calls:
            call.cancel()


async def stop_and_forget(backend: "Backend", prompt_ids: list[str]) -> None:
    for prompt_id in prompt_ids:
        await stop_prompt(backend, prompt_id)
    await forget_prompts(backend, prompt_ids)


async def free_memory(backend: "Backend") -> bool:
    """POST /free: unload models and free memory; False when the backend did not do it."""
    try:
        await backend.http.call("POST", "/free", {"unload_models": True, "free_memory": True})
    except (BackendUnavailable, BackendRejected) as exc:
        log.warning("free on %s failed: %s", backend.address, exc)
        return False
    backend.record_freed()
    log.info("backend %s asked to free memory", backend.address)
    return True
