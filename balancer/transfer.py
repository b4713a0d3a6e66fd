"""Moving files between the bridge's disk and a backend: input uploads and output downloads.

Both stream: an upload is sent from the file in chunks, a download is written to disk as it
arrives, so memory does not grow with the file's size.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from urllib.parse import urlencode

from tornado import httpclient

from storage.results import ResultFile, media_type_for
from .backend import CONNECT_TIMEOUT, Backend, BackendRejected, json_or_none
from .prompts import OutputItem

CHUNK = 256 * 1024
UPLOAD_SUBFOLDER = "bridge"
# Slow links: allow at least this many bytes per second before an upload or download times out.
MIN_TRANSFER_RATE = 1024 * 1024


def _transfer_timeout(backend: Backend, size: int) -> float:
    return backend.request_timeout + size / MIN_TRANSFER_RATE


async def upload_file(backend: Backend, path: Path) -> str:
    """POST /upload/image; returns the name the backend knows the file by."""
    path = Path(path)
    size = path.stat().st_size
    boundary = uuid.uuid4().hex
    name = path.name
    # Our own subfolder: the bridge never overwrites a file someone else put on that server.
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\n{UPLOAD_SUBFOLDER}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
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

    request = httpclient.HTTPRequest(
        f"{backend.base_url}/upload/image", method="POST", body_producer=produce,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Content-Length": str(len(head) + size + len(tail))},
        connect_timeout=CONNECT_TIMEOUT, request_timeout=_transfer_timeout(backend, size))
    response = await backend.fetch(request, "POST /upload/image")
    answer = json_or_none(response.body)
    if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
        raise BackendRejected(200, answer)
    subfolder = answer.get("subfolder") or ""
    return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]


async def download_to(backend: Backend, item: OutputItem, target: Path) -> ResultFile:
    """GET /view into `target`, streamed to disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    handle = open(partial, "wb")
    size = 0

    def write(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        handle.write(chunk)

    query = urlencode(
        {"filename": item.filename, "subfolder": item.subfolder, "type": item.type})
    request = httpclient.HTTPRequest(
        f"{backend.base_url}/view?{query}", streaming_callback=write,
        connect_timeout=CONNECT_TIMEOUT, request_timeout=_transfer_timeout(backend, 512 * 1024 * 1024),
        decompress_response=True)
    try:
        await backend.fetch(request, "GET /view")
    finally:
        handle.close()
    os.replace(partial, target)
    return ResultFile(name=item.filename, path=target, media_type=media_type_for(item.filename), size=size)
