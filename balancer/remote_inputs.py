"""File inputs given as a URL: `https://...` / `http://...` (fetched by the bridge) or
`data:<type>;base64,...` (inline). The generate handler has them turned into stored uploads
before the job is built, so the core only ever sees uploaded files.

Like `POST /upload`: bounded by UPLOAD_MAX_SIZE, recognised by content (`storage.filetypes`;
the declared type is not consulted), stored in the upload store. A file is stored once per URL
and content: its saved name is derived from both (`UploadStore.store_once`), so fetching the
same URL again gives the same name while the content is unchanged. Hosts pass the SSRF guard
(`egress.check_url`, INPUT_URL_ALLOWED_HOSTS), redirects included. The fetch streams to disk
with a connect and a total timeout; nothing on the loop waits for the network.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from tornado import httputil
from tornado.httpclient import HTTPRequest
from tornado.iostream import StreamBufferFullError
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from storage.catalog import CatalogError
from storage.filetypes import ACCEPTED_LABELS, SNIFF_BYTES, detect_kind
from .egress import PublicResolver, check_redirect, check_url
from .errors import Refused

log = logging.getLogger("bridge.inputs")

CONNECT_TIMEOUT = 10.0    # seconds to reach the host
FETCH_TIMEOUT = 60.0      # seconds for the whole fetch, body included
MAX_REDIRECTS = 5
SLACK = 1024 * 1024       # see RemoteInputs.http
MAX_CLIENTS = 20          # fetches at once; more wait in the client's queue (counted in the timeout)
_DATA_URL = re.compile(r"data:([^,]*),", re.IGNORECASE)
_REDIRECTS = {301, 302, 303, 307, 308}


def is_remote(value) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://", "data:"))


class RemoteInputs:
    def __init__(self, catalog, uploads, allowed_hosts: tuple[str, ...], max_bytes: int, max_size_mb: int):
        self.catalog = catalog          # storage.catalog.WorkflowCatalog
        self.uploads = uploads          # storage.uploads.UploadStore
        self.allowed_hosts = allowed_hosts
        self.max_bytes = max_bytes
        self.limit_text = f"{max_size_mb} MB (UPLOAD_MAX_SIZE)"
        # Its own client, not a backend's, with bounded bodies and buffers (a body sent without
        # a length is buffered whole by tornado). Tornado refuses a chunk from its declared size,
        # before any of it arrives, and silently: its limit sits a little above ours, so that a
        # body crossing ours reaches `_Body.write`, which can say why the fetch ended.
        self.http = SimpleAsyncHTTPClient(force_instance=True, max_clients=MAX_CLIENTS,
                                          max_body_size=max_bytes + SLACK, max_buffer_size=max_bytes + SLACK,
                                          resolver=PublicResolver(allowed_hosts=allowed_hosts))

    def close(self) -> None:
        self.http.close()

    async def resolve(self, alias: str, values: dict) -> None:
        """Replace, in `values`, each file input given by URL with the saved name of its file;
        Refused (a 400) naming the input when it cannot be had."""
        try:
            workflow = self.catalog.get(alias)
        except CatalogError:
            return  # the job's intake refuses the alias, with its reason
        for key, value in values.items():
            exposed = workflow.inputs.get(key)
            if exposed is not None and exposed.is_file and is_remote(value):
                field = f"input '{key}'"
                values[key] = await (self._decode(value, field) if value[:5].lower() == "data:"
                                     else self._fetch(value, field))

    # ------------------------------------------------------------------ data: URLs
    async def _decode(self, url: str, field: str) -> str:
        match = _DATA_URL.match(url)
        if match is None or not match.group(1).lower().endswith(";base64"):
            raise Refused(f"{field}: a data: URL must be data:<type>;base64,<data>")
        encoded = url[match.end():]
        if len(encoded) // 4 * 3 > self.max_bytes + 2:
            raise Refused(f"{field}: the inline file is over the limit of {self.limit_text}")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"{field}: the data: URL is not valid base64") from None
        if len(data) > self.max_bytes:
            raise Refused(f"{field}: the inline file is over the limit of {self.limit_text}")
        if not data:
            raise Refused(f"{field}: the inline file is empty")
        kind = detect_kind(data[:SNIFF_BYTES], complete=len(data) <= SNIFF_BYTES)
        if kind is None:
            raise Refused(f"{field}: unsupported file type; accepted: {ACCEPTED_LABELS}")
        temp = self.uploads.new_incoming()
        try:
            temp.write_bytes(data)  # at most the JSON body's size (1 MB): no executor needed
            return self.uploads.store_once(temp, kind, b"data:" + hashlib.sha256(data).digest())
        finally:
            temp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ http(s) URLs
    async def _fetch(self, url: str, field: str) -> str:
        first = url
        await check_url(url, field, self.allowed_hosts)
        for _ in range(MAX_REDIRECTS + 1):
            body = _Body(self.uploads.new_incoming(), self.max_bytes)
            try:
                try:
                    response = await self.http.fetch(HTTPRequest(
                        url, connect_timeout=CONNECT_TIMEOUT, request_timeout=FETCH_TIMEOUT,
                        follow_redirects=False, decompress_response=False,
                        header_callback=body.header, streaming_callback=body.write), raise_error=False)
                    error = response.error if response.code == 599 else None
                except Exception as exc:  # connection failures, timeouts, malformed answers
                    response, error = None, exc
                body.close()
                host = _host(url)
                if body.too_large or _over_limit(error):
                    raise Refused(f"{field}: the file at host '{host}' is over the limit of {self.limit_text}")
                if response is None or error is not None:
                    raise Refused(f"{field}: cannot fetch from host '{host}': {_why(error)}")
                if response.code in _REDIRECTS and response.headers.get("Location"):
                    url = await check_redirect(url, response.headers["Location"], field, self.allowed_hosts)
                    continue
                if response.code != 200:
                    raise Refused(f"{field}: cannot fetch from host '{host}': it answered HTTP {response.code}")
                if body.size == 0:
                    raise Refused(f"{field}: the file at host '{host}' is empty")
                kind = detect_kind(bytes(body.head), complete=body.size <= SNIFF_BYTES)
                if kind is None:
                    raise Refused(f"{field}: the file at host '{host}' has an unsupported type; "
                                  f"accepted: {ACCEPTED_LABELS}")
                key = first.encode("utf-8", "replace") + b"\n" + body.digest.digest()
                saved = self.uploads.store_once(body.path, kind, key)
                log.info("%s: %d bytes (%s) from host '%s', stored as %s", field, body.size, kind.label, host, saved)
                return saved
            finally:
                body.discard()
        raise Refused(f"{field}: more than {MAX_REDIRECTS} redirects")


class _Body:
    """One response body on its way to a file of the store's incoming folder: counted, hashed,
    its first bytes kept for recognising the type. Writes are small chunks, as for uploads."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.head = bytearray()
        self.digest = hashlib.sha256()
        self.too_large = False
        self._file = open(path, "xb")

    def header(self, line: str) -> None:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            self.too_large = self.too_large or int(value) > self.max_bytes

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.too_large = True
        if self.too_large:
            # The one exception tornado lets through quietly: it ends the fetch now.
            raise httputil.HTTPInputError("the body is over the limit")
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[:SNIFF_BYTES - len(self.head)]
        self.digest.update(chunk)
        self._file.write(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _over_limit(error) -> bool:
    """tornado's own refusal of a body over max_body_size / max_buffer_size."""
    return isinstance(error, StreamBufferFullError) or (
        isinstance(error, httputil.HTTPInputError) and "too" in str(error))


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _why(error) -> str:
    if error is None:
        return "no answer"
    text = str(error) or type(error).__name__
    if "Timeout" in type(error).__name__ or "timeout" in text.lower():
        return "timed out"
    return text if len(text) <= 120 else text[:120] + "..."
