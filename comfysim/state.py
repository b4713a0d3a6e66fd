"""Per-process state of a simulated server: websocket registry + outgoing messages, and the queue.

Both live exactly as long as one simulated ComfyUI process: `crash()` throws them away.
"""
from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import logging

from tornado.websocket import WebSocketClosedError

from . import protocol
from .profiles import SENSITIVE_EXTRA_DATA_KEYS, Profile

log = logging.getLogger("comfysim")

MAX_HISTORY = 10000


class Hub:
    """Who is connected, and one ordered outbox for everything the executor and queue send.

    Like ComfyUI's `send_sync`, messages are queued and a single publisher delivers them;
    the target socket is looked up by client id *at delivery time*, so a message for an
    unregistered id is dropped, and `sid=None` goes to every registered socket.
    """

    def __init__(self, gate, spec: Profile, dropped: set[str] | None = None):
        # Messages the imitated version never sends (see the package docstring).
        self.absent = frozenset(event for event, present in (
            ("execution_success", spec.execution_success), ("progress_state", spec.progress_state),
            ("feature_flags", spec.feature_flags)) if not present)
        self.sockets: dict[str, object] = {}      # clientId -> handler (the registered one)
        self.metadata: dict[str, dict] = {}       # clientId -> {"feature_flags": {...}}
        self.open_handlers: set = set()           # every open socket, zombies included
        self.client_id: str | None = None         # client_id of the prompt that runs (or ran last)
        self.last_node_id: str | None = None      # node of the last `executing`, None when idle
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._gate = gate
        self.dropped = dropped if dropped is not None else set()   # the sim's drop_events knob

    def send(self, event: str, data, sid: str | None = None) -> None:
        if event in self.absent or event in self.dropped:
            return
        # Serialised now: the sender may keep mutating `data` (progress_state does).
        self._outbox.put_nowait((protocol.text_frame(event, data), False, sid))

    def send_binary(self, frame: bytes, sid: str | None = None) -> None:
        self._outbox.put_nowait((frame, True, sid))

    def supports_preview_metadata(self, sid: str | None) -> bool:
        meta = self.metadata.get(sid) if sid is not None else None
        return bool(meta) and meta["feature_flags"].get("supports_preview_metadata", False) is True

    async def publish_forever(self) -> None:
        while True:
            message, binary, sid = await self._outbox.get()
            await self._gate()  # a hung server sends nothing
            if sid is None:
                targets = list(self.sockets.values())
            else:
                targets = [self.sockets[sid]] if sid in self.sockets else []
            for handler in targets:
                await deliver(handler, message, binary)

    def close_all_abruptly(self) -> None:
        for handler in list(self.open_handlers):
            conn = handler.ws_connection
            if conn is not None and conn.stream is not None:
                conn.stream.close()  # no close frame: the peer sees the TCP connection drop


async def deliver(handler, message, binary=False) -> None:
    try:
        await handler.write_message(message, binary=binary)
    except WebSocketClosedError:
        pass


class PromptQueue:
    """ComfyUI's PromptQueue: a heap of pending items, the running one, and the history.

    An item is `[number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive]`;
    everything the HTTP routes show is the first five elements (`view`), and `sensitive`
    (the extra_data keys split off at submission, {} unless the profile splits them) only
    goes back into extra_data for the executor.
    """

    def __init__(self, hub: Hub, spec: Profile):
        self.hub = hub
        self.spec = spec
        self.number = 0                 # the server's counter for POST /prompt without "number"
        self._heap: list = []           # (number, prompt_id, seq, item)
        self._seq = itertools.count()   # tie-breaker: ComfyUI would compare the dicts and fail
        self._task_ids = itertools.count()
        self.running: dict[int, list] = {}
        self.history: dict[str, dict] = {}
        self.flags: dict = {}
        self.wakeup = asyncio.Event()

    # -- queue ------------------------------------------------------------------------------
    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def _updated(self) -> None:
        self.hub.send("status", {"status": self.queue_info()})

    def put(self, item: list) -> None:
        heapq.heappush(self._heap, (item[0], item[1], next(self._seq), item))
        self._updated()
        self.wakeup.set()

    def pop(self):
        """Next item and its task id, or None; the item counts as running from now on."""
        if not self._heap:
            return None
        item = heapq.heappop(self._heap)[3]
        task_id = next(self._task_ids)
        self.running[task_id] = copy.deepcopy(item)
        self._updated()
        return item, task_id

    @staticmethod
    def view(item: list) -> list:
        """The five elements ComfyUI shows: [number, prompt_id, prompt, extra_data, outputs]."""
        return item[:5]

    def current(self) -> tuple[list, list]:
        # queue_pending is the raw heap array, not sorted (as in ComfyUI)
        return [self.view(i) for i in self.running.values()], [self.view(entry[3]) for entry in self._heap]

    def delete_pending(self, prompt_id) -> bool:
        for i, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                self._heap.pop(i)
                heapq.heapify(self._heap)
                self._updated()
                return True
        return False

    def wipe(self) -> None:
        self._heap = []
        self._updated()

    def is_running(self, prompt_id) -> bool:
        return any(item[1] == prompt_id for item in self.running.values())

    def task_done(self, task_id: int, history_result: dict, status: dict) -> None:
        prompt = self.view(self.running.pop(task_id))
        if self.spec.sensitive == "history" and isinstance(prompt[3], dict):
            prompt[3] = {k: v for k, v in prompt[3].items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": status, **history_result}
        self._updated()

    # -- flags set by POST /free, applied by the worker between prompts --------------------
    def set_flag(self, name: str, value) -> None:
        self.flags[name] = value
        self.wakeup.set()

    def take_flags(self) -> dict:
        flags, self.flags = self.flags, {}
        return flags

    # -- history ----------------------------------------------------------------------------
    def get_history(self, prompt_id=None, max_items=None, offset=-1) -> dict:
        if prompt_id is not None:
            entry = self.history.get(prompt_id)
            return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out = {}
        for i, (key, entry) in enumerate(self.history.items()):
            if i >= offset:
                out[key] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def delete_history(self, prompt_id) -> None:
        self.history.pop(prompt_id, None)

    def wipe_history(self) -> None:
        self.history.clear()
