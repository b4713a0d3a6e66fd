"""Who listens for which clientId: at most one websocket per clientId, and the heartbeats.

The core publishes a client's status here; the websocket handler registered for that clientId
(if any) sends it. A second socket with the same clientId replaces the first.

Heartbeats scale with the sockets that are due, not with all sockets: the hub keeps its sinks
in the order it last sent to them (oldest first), so a beat stops at the first sink that is not
due. A beat sends at most `BEATS_PER_SLICE` heartbeats and lets the event loop serve everything
else before the next slice: with 10,000 sockets opened in one burst, their heartbeats never
stall the loop for long, and they spread out by themselves after the first round.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Protocol

from tornado.ioloop import PeriodicCallback


class StatusSink(Protocol):
    last_sent: float
    tenant: str       # whose socket it is: its clientId is that tenant's while it is open

    def send_status(self, message: dict, final: bool) -> None: ...
    def send_heartbeat(self) -> None: ...
    def replaced(self) -> None: ...


class StatusHub:
    BEATS_PER_SLICE = 200   # ~5 ms of work per slice at ~25 us per heartbeat

    def __init__(self, heartbeat_interval: float):
        self.heartbeat_interval = heartbeat_interval
        # clientId -> sink, least recently sent to first (attach, publish and beats move a sink to the end).
        self._sinks: OrderedDict[str, StatusSink] = OrderedDict()
        self._heartbeat: PeriodicCallback | None = None
        self._next_slice: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._sinks)

    def start(self) -> None:
        # Checking ten times per interval keeps a heartbeat within 1.1 intervals of silence;
        # a check costs nothing when no sink is due.
        self._heartbeat = PeriodicCallback(self._tick, self.heartbeat_interval * 100)
        self._heartbeat.start()

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._next_slice is not None:
            self._next_slice.cancel()
            self._next_slice = None

    def attach(self, client_id: str, sink: StatusSink) -> None:
        previous = self._sinks.pop(client_id, None)
        self._sinks[client_id] = sink
        if previous is not None and previous is not sink:
            previous.replaced()

    def detach(self, client_id: str, sink: StatusSink) -> bool:
        """Forget `sink`; False when another socket has replaced it already."""
        if self._sinks.get(client_id) is sink:
            del self._sinks[client_id]
            return True
        return False

    def connected(self, client_id: str) -> bool:
        return client_id in self._sinks

    def owner(self, client_id: str) -> str | None:
        """The tenant of the clientId's socket, None without one."""
        sink = self._sinks.get(client_id)
        return None if sink is None else sink.tenant

    def publish(self, client_id: str, message: dict, final: bool = False) -> bool:
        """Send to the client's socket; True when one was there to take it."""
        sink = self._sinks.get(client_id)
        if sink is None:
            return False
        self._sinks.move_to_end(client_id)
        sink.send_status(message, final)
        return True

    def _tick(self) -> None:
        if self._next_slice is None:  # else a round of slices is still going
            self._beat()

    def _beat(self) -> None:
        self._next_slice = None
        due = time.monotonic() - self.heartbeat_interval
        sinks = self._sinks
        for _ in range(self.BEATS_PER_SLICE):
            if not sinks:
                return
            client_id = next(iter(sinks))
            sink = sinks[client_id]
            if sink.last_sent > due:
                return  # the oldest is not due: none is
            sinks.move_to_end(client_id)
            sink.send_heartbeat()
        # More may be due: the next slice runs once the loop has served what is ready now.
        self._next_slice = asyncio.get_running_loop().call_soon(self._beat)
