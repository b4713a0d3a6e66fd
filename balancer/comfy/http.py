"""HTTP to one ComfyUI server: every request goes through `Transport.fetch`, which sets explicit
timeouts and sorts the answer into success, `BackendRejected` (4xx) or `BackendUnavailable`
(no answer, reset, timeout, 5xx), and tells its owner which one it was, so health is decided in
one place (`Backend`).

Requests are built here from scratch: a client's `Origin`, `Cookie` or `Authorization` header
never reaches ComfyUI (it answers 403 to a foreign Origin).
"""
from __future__ import annotations

import asyncio
from typing import Callable

import ujson
from tornado import httpclient
from tornado.httputil import HTTPHeaders

CONNECT_TIMEOUT = 5.0


class BackendUnavailable(Exception):
    """The backend did not answer, refused the connection, timed out or answered 5xx."""


class BackendRejected(Exception):
    """The backend answered 4xx; `body` is its parsed JSON (or None)."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def json_or_none(body: bytes | None):
    if not body:
        return None
    try:
        return ujson.loads(body)
    except ValueError:
        return None


def _keepalive_client(max_clients: int) -> httpclient.AsyncHTTPClient:
    """libcurl keeps connections to the backend open between calls; tornado's simple client
    opens a new one per call, which was the largest cost per job on loopback (BENCHMARKS.md)."""
    try:
        from tornado.curl_httpclient import CurlAsyncHTTPClient
    except ImportError:  # pycurl missing: correct, only slower
        return httpclient.AsyncHTTPClient(force_instance=True, max_clients=max_clients)
    return CurlAsyncHTTPClient(force_instance=True, max_clients=max_clients)


class Transport:
    def __init__(self, base_url: str, request_timeout: float, on_failure: Callable[[str], None],
                 max_clients: int = 32):
        self.base_url = base_url
        self.request_timeout = request_timeout
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

    async def call(self, method: str, path: str, body=None, *, timeout: float | None = None,
                   counts: bool = True):
        """One JSON call: JSON in, JSON out."""
        request = self.request(method, path, body, timeout=timeout)
        response = await self.fetch(request, f"{method} {path}", counts)
        return json_or_none(response.body)

    async def fetch(self, request: httpclient.HTTPRequest, what: str,
                    counts: bool = True) -> httpclient.HTTPResponse:
        """Send a prepared request. A failure is reported to the owner unless `counts` is
        False (the health probe keeps its own score)."""
        try:
            client = self._stream_http if request.body_producer is not None else self._http
            response = await client.fetch(request, raise_error=False)
        except (OSError, asyncio.TimeoutError, httpclient.HTTPClientError) as exc:
            # raise_error=False covers HTTP statuses only; timeouts and resets still raise.
            response, reason = None, str(exc)
        else:
            reason = str(response.error) if response.code == 599 else f"HTTP {response.code}"
        if response is None or response.code == 599 or response.code >= 500:
            failure = f"{what}: {reason}"
            if counts:
                self._on_failure(failure)
            raise BackendUnavailable(failure)
        if response.code >= 400:
            raise BackendRejected(response.code, json_or_none(response.body))
        return response
