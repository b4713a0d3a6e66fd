"""The bridge's HTTP/1.1 connections: `BridgeHTTPServer`, tornado's HTTPServer with what it
leaves to the application done in one place, for every request before any handler sees it.

- **An early answer** (a refusal written before the request's body was read: a 401, a 400 for
  a wrong Content-Type or part type, a 413) reaches the client, and the client knows what
  became of the connection. tornado would close it as soon as the answer is written, with
  the rest of the body unread, so the kernel resets it (the client may never read the answer)
  and without `Connection: close` (a pooling client sends its next request on a dead socket).
  Instead, like nginx's lingering close: a rest of at most `DRAIN_LIMIT` bytes (by
  Content-Length) is read and dropped and the connection stays open for the next request;
  a larger or unknown rest (chunked, or a client waiting for `100 Continue`) gets the answer
  with `Connection: close`, then a half-close (FIN after the answer) while what the client
  still sends is read and dropped, for at most `LINGER_SECONDS` (or `LINGER_SILENCE` of
  silence), so that the client can finish sending and then read the answer.
- **BODY_TIMEOUT is a limit on silence**: a body may take as long as it needs while data keeps
  coming; a client silent for that long in the middle of one is dropped (nginx's
  `client_body_timeout`). Time the bridge itself spends on a chunk (writing an upload to disk)
  does not count. There is no limit on a body's total time: it would refuse a large upload
  over a slow link; what one client may hold is the proxy's to bound (connections per client).
- **Refused clients wait their turn**: a connection whose answer was "retry later" (a 429 or
  503 with `Retry-After`: the queue is full) gets that answer at once, but reads its next
  request only in turn: `REFUSED_PER_TURN` such connections per turn, one turn every
  `REFUSED_TURN_SECONDS` at most. A client that retries at once on the same connection
  would otherwise have its refusals take the loop from the accepted jobs (measured: the loop
  answering 1,700 refusals/s at a full core, the backends busy a quarter of the time); a
  client that honours `Retry-After` never waits here.
- **Header limits**: more than `MAX_HEADER_COUNT` header lines, or a header block over
  `MAX_HEADER_BYTES`, is answered `431` with a JSON `{"detail"}` and `Connection: close`.
  tornado itself drops a header block over its `max_header_size` without an answer:
  `tornado_shim.on_read_limit` hands the bridge the socket first.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import Awaitable

from tornado import httpserver, httputil
from tornado.iostream import IOStream, StreamClosedError

from .base import detail_body
from .tornado_shim import on_read_limit

log = logging.getLogger("bridge.http")

DRAIN_LIMIT = 1024 * 1024   # bytes of a body still to come that are read and dropped after an early answer
LINGER_SECONDS = 30.0       # at most this long reading and dropping after an answer with Connection: close
LINGER_SILENCE = 5.0        # ... and not once the client has been silent this long
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100
REFUSED_PER_TURN = 4        # connections answered "retry later" that may read their next request per turn
REFUSED_TURN_SECONDS = 0.01  # ... one turn this often at most: 400 refused requests/s, a tenth of a core
_TOO_LARGE = (431, "Request Header Fields Too Large")
_UNLIMITED = 1 << 62        # a body read only to be dropped is not held to the request's limit

_DRAIN, _CLOSE = "drain", "close"


class BridgeHTTPServer(httpserver.HTTPServer):
    """`body_silence`: seconds a client may be silent in the middle of a request's body (not
    tornado's `body_timeout`, a limit on the whole body). `max_header_size` is fixed here."""

    def initialize(self, request_callback, *, body_silence: float, **kwargs) -> None:
        super().initialize(request_callback, max_header_size=MAX_HEADER_BYTES, **kwargs)
        self.body_silence = body_silence
        self._awaiting_headers: set[IOStream] = set()
        self._lingering: set[asyncio.Task] = set()
        self._refused: collections.deque = collections.deque()   # their `finish`, in turn
        self._turn_scheduled = False
        self._last_turn = float("-inf")

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        super().handle_stream(stream, address)
        on_read_limit(stream, lambda: self._read_limit_hit(stream))

    def start_request(self, server_conn, request_conn) -> httputil.HTTPMessageDelegate:
        exchange = _Exchange(self, request_conn)
        exchange.app = super().start_request(server_conn, exchange.reply)
        self._awaiting_headers.add(request_conn.stream)
        return exchange

    def on_close(self, server_conn) -> None:
        self._awaiting_headers.discard(server_conn.stream)
        super().on_close(server_conn)

    def headers_arrived(self, stream: IOStream) -> None:
        self._awaiting_headers.discard(stream)

    def _read_limit_hit(self, stream: IOStream) -> None:
        """tornado is about to close `stream`: a read went past its limit."""
        if stream not in self._awaiting_headers:
            return  # not the header block (a malformed chunked body): tornado's close stands
        self._awaiting_headers.discard(stream)
        log.warning("431 from %s: header block over %d bytes", _peer(stream), MAX_HEADER_BYTES)
        body = detail_body(f"request headers are over {MAX_HEADER_BYTES} bytes")
        head = (f"HTTP/1.1 {_TOO_LARGE[0]} {_TOO_LARGE[1]}\r\n"
                f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.linger(stream.socket.dup(), first=head + body)

    def in_turn(self, finish) -> None:
        """Call `finish` (which lets a refused connection read its next request) in turn."""
        self._refused.append(finish)
        self._schedule_turn()

    def _schedule_turn(self) -> None:
        if self._turn_scheduled or not self._refused:
            return
        self._turn_scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_at(max(loop.time(), self._last_turn + REFUSED_TURN_SECONDS), self._next_turn)

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        self._last_turn = asyncio.get_running_loop().time()
        for _ in range(min(REFUSED_PER_TURN, len(self._refused))):
            self._refused.popleft()()
        self._schedule_turn()

    def linger(self, sock: socket.socket, flushed: Awaitable | None = None, first: bytes = b"") -> None:
        """Close `sock` gracefully, in the background: after `flushed` (tornado wrote its answer)
        and `first` are sent, FIN, then read and drop what the client still sends."""
        task = asyncio.ensure_future(_linger(sock, flushed, first))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    async def close_all_connections(self) -> None:
        await super().close_all_connections()
        tasks = list(self._lingering)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _linger(sock: socket.socket, flushed: Awaitable | None, first: bytes) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_SECONDS
    try:
        sock.setblocking(False)
        if flushed is not None:
            with contextlib.suppress(StreamClosedError):
                await asyncio.wait_for(flushed, LINGER_SECONDS)
        if first:
            await asyncio.wait_for(loop.sock_sendall(sock, first), LINGER_SECONDS)
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(loop.sock_recv(sock, 65536), min(LINGER_SILENCE, left)):
                break  # the client closed its side: nothing more can arrive
    except (OSError, asyncio.TimeoutError):
        pass  # reset, gone, or too slow: the bound is reached either way
    finally:
        sock.close()


class _Exchange(httputil.HTTPMessageDelegate):
    """One request. tornado's connection delivers it here, and the application (`app`, its
    delegate) gets it from here; the application answers through `reply`, which is tornado's
    connection but for the answer's end (see the module's docstring)."""

    def __init__(self, server: BridgeHTTPServer, conn):
        self.server = server
        self.conn = conn
        self.reply = _Reply(self, conn)
        self.app: httputil.HTTPMessageDelegate | None = None
        self._app_has_it = False      # the application got the headers
        self._length: int | None = None
        self._received = 0
        self._ending: str | None = None   # set when the answer starts before the body was read
        self._retry_later = False         # the answer says "retry later": the next request waits its turn
        self._must_close = False
        self._body_done = False
        self._finish_waits = False
        self._busy = 0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- tornado's side: the request

    def headers_received(self, start_line, headers):
        self.server.headers_arrived(self.conn.stream)
        length = headers.get("Content-Length")
        self._length = int(length) if length is not None and length.isdigit() else None
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        # Without a plain length, or with a client waiting for "100 Continue" before it sends
        # the body, an early answer closes: what follows might be the next request.
        self._must_close = (chunked or (length is not None and self._length is None)
                            or headers.get("Expect", "").lower() == "100-continue")
        if chunked or self._length:
            self._watch_silence()
        count = sum(1 for _ in headers.get_all())
        if count > MAX_HEADER_COUNT:
            log.warning("431 from %s: %d header lines", self.conn.context.remote_ip, count)
            self._answer_directly(_TOO_LARGE, f"request has {count} header lines; the limit is "
                                              f"{MAX_HEADER_COUNT}")
            return None
        self._app_has_it = True
        return self._working(self.app.headers_received(start_line, headers))

    def data_received(self, chunk: bytes):
        self._received += len(chunk)
        self._last_read = asyncio.get_running_loop().time()
        if self._ending is not None or not self._app_has_it:
            return None  # answered already: the rest is dropped
        return self._working(self.app.data_received(chunk))

    def finish(self) -> None:
        self._body_done = True
        self._stop_watching()
        if self._finish_waits:   # an early answer waited for the rest of the body
            self._finish_waits = False
            self._finish_answer()
        if self._app_has_it:
            self.app.finish()

    def on_connection_close(self) -> None:
        self._stop_watching()
        self.server.headers_arrived(self.conn.stream)
        if self._app_has_it:
            self.app.on_connection_close()

    # -- the application's side: the answer

    def answer_starts(self, start_line, headers: httputil.HTTPHeaders) -> None:
        self._retry_later = start_line.code in (429, 503) and "Retry-After" in headers
        if self._body_done or self._ending is not None:
            return
        rest = (self._length or 0) - self._received
        if self._must_close or rest > DRAIN_LIMIT:
            self._ending = _CLOSE
            headers["Connection"] = "close"
            self._stop_watching()
            limit = _UNLIMITED
        else:
            self._ending = _DRAIN
            limit = self._length or 0
        if limit:  # tornado must not refuse (with a bare 400 after ours) a body it reads to drop
            self.conn.set_max_body_size(limit)

    def answer_ends(self) -> None:
        if self._ending is None or self._body_done:
            # (Nothing is left unread. After a `Connection: close` whose body then arrived in
            # full, tornado keeps the connection until the client closes it, as told.)
            return self._finish_answer()
        if self._ending == _DRAIN:
            self._finish_waits = True   # finish() above, once the rest is read
            self.conn.stream.set_nodelay(True)
            return None
        stream = self.conn.stream
        sock = stream.socket.dup()      # tornado's close then leaves the TCP connection open
        self.conn.finish()              # tornado closes its side once the answer is written
        flushed = None if stream.closed() else stream.write(b"")
        self.server.linger(sock, flushed)
        return None

    def _finish_answer(self) -> None:
        """tornado's end of the answer, after which it reads the connection's next request."""
        if self._retry_later:
            self.conn.stream.set_nodelay(True)  # the answer goes out now; only the next read waits
            self.server.in_turn(self.conn.finish)
        else:
            self.conn.finish()

    def _answer_directly(self, status: tuple[int, str], detail: str) -> None:
        body = detail_body(detail)
        self._must_close = True
        headers = httputil.HTTPHeaders({"Content-Type": "application/json; charset=utf-8",
                                        "Content-Length": str(len(body))})
        self.reply.write_headers(httputil.ResponseStartLine("HTTP/1.1", *status), headers, body)
        self.reply.finish()

    # -- silence in the middle of a body

    def _working(self, result):
        """The application's part of reading the body: not the client's silence."""
        if result is None:
            return None
        self._busy += 1

        async def wait():
            try:
                await result
            finally:
                self._busy -= 1
                self._last_read = asyncio.get_running_loop().time()
        return wait()

    def _watch_silence(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        self._timer = loop.call_later(self.server.body_silence, self._check_silence)

    def _check_silence(self) -> None:
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last_read
        if self._busy or silent < self.server.body_silence:
            wait = self.server.body_silence - (0 if self._busy else silent)
            self._timer = loop.call_later(wait, self._check_silence)
            return
        self._timer = None
        log.info("dropped a request from %s: no body data for %.1f s (BODY_TIMEOUT)",
                 self.conn.context.remote_ip, silent)
        self.conn.stream.close()

    def _stop_watching(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Reply:
    """tornado's connection as the application sees it: the start and the end of the answer
    go through the exchange; everything else is tornado's own."""

    def __init__(self, exchange: _Exchange, conn):
        self._exchange = exchange
        self._conn = conn

    def write_headers(self, start_line, headers, chunk=None):
        self._exchange.answer_starts(start_line, headers)
        return self._conn.write_headers(start_line, headers, chunk)

    def finish(self) -> None:
        self._exchange.answer_ends()

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _peer(stream: IOStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"
