"""Who listens for which clientId: at most one websocket per clientId, and the heartbeats.

The core publishes a client's status here; the websocket handler registered for that clientId
(if any) sends it. A second socket with the same clientId replaces the first.
"""
from __future__ import annotations

import time
from typing import Protocol

from tornado.ioloop import PeriodicCallback


class StatusSink(Protocol):
    last_sent: float

    def send_status(self, message: dict, final: bool) -> None: ...
    def send_heartbeat(self) -> None: ...
    def replaced(self) -> None: ...


class StatusHub:
    def __init__(self, heartbeat_interval: float):
        self.heartbeat_interval = heartbeat_interval
        self._sinks: dict[str, StatusSink] = {}
        self._heartbeat: PeriodicCallback | None = None

    def __len__(self) -> int:
        return len(self._sinks)

    def start(self) -> None:
        # Checking every quarter interval keeps a heartbeat within 1.25 intervals of silence.
        self._heartbeat = PeriodicCallback(self._beat, self.heartbeat_interval * 250)
        self._heartbeat.start()

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def attach(self, client_id: str, sink: StatusSink) -> None:
        previous = self._sinks.get(client_id)
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

    def publish(self, client_id: str, message: dict, final: bool = False) -> bool:
        """Send to the client's socket; True when one was there to take it."""
        sink = self._sinks.get(client_id)
        if sink is None:
            return False
        sink.send_status(message, final)
        return True

    def _beat(self) -> None:
        due = time.monotonic() - self.heartbeat_interval
        for sink in list(self._sinks.values()):
            if sink.last_sent <= due:
                sink.send_heartbeat()
