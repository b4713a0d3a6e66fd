"""One prompt's websocket events: how it ends, and everything else for progress."""
from __future__ import annotations

import asyncio
from typing import Callable


class PromptWatch:
    """Registered with `Backend.listen`; `outcome` resolves to ("success" | "error" |
    "interrupted", data) when ComfyUI says the prompt ended. Other events go to `on_event`."""

    def __init__(self, on_event: Callable[[str, dict], None]):
        self.on_event = on_event
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_backend_event(self, kind: str, data: dict) -> None:
        if self.outcome.done():
            return
        if kind == "execution_error" and data.get("exception_type") != "ExecutionBlocked":
            self.outcome.set_result(("error", data))
        elif kind == "execution_interrupted":
            self.outcome.set_result(("interrupted", data))
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            # Servers before mid-2024 only end a prompt with `executing {node: null}`.
            self.outcome.set_result(("success", data))
        else:
            self.on_event(kind, data)

    def resolve(self, outcome: tuple[str, dict]) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)
