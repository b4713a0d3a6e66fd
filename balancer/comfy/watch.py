"""One prompt's websocket events: how it ends, and everything else for progress."""
from __future__ import annotations

import asyncio
from typing import Callable


class PromptWatch:
    """Registered with `Backend.listen`; `outcome` resolves to ("success" | "error" |
    "interrupted", data) when ComfyUI says the prompt ended. Other events go to `on_event`.

    `outputs` keeps the `output` of every `executed` event (node id -> its UI output, None for
    a cached node without one), so the files can be known without asking for the history;
    `entry` is the history entry the end was read from, when it was (`resolve`)."""

    def __init__(self, on_event: Callable[[str, dict], None]):
        self.on_event = on_event
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.outputs: dict[str, dict | None] = {}
        self.entry: dict | None = None

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
            if kind == "executed" and data.get("node") is not None:
                output = data.get("output")
                self.outputs[str(data["node"])] = output if isinstance(output, dict) else None
            self.on_event(kind, data)

    def resolve(self, outcome: tuple[str, dict], entry: dict | None = None) -> None:
        """The end, read from the history entry `entry` (the websocket missed it)."""
        if not self.outcome.done():
            self.entry = entry
            self.outcome.set_result(outcome)
