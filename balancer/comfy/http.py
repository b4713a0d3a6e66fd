"""HTTP to one ComfyUI server: every request goes through `Transport.fetch`, which sets explicit
timeouts, retries idempotent reads, and sorts the answer into success, `BackendRejected` (4xx)
or `BackendUnavailable` (no answer, reset, timeout, 5xx). It tells its owner how each call went
(`on_answer`, `on_failure(reason, fatal)`), so health is decided in one place (`Backend`): a
refused or reset connection is fatal at once, a 5xx or a timeout only counts.

Requests are built here from scratch: a client's `Origin`, `Cookie` or `Authorization` header
never reaches ComfyUI (it answers 403 to a foreign Origin).
"""
from __future__ import annotations

import asyncio
import errno
from typing import Callable

import ujson
from tornado import httpclient
from tornado.simple_httpclient import HTTPTimeoutError
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

CONNECT_TIMEOUT = 5.0
READ_RETRY_DELAYS = (0.05, 0.25)   # an idempotent read is tried three times before it fails
# libcurl's codes for a connection refused, an empty reply, a send or a receive failure.
_CURL_CONNECTION_LOST = {7, 52, 55, 56}


class BackendUnavailable(Exception):
    """The backend did not answer, refused the connection, timed out or answered 5xx;
    `fatal` when the connection was refused or lost (nobody is serving there)."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


class BackendRejected(Exception):
    """The backend answered 4xx; `body` is its parsed JSON (or None)."""

    def __init__(self, status: int, body, text: str = ""):
        super().__init__(f"HTTP {status}" + (f" ({text})" if text else ""))
        self.status = status
        self.body = body
        self.text = text   # the start of a body that is not JSON (a proxy's or aiohttp's error page)


def json_or_none(body: bytes | None):
    if not body:
        return None
    try:
        return ujson.loads(body)
    except ValueError:
        return None


try:
    import pycurl
    from tornado.curl_httpclient import CurlAsyncHTTPClient
except ImportError:  # pycurl missing: correct, only slower, and downloads have a total limit only
    pycurl = CurlAsyncHTTPClient = None


def _keepalive_client(max_clients: int) -> httpclient.AsyncHTTPClient:
    """libcurl keeps connections to the backend open between calls; tornado's simple client
    opens a new one per call, which was the largest cost per job on loopback (BENCHMARKS.md)."""
    if CurlAsyncHTTPClient is None:
        return httpclient.AsyncHTTPClient(force_instance=True, max_clients=max_clients)
    return CurlAsyncHTTPClient(force_instance=True, max_clients=max_clients)


class Transport:
    def __init__(self, base_url: str, request_timeout: float, *, on_answer: Callable[[], None],
                 on_failure: Callable[[str, bool], None], max_clients: int = 32):
        self.base_url = base_url
        self.request_timeout = request_timeout
        self._on_answer = on_answer
        self._on_failure = on_failure
        self._http = _keepalive_client(max_clients)
        # Uploads stream their body from disk (body_producer), which only tornado's own
        # client supports; they are rare next to the JSON calls.
        self._stream_http = httpclient.AsyncHTTPClient(force_instance=True, max_clients=max_clients)

    def close(self) -> None:
        self._http.close()
        self._stream_http.close()

    def request(self, method: str, path: str, body=None, *, timeout: float | None = None,
                **options) -> httpclient.HTTPRequest:
        """A request to this backend with explicit timeouts; a dict body is sent as JSON."""
        headers = HTTPHeaders(options.pop("headers", None) or {})
        payload = None
        if isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
        elif body is not None:
            payload = ujson.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif method == "POST" and "body_producer" not in options:
            payload = b""
        total = timeout if timeout is not None else self.request_timeout
        return httpclient.HTTPRequest(
            self.base_url + path, method=method, body=payload, headers=headers,
            connect_timeout=min(CONNECT_TIMEOUT, total), request_timeout=total,
            decompress_response=True, follow_redirects=False, **options)

    def silence_limited(self, request: httpclient.HTTPRequest, silence: float) -> httpclient.HTTPRequest:
        """A long transfer (a large video on a slow link) times out on `silence` seconds without
        a byte, not on its total time (libcurl's low-speed limit; the total stays as set)."""
        if CurlAsyncHTTPClient is not None and isinstance(self._http, CurlAsyncHTTPClient):
            def prepare(curl) -> None:
                curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
                curl.setopt(pycurl.LOW_SPEED_TIME, max(1, int(silence)))
            request.prepare_curl_callback = prepare
        return request

    async def call(self, method: str, path: str, body=None, *, timeout: float | None = None,
                   counts: bool = True, retry: bool | None = None, refusable: bool = False):
        """One JSON call: JSON in, JSON out. GETs are reads, retried on failure unless `retry`
        is False (a probe keeps its own score and its own pace). With `refusable`, a 5xx answer
        is this request's refusal (BackendRejected), not a sign of trouble: one prompt that
        makes ComfyUI fail must not make it look dead."""
        request = self.request(method, path, body, timeout=timeout)
        response = await self.fetch(request, f"{method} {path}", counts,
                                    retry=method == "GET" if retry is None else retry, refusable=refusable)
        return json_or_none(response.body)

    async def fetch(self, request: httpclient.HTTPRequest, what: str, counts: bool = True,
                    retry: bool = False, restart: Callable[[], None] | None = None,
                    refusable: bool = False) -> httpclient.HTTPResponse:
        """Send a prepared request; a read (`retry`) that fails is sent again after a short
        pause, `restart` first undoing what its streaming callback received. The outcome is
        reported to the owner unless `counts` is False (the health probe keeps its own score)."""
        delays = list(READ_RETRY_DELAYS) if retry else []
        while True:
            try:
                response = await self._send(request, what, refusable)
            except BackendUnavailable as exc:
                if delays:
                    await asyncio.sleep(delays.pop(0))
                    if restart is not None:
                        restart()
                    continue
                if counts:
                    self._on_failure(str(exc), exc.fatal)
                raise
            except BackendRejected:
                if counts:
                    self._on_answer()
                raise
            if counts:
                self._on_answer()
            return response

    async def _send(self, request: httpclient.HTTPRequest, what: str, refusable: bool) -> httpclient.HTTPResponse:
        fatal = False
        try:
            client = self._stream_http if request.body_producer is not None else self._http
            response = await client.fetch(request, raise_error=False)
        except (OSError, StreamClosedError, asyncio.TimeoutError, httpclient.HTTPClientError) as exc:
            # raise_error=False covers HTTP statuses only; timeouts and resets still raise.
            response, reason, fatal = None, _describe(exc, request), _connection_lost(exc)
        else:
            reason = f"HTTP {response.code}"
        if response is not None and (400 <= response.code < 500 or (refusable and response.code >= 500)):
            body = json_or_none(response.body)
            raise BackendRejected(response.code, body, "" if body is not None else _text_start(response.body))
        if response is None or response.code >= 500:
            raise BackendUnavailable(f"{what}: {reason}", fatal=fatal)
        return response


def _describe(exc: BaseException, request: httpclient.HTTPRequest) -> str:
    """Why a request got no answer, in words an operator acts on."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, ConnectionRefusedError) or code in (7, errno.ECONNREFUSED):
        return "connection refused"
    if isinstance(exc, (asyncio.TimeoutError, HTTPTimeoutError)) or code == 28:
        return f"no answer within {request.request_timeout:g}s"
    return str(exc) or type(exc).__name__


def _connection_lost(exc: BaseException) -> bool:
    """A refused or reset connection: nobody is serving there now (a timeout is not that)."""
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError, StreamClosedError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)
    return getattr(exc, "errno", None) in _CURL_CONNECTION_LOST


def _text_start(body: bytes | None, limit: int = 120) -> str:
    text = " ".join((body or b"").decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + "..."
