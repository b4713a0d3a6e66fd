"""Moving files between the bridge's disk and a backend: input uploads (with the per-backend
record of what is there already) and output downloads.

A download up to SMALL_DOWNLOAD is held in memory and written to disk in one executor call at its
end; a larger one is written as it arrives, so memory does not grow with the file's size. An
upload up to SMALL_UPLOAD is read in one go and sent over the backend's kept-alive connection
(libcurl's); a larger one is sent from the file in chunks, which only tornado's own client can
do, on a new connection each time (one more round trip, and the disk reads between chunks).
"""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from storage.results import ResultFile, media_type_for
from .answers import OutputItem
from .http import BackendRejected, json_or_none

if TYPE_CHECKING:
    from .backend import Backend

CHUNK = 256 * 1024
SMALL_UPLOAD = 4 * 1024 * 1024   # bytes held in memory at most per upload in flight
SMALL_DOWNLOAD = 4 * 1024 * 1024   # and per download in flight
UPLOAD_SUBFOLDER = "bridge"
# Slow links: allow at least this many bytes per second before an upload times out.
MIN_TRANSFER_RATE = 1024 * 1024
# A download ends on BACKEND_TIMEOUT seconds of silence (libcurl measures speed over its last few
# seconds, so up to ~5 s more); this total only bounds a trickle.
DOWNLOAD_TOTAL_TIMEOUT = 6 * 3600.0


class UploadCache:
    """Which local files a backend has received, and under which name; concurrent jobs that
    need the same file share one upload. Cleared when the backend (re)connects: it may have
    restarted and lost them."""

    def __init__(self, backend: "Backend"):
        self._backend = backend
        self._names: dict[str, str] = {}                  # local file -> name on the backend
        self._pending: dict[str, asyncio.Future] = {}     # local file -> upload in progress

    def clear(self) -> None:
        self._names.clear()

    def forget(self, paths) -> None:
        for path in paths:
            self._names.pop(str(path), None)

    async def place(self, path: Path) -> str:
        """The file's name on the backend, uploading it first if it is not there."""
        key = str(path)
        if key in self._names:
            return self._names[key]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(upload_file(self._backend, path))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        remote = await asyncio.shield(pending)
        self._names[key] = remote
        return remote


def _transfer_timeout(backend: "Backend", size: int) -> float:
    return backend.request_timeout + size / MIN_TRANSFER_RATE


async def upload_file(backend: "Backend", path: Path) -> str:
    """POST /upload/image; returns the name the backend knows the file by."""
    path = Path(path)
    loop = asyncio.get_running_loop()
    small = await loop.run_in_executor(None, _read_small, path)
    size = len(small) if small is not None else path.stat().st_size
    boundary = uuid.uuid4().hex
    # Our own subfolder: the bridge never overwrites a file someone else put on that server.
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\n{UPLOAD_SUBFOLDER}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if small is not None:
        request = backend.http.request("POST", "/upload/image", head + small + tail,
                                       timeout=_transfer_timeout(backend, size),
                                       headers={"Content-Type": content_type})
    else:
        request = _streamed_upload(backend, path, size, head, tail, content_type)
    # Sent again on failure: with overwrite into our own subfolder, a repeat changes nothing.
    response = await backend.http.fetch(request, "POST /upload/image", retry=True)
    answer = json_or_none(response.body)
    if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
        raise BackendRejected(200, answer)
    subfolder = answer.get("subfolder") or ""
    return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]


def _read_small(path: Path) -> bytes | None:
    """The file's bytes if it is at most SMALL_UPLOAD long (one read), else None."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > SMALL_UPLOAD:
            return None
        return handle.read()


def _streamed_upload(backend: "Backend", path: Path, size: int, head: bytes, tail: bytes,
                     content_type: str):
    loop = asyncio.get_running_loop()

    async def produce(write):
        await write(head)
        with open(path, "rb") as handle:
            while True:
                chunk = await loop.run_in_executor(None, handle.read, CHUNK)
                if not chunk:
                    break
                await write(chunk)
        await write(tail)

    return backend.http.request(
        "POST", "/upload/image", body_producer=produce, timeout=_transfer_timeout(backend, size),
        headers={"Content-Type": content_type, "Content-Length": str(len(head) + size + len(tail))})


async def download_to(backend: "Backend", item: OutputItem, target: Path, keep=None) -> ResultFile:
    """GET /view into `target`; it times out on silence, not on its length. `keep(target, data)`
    is given the content of a file that was held in memory whole."""
    sink = _DownloadSink(target)
    query = urlencode({"filename": item.filename, "subfolder": item.subfolder, "type": item.type})
    request = backend.http.silence_limited(
        backend.http.request("GET", f"/view?{query}", streaming_callback=sink.write,
                             timeout=DOWNLOAD_TOTAL_TIMEOUT),
        silence=backend.request_timeout)
    try:
        await backend.http.fetch(request, "GET /view", retry=True, restart=sink.restart)
        await asyncio.get_running_loop().run_in_executor(None, sink.store)
    finally:
        sink.close()
    if keep is not None and sink.whole is not None:
        keep(target, sink.whole)
    return ResultFile(name=item.filename, path=target, media_type=media_type_for(item.filename), size=sink.size,
                      node_id=str(item.node_id))


class _DownloadSink:
    """A download's bytes: held in memory up to SMALL_DOWNLOAD, so a typical result touches the
    disk in one executor call at its end (`store`); past that, written to a `.part` file as they
    come, so memory does not grow with the file's size."""

    def __init__(self, target: Path):
        self.target = target
        self.partial = target.with_name(target.name + ".part")
        self.chunks: list[bytes] = []
        self.size = 0
        self.handle = None
        self.whole: bytes | None = None   # the content, once stored from memory

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.handle is not None:
            self.handle.write(chunk)
            return
        self.chunks.append(chunk)
        if self.size > SMALL_DOWNLOAD:   # a large file: to disk from now on
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.partial, "wb")
            self.handle.writelines(self.chunks)
            self.chunks = []

    def restart(self) -> None:  # a retried read starts the file again
        self.size = 0
        self.chunks = []
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()

    def store(self) -> None:
        """The whole file at `target` (run in an executor)."""
        if self.handle is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            data = b"".join(self.chunks)
            with open(self.partial, "wb") as handle:
                handle.write(data)
            self.chunks = []
            self.whole = data
        else:
            self.handle.close()
        os.replace(self.partial, self.target)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
