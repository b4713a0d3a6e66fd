"""POST /upload: multipart files streamed to the bridge's upload store."""
from __future__ import annotations

import logging

from tornado import web

from storage.multipart import UploadError

from .base import ApiError, JsonHandler

log = logging.getLogger("bridge.http")


@web.stream_request_body
class UploadHandler(JsonHandler):
    receiver = None
    buffers_body = False  # streamed to disk below, under its own limit

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "OPTIONS":
            return  # a CORS preflight: no body, no receiver
        limit = self.config.upload_max_bytes
        # The server-wide limit sits above ours, so the reply to an oversize body is ours.
        self.request.connection.set_max_body_size(limit + 1024 * 1024)
        declared = self.request.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit + 1024 * 1024:
            raise ApiError(413, f"upload is {int(declared)} bytes; the limit is "
                                f"{self.config.upload_max_size} MB (UPLOAD_MAX_SIZE)")
        try:
            self.receiver = self.uploads.receiver(self.request.headers.get("Content-Type", ""))
        except UploadError as exc:
            raise ApiError(exc.status, str(exc)) from None

    async def data_received(self, chunk: bytes) -> None:
        if self.receiver is None or self._finished:
            return
        try:
            await self.receiver.feed(chunk)
        except UploadError as exc:
            self._refuse(ApiError(exc.status, str(exc)))
        except OSError as exc:
            self._refuse(_storage_error(exc))

    async def post(self) -> None:
        if self.receiver is None:
            return  # already answered
        try:
            saved = await self.receiver.finish()
        except UploadError as exc:
            self.receiver.abort()
            raise ApiError(exc.status, str(exc)) from None
        except OSError as exc:
            self.receiver.abort()
            raise _storage_error(exc) from None
        if self.metrics is not None:
            self.metrics.count_upload([self._size(name) for name in saved.values()])
        self.write_json(saved)

    def _size(self, saved_name: str) -> int:
        try:
            return self.uploads.path(saved_name).stat().st_size
        except OSError:
            return 0

    def _refuse(self, error: ApiError) -> None:
        """Answer now, mid-body; the rest of the body is read and dropped (connections.py)."""
        self.receiver.abort()
        self.receiver = None
        self.send_error(error.status_code, exc_info=(ApiError, error, None))

    def on_connection_close(self) -> None:
        if self.receiver is not None:
            self.receiver.abort()
        super().on_connection_close()


def _storage_error(exc: OSError) -> ApiError:
    log.error("cannot store an upload: %s", exc)
    return ApiError(503, "the bridge cannot store uploads right now (disk problem); try again later",
                    headers={"Retry-After": "30"})


routes = [(r"/upload", UploadHandler)]
