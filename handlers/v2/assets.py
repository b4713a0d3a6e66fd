"""/api/v2/assets: streamed uploads (blake3 on the way in, one blob per content), minting from
a hash, the by-hash probe, an asset's record, its bytes (with Range) and its deletion. A job's
outputs are assets too, served from the results store until the job's expires_at."""
from __future__ import annotations

import asyncio
import logging
import re
import time

from tornado import web
from tornado.iostream import StreamClosedError

from balancer.v2.errors import V2Refused
from balancer.v2.idempotency import check_key
from balancer.v2.surface import key_kind
from balancer.v2.view import asset_view, output_asset_view
from storage.assets import parse_hash
from storage.multipart import UploadError

from ..upload import _storage_error
from .base import API, V2Handler, envelope

log = logging.getLogger("bridge.http")
CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a single `Range: bytes=` header; None: send the whole file (no header,
    or one this server does not serve partially); V2Refused when it cannot be satisfied."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":                       # the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise V2Refused("range_not_satisfiable", f"the asset has {size} bytes")
        return max(size - count, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise V2Refused("range_not_satisfiable", f"range {header.strip()} is outside the asset's {size} bytes")
    return start, end


@web.stream_request_body
class AssetsHandler(V2Handler):
    """POST: the contract's fields (`content_type`, `file_path`, `expected_hash`) and one `file`."""

    receiver = None
    buffers_body = False
    _key = None

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "OPTIONS":
            return
        limit = self.config.upload_max_bytes
        self.request.connection.set_max_body_size(limit + 1024 * 1024)
        declared = self.request.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit + 1024 * 1024:
            raise V2Refused("payload_too_large", f"upload is {int(declared)} bytes; the limit is "
                                                 f"{self.config.upload_max_size} MB (UPLOAD_MAX_SIZE)")
        key = check_key(self.request.headers.get("Idempotency-Key"))
        self._kind = key_kind("assets", self.tenant)
        self._recorded = self.v2.keys.begin(self._kind, key, None) if key is not None else None
        self._key = key if self._recorded is None else None   # ours to finish or abandon
        try:
            self.receiver = self.v2.assets.receiver(self.request.headers.get("Content-Type", ""))
        except UploadError as exc:
            self._abandon()
            raise V2Refused("invalid_request", str(exc)) from None

    async def data_received(self, chunk: bytes) -> None:
        if self.receiver is None or self._finished:
            return
        try:
            await self.receiver.feed(chunk)
        except (UploadError, OSError) as exc:
            self._refuse(exc)

    async def post(self) -> None:
        if self.receiver is None:
            return
        try:
            saved = await self.receiver.finish()
        except (UploadError, OSError) as exc:
            self.receiver.abort()
            self._abandon()
            raise self._error(exc) from None
        assets = self.v2.assets
        received = [assets.incoming / name for name in saved.values()]
        try:
            answer, status = self._store(saved, received)
        except BaseException:
            for path in received:
                assets.discard(path)
            self._abandon()
            raise
        if self._recorded is not None:
            self.set_header("Idempotency-Replayed", "true")
        elif self._key is not None:
            await self.v2.keys.finish(self._kind, self._key, answer["hash"] + answer["file_path"], status, answer)
        self.write_json(answer, status)

    def _store(self, saved: dict[str, str], received) -> tuple[dict, int]:
        fields, digests = self.receiver.fields, self.receiver.digests
        if list(saved) != ["file"]:
            raise V2Refused("invalid_request", "send exactly one file, in the part named 'file'")
        for name in ("content_type", "file_path"):
            if not fields.get(name, "").strip():
                raise V2Refused("invalid_request", f"field '{name}' is required")
        digest, file_path = digests["file"], fields["file_path"].strip()
        expected = fields.get("expected_hash")
        if expected and parse_hash(expected.strip().lower()) != digest:
            raise V2Refused("hash_mismatch", "the bytes received do not have the expected_hash",
                            details={"expected_hash": expected[:80], "computed_hash": f"blake3:{digest}"})
        if self._recorded is not None:   # the same key: the same bytes and name replay its answer
            if self._recorded["fingerprint"] != f"blake3:{digest}{file_path}":
                raise V2Refused("idempotency_key_reuse", "this Idempotency-Key was used with another upload")
            for path in received:
                self.v2.assets.discard(path)
            return self._recorded["body"], self._recorded["status"]
        asset, created_new = self.v2.assets.add(received[0], digest, fields["content_type"].strip(), file_path)
        view = asset_view(asset, self.origin, self.config.result_ttl, time.time(), created_new=created_new)
        return view, 201 if created_new else 200

    def _abandon(self) -> None:
        if self._key is not None:
            self.v2.keys.abandon(self._kind, self._key)
            self._key = None

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, UploadError):
            return V2Refused("payload_too_large" if exc.status == 413 else "invalid_request", str(exc))
        return _storage_error(exc)

    def _refuse(self, exc: Exception) -> None:
        """Answer now, mid-body; the rest of the body is read and dropped (connections.py)."""
        self.receiver.abort()
        self.receiver = None
        self._abandon()
        error = self._error(exc)
        self.send_error(500, exc_info=(type(error), error, None))

    def on_connection_close(self) -> None:
        if self.receiver is not None:
            self.receiver.abort()
        self._abandon()
        super().on_connection_close()


class AssetFromHashHandler(V2Handler):
    def post(self) -> None:
        body = self.json_body()
        digest = parse_hash(body.get("hash") if isinstance(body.get("hash"), str) else "")
        if digest is None:
            raise V2Refused("invalid_request", "'hash' must be blake3:<64 hex digits>")
        file_path = body.get("file_path")
        if file_path is not None and not isinstance(file_path, str):
            raise V2Refused("invalid_request", "'file_path' must be a string")
        minted = self.v2.assets.mint_from_hash(digest, file_path)
        if minted is None:
            raise V2Refused("blob_not_found", "no stored bytes have this hash; upload them")
        asset, created = minted
        self.write_json(asset_view(asset, self.origin, self.config.result_ttl, time.time(), created_new=False),
                        201 if created else 200)


class AssetByHashHandler(V2Handler):
    def head(self, text: str) -> None:
        digest = parse_hash(text)
        self.set_status(200 if digest is not None and self.v2.assets.has_blob(digest) else 404)
        self.finish()


class AssetHandler(V2Handler):
    def get(self, asset_id: str) -> None:
        self.write_json(self._view(asset_id))

    def delete(self, asset_id: str) -> None:
        asset = self.v2.assets.get(asset_id)
        if asset is None:
            if self.v2.output(asset_id, self.tenant) is not None:
                raise V2Refused("forbidden", "a job's outputs are removed with the job, at its expires_at")
            raise V2Refused("not_found", f"no asset {asset_id[:64]!r}")
        self.v2.assets.delete(asset, self.v2.files_in_use())
        self.set_status(204)
        self.finish()

    def _view(self, asset_id: str) -> dict:
        now, ttl = time.time(), self.config.result_ttl
        asset = self.v2.assets.get(asset_id)
        if asset is not None:
            return asset_view(asset, self.origin, ttl, now)
        output = self.v2.output(asset_id, self.tenant)
        if output is not None:
            return output_asset_view(*output, self.origin, ttl, now)
        raise V2Refused("not_found", f"no asset {asset_id[:64]!r} (never stored, deleted, or past its expires_at)")


class AssetContentHandler(V2Handler):
    async def get(self, asset_id: str) -> None:
        asset = self.v2.assets.get(asset_id)
        if asset is not None:
            path, size, content_type = self.v2.assets.path(asset), asset.size, asset.content_type
        else:
            output = self.v2.output(asset_id, self.tenant)
            if output is None:
                raise V2Refused("not_found", f"no asset {asset_id[:64]!r}")
            result = output[0].results[output[1]]
            path, size, content_type = result.path, result.size, result.media_type
        self.set_header("Accept-Ranges", "bytes")
        try:
            ranged = byte_range(self.request.headers.get("Range"), size)
        except V2Refused as exc:   # answered here: send_error would drop the Content-Range
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{size}")
            self.set_header("Content-Type", "application/json; charset=utf-8")
            return self.finish(envelope(exc.code, str(exc)))
        first, last = ranged or (0, size - 1)
        if ranged is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", str(max(last - first + 1, 0)))
        loop = asyncio.get_running_loop()
        try:
            with open(path, "rb") as handle:
                handle.seek(first)
                left = last - first + 1
                while left > 0:
                    chunk = await loop.run_in_executor(None, handle.read, min(CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path} is shorter than its {size} bytes")
                    left -= len(chunk)
                    self.write(chunk)
                    await self.flush()
            await self.finish()
        except StreamClosedError:
            return
        except OSError as exc:
            log.error("asset %s unreadable: %s", asset_id, exc)
            self.request.connection.close()


ASSET_ID = r"((?!from-hash$)[^/]{1,100})"   # from-hash is a route of its own
routes = [
    (rf"{API}/assets", AssetsHandler),
    (rf"{API}/assets/from-hash", AssetFromHashHandler),
    (rf"{API}/assets/by-hash/([^/]{{1,100}})", AssetByHashHandler),
    (rf"{API}/assets/{ASSET_ID}/content", AssetContentHandler),
    (rf"{API}/assets/{ASSET_ID}", AssetHandler),
]
