"""WS /ws?clientId=: a client's job status, live.

Validation and the API key are checked in `get()`, before the upgrade, so a bad request gets
a plain 400/401. Closing the socket while the job is queued or running cancels the job; a
second socket with the same clientId replaces this one without cancelling anything.
"""
from __future__ import annotations

import logging
import time

from tornado import websocket

from balancer.jobs import CONNECTED_DETAIL, LISTENING_DETAIL, status_message

from .base import AccessMixin, ApiError, to_json, write_detail
from .tornado_shim import write_text_frame_nowait

log = logging.getLogger("bridge.ws")

REPLACED_DETAIL = "replaced by a new connection"
# The same text every time, to every socket: encoded once (10,000 sockets get ~8,000 a second).
LISTENING_TEXT = to_json(status_message("listening", LISTENING_DETAIL))
LISTENING_BYTES = LISTENING_TEXT.encode()


class StatusSocket(AccessMixin, websocket.WebSocketHandler):
    client: str = ""
    channel: str = ""    # its key in the hub: the clientId, unless another tenant holds that
    last_sent: float = 0.0
    _ending = False      # the server ends this socket (final status sent, or replaced)

    async def get(self, *args, **kwargs):
        try:
            self.check_access(self.get_query_argument("token", None))
            self.client = self.client_id()
            if self.request.headers.get("Upgrade", "").lower() != "websocket":
                raise ApiError(400, "GET /ws is a websocket: connect with a websocket client "
                                    "(headers 'Upgrade: websocket' and 'Connection: Upgrade')")
        except ApiError as exc:
            return write_detail(self, exc.status_code, exc.detail, exc.headers)
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        return True  # no cookies are used; the API key (if any) is the access control

    def open(self, *args, **kwargs) -> None:
        # Status frames are small and the client never answers them: with Nagle's algorithm
        # each would wait for the client's delayed ACK (40 ms on Linux).
        self.set_nodelay(True)
        self.channel = self.client
        if self.service.holder(self.client) not in (None, self.tenant):
            # Another tenant's clientId: this socket is what an unknown clientId's is (connected,
            # then heartbeats) and hears nothing of that job, nor replaces its socket.
            self.channel = f"{self.client} of {self.tenant}"   # never a clientId (no spaces)
        self.hub.attach(self.channel, self)
        self._send(status_message("connected", CONNECTED_DETAIL))
        job = self.service.get(self.client, self.tenant)
        if job is not None:
            message = self.service.status(job)
            if job.ended:
                self.send_status(message, final=True)
            elif message["status"] == "progress" or self.service.waiting_for(job) is not None:
                self._send(message)

    # StatusSink ----------------------------------------------------------------------
    def send_status(self, message: dict, final: bool) -> None:
        self._send(message)
        if final and not self._ending:
            self._ending = True
            self.close()

    def send_heartbeat(self) -> None:
        """The same bytes to every socket, with no completion to wait for (see tornado_shim)."""
        self.last_sent = time.monotonic()
        if not write_text_frame_nowait(self, LISTENING_BYTES):
            self._send_text(LISTENING_TEXT)

    def replaced(self) -> None:
        self._ending = True
        self._send(status_message("closed", REPLACED_DETAIL))
        self.close()

    # ---------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        self._send_text(to_json(message))

    def _send_text(self, text: str) -> None:
        self.last_sent = time.monotonic()
        try:
            future = self.write_message(text)
        except websocket.WebSocketClosedError:
            return
        future.add_done_callback(_ignore_closed)

    def on_message(self, message) -> None:
        pass  # clients have nothing to say; pings are answered by tornado

    def on_close(self) -> None:
        if not self.client:
            return
        if self.hub.detach(self.channel, self) and not self._ending and self.channel == self.client:
            # The client left while its job waits or runs: nobody will take the result.
            self.service.cancel(self.client, "interrupted: the client closed its websocket", tenant=self.tenant)


def _ignore_closed(future) -> None:
    if not future.cancelled():
        future.exception()  # a closed stream is expected here; retrieving it silences asyncio


routes = [(r"/ws", StatusSocket)]
