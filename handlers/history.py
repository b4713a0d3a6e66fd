"""GET /history: a finished job's files as multipart/form-data, then the job is gone.

The files are streamed from disk; they are deleted only after the whole response was sent,
so a download that breaks midway can be retried. `HistoryAnswer` is that answer, also given by
generate with `wait=` once its job ended.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from tornado.iostream import StreamClosedError

from balancer.errors import UnknownClient

from .base import NOT_RECOGNIZED, JsonHandler

CHUNK = 256 * 1024
log = logging.getLogger("bridge.http")


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")


class HistoryAnswer:
    """For a JsonHandler: answer as GET /history does for `client_id`."""

    async def answer_history(self, client_id: str) -> None:
        try:
            job = self.service.history(client_id, self.tenant)  # a failed job: JobFailed, a 400 with its reason
        except UnknownClient:
            return self._no_content(NOT_RECOGNIZED.format(client_id))
        if job is None:
            return self._no_content(f"No contents with that client id / {client_id}")
        self.service.results_sent(job, complete=await self._send_multipart(job.results, self.service.results))

    def _no_content(self, detail: str) -> None:
        self.set_status(204)
        self.set_header("X-Bridge-Detail", detail)
        self.finish()

    async def _send_multipart(self, results, store) -> bool:
        boundary = uuid.uuid4().hex
        heads = [(f"--{boundary}\r\n"
                  f'Content-Disposition: form-data; name="result_{i}"; filename="{_quoted(r.name)}"\r\n'
                  f"Content-Type: {r.media_type}\r\n\r\n").encode()
                 for i, r in enumerate(results)]
        closing = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + r.size + 2 for h, r in zip(heads, results)) + len(closing)
        self.set_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        self.set_header("Content-Length", str(length))
        loop = asyncio.get_running_loop()
        try:
            for head, result in zip(heads, results):
                self.write(head)
                recent = store.recent(result.path)
                if recent is not None and len(recent) == result.size:
                    self.write(recent)   # just downloaded: no disk read
                    self.write(b"\r\n")
                    continue
                with open(result.path, "rb") as handle:
                    # Exactly the stored size, so a small file costs one read (no hop to see
                    # its end) and a shortened one cannot break the Content-Length.
                    left = result.size
                    while left > 0:
                        chunk = await loop.run_in_executor(None, handle.read, min(CHUNK, left))
                        if not chunk:
                            raise OSError(f"{result.path} is shorter than its {result.size} bytes")
                        left -= len(chunk)
                        self.write(chunk)
                        await self.flush()
                self.write(b"\r\n")
            self.write(closing)
            await self.finish()
        except StreamClosedError:
            return False  # the client went away: keep the results for another try
        except OSError as exc:
            log.error("result file of %s unreadable: %s", self.request.uri, exc)
            self.request.connection.close()
            return False
        return True


class HistoryHandler(HistoryAnswer, JsonHandler):
    async def get(self) -> None:
        await self.answer_history(self.client_id())


routes = [(r"/history", HistoryHandler)]
