"""Small async client helpers for talking to a (simulated or real) ComfyUI in tests.

Everything has a timeout; nothing sleeps a fixed time to wait for something.
"""
from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from io import BytesIO

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.iostream import StreamClosedError
from tornado.websocket import websocket_connect

DEFAULT_TIMEOUT = 10.0


async def wait_until(predicate, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.005, what: str = "condition"):
    """Poll `predicate()` (sync or async) until it is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """Encode form fields and file parts; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    out = BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


async def fetch(base_url: str, path: str, method: str = "GET", body=None, headers=None,
                timeout: float = DEFAULT_TIMEOUT) -> HTTPResponse:
    """One HTTP exchange; never raises: no answer at all (refused, dropped, timeout) is code 599."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    req = HTTPRequest(base_url + path, method=method, body=body, headers=headers,
                      connect_timeout=timeout, request_timeout=timeout)
    try:
        return await AsyncHTTPClient().fetch(req, raise_error=False)
    except (OSError, StreamClosedError, HTTPClientError) as ex:
        # refused / dropped / timed out: tornado's own code for "no HTTP answer"
        return HTTPResponse(req, 599, error=ex)


async def upload(base_url: str, filename: str, data: bytes, **fields) -> dict:
    body, ctype = multipart({k: str(v) for k, v in fields.items()}, {"image": (filename, data, "image/png")})
    resp = await fetch(base_url, "/upload/image", "POST", body, {"Content-Type": ctype})
    assert resp.code == 200, (resp.code, resp.body)
    return json.loads(resp.body)


def png_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    from PIL import Image
    buf = BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def parse_binary_frame(frame: bytes) -> dict:
    """Describe a binary frame the way the captures do."""
    (event,) = struct.unpack(">I", frame[:4])
    out = {"event_type_u32be": event}
    if event == 3:
        (n,) = struct.unpack(">I", frame[4:8])
        out["node_id"] = frame[8:8 + n].decode()
        out["text"] = frame[8 + n:].decode()
    elif event == 4:
        (n,) = struct.unpack(">I", frame[4:8])
        out["metadata"] = json.loads(frame[8:8 + n])
        out["image_magic"] = frame[8 + n:12 + n].hex()
    elif event == 1:
        (fmt,) = struct.unpack(">I", frame[4:8])
        out["image_type_u32be"] = fmt
        out["image_magic"] = frame[8:12].hex()
    return out


class WSClient:
    """A websocket client that collects every frame; tests wait on its frame list."""

    def __init__(self, conn):
        self.conn = conn
        self.frames: list = []      # decoded text frames (dict) and raw binary frames (bytes)
        self.closed = False
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read_forever())

    @classmethod
    async def connect(cls, base_ws_url: str, client_id: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        url = base_ws_url + "/ws" + (f"?clientId={client_id}" if client_id is not None else "")
        conn = await asyncio.wait_for(websocket_connect(HTTPRequest(url, connect_timeout=timeout)), timeout)
        return cls(conn)

    async def _read_forever(self):
        while True:
            msg = await self.conn.read_message()
            if msg is None:
                self.conn.close()  # releases the protocol object even after an abrupt drop
                self.closed = True
                self._changed.set()
                return
            self.frames.append(json.loads(msg) if isinstance(msg, str) else msg)
            self._changed.set()

    def send(self, obj) -> None:
        self.conn.write_message(json.dumps(obj))

    @property
    def messages(self) -> list[dict]:
        return [f for f in self.frames if isinstance(f, dict)]

    def types(self) -> list[str]:
        return [f["type"] for f in self.messages]

    async def wait_for(self, predicate, timeout: float = DEFAULT_TIMEOUT, what: str = "frame"):
        """Wait until predicate(frames) is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.frames)
            if value:
                return value
            if self.closed:
                raise ConnectionError(f"websocket closed while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {what}; got types {self.types()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_message(self, type_: str, timeout: float = DEFAULT_TIMEOUT, **data_match) -> dict:
        """First received text message of that type whose data has the given items."""
        def find(frames):
            for f in frames:
                if isinstance(f, dict) and f["type"] == type_ and all(
                        f["data"].get(k) == v for k, v in data_match.items()):
                    return f
            return None
        return await self.wait_for(find, timeout, what=f"{type_} {data_match}")

    async def wait_prompt_done(self, prompt_id: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Wait for the end-of-prompt marker `executing {node: null, prompt_id}`."""
        return await self.wait_message("executing", timeout, node=None, prompt_id=prompt_id)

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.conn.close()
        try:
            await asyncio.wait_for(self._reader, timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._reader.cancel()
