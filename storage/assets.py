"""Assets of the v2 surface (Comfy API v2): records with an id, a name and a type, over blobs
kept once per content.

A blob is named by its blake3 hash (`blobs/<hex>.<ext>`, the extension from its detected type
or its first name), so the same bytes uploaded twice are stored once; each upload or
`from-hash` call mints a new record over it. Records live in the job database (kind
"asset") and in memory; blobs are found again at start-up by listing the folder. Uploads are
received by `storage.multipart` (streamed to `.incoming/`, hashed on the way in) and moved into
place only once complete and checked. Called on the event loop; the file operations are single
renames and unlinks.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from blake3 import blake3

from .filetypes import KIND_BY_EXT, FileKind, detect_kind
from .multipart import MAX_FIELD_BYTES, MAX_HEADER_BYTES, MultipartReceiver, form_data_boundary
from .results import media_type_for

HASH = re.compile(r"blake3:([0-9a-f]{64})")
ASSET_ID = re.compile(r"asset_[0-9a-f]{32}")
_BLOB = re.compile(r"([0-9a-f]{64})\.([a-z0-9]{1,8})")
_SAFE_EXT = re.compile(r"[a-z0-9]{1,8}")
ANY_FILE = FileKind("file", "bin", "application/octet-stream")
MAX_UPLOAD_PARTS = 16   # the fields of the contract and one file


def parse_hash(text: str) -> str | None:
    """The hex digest of `blake3:<64 hex>`, else None."""
    match = HASH.fullmatch(text or "")
    return match.group(1) if match else None


def _any_kind(head: bytes, complete: bool = False) -> FileKind:
    """Assets may be of any type (models, text, ...): the known ones keep their extension."""
    return detect_kind(head, complete=complete) or ANY_FILE


@dataclass
class AssetRecord:
    id: str
    hash: str            # hex digest
    size: int
    content_type: str
    file_path: str
    created: float

    @property
    def blake3(self) -> str:
        return f"blake3:{self.hash}"


class AssetStore:
    def __init__(self, directory: Path, store, max_bytes: int):
        self.directory = Path(directory)
        self.blobs_dir = self.directory / "blobs"
        self.incoming = self.directory / ".incoming"
        self.store = store                # storage.jobstore.JobStore
        self.max_bytes = max_bytes
        for folder in (self.directory, self.blobs_dir, self.incoming):
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():  # a crash mid-upload; nothing refers to them
            leftover.unlink(missing_ok=True)
        self._blobs: dict[str, Path] = {}
        for path in self.blobs_dir.iterdir():
            match = _BLOB.fullmatch(path.name)
            if match:
                self._blobs[match.group(1)] = path
        self._assets: dict[str, AssetRecord] = {}

    def load(self, records: list[dict]) -> None:
        """The records of the job database (start-up); those whose blob is gone are dropped."""
        for record in records:
            try:
                asset = AssetRecord(**record)
            except TypeError:
                continue
            if asset.hash in self._blobs:
                self._assets[asset.id] = asset

    # ------------------------------------------------------------------ uploads
    def receiver(self, content_type: str) -> MultipartReceiver:
        """A receiver for one upload body: files of any type into `.incoming/`, fields kept,
        blake3 computed as the bytes arrive. UploadError(400) unless multipart/form-data."""
        return MultipartReceiver(form_data_boundary(content_type), directory=self.incoming,
                                 incoming=self.incoming, new_name=lambda kind: f"{uuid.uuid4().hex}.{kind.ext}",
                                 max_total_bytes=self.max_bytes, max_parts=MAX_UPLOAD_PARTS,
                                 max_header_bytes=MAX_HEADER_BYTES, max_field_bytes=MAX_FIELD_BYTES,
                                 detect=_any_kind, keep_fields=True, new_hasher=blake3)

    def discard(self, received: Path) -> None:
        received.unlink(missing_ok=True)

    def add(self, received: Path, digest: str, content_type: str, file_path: str) -> tuple[AssetRecord, bool]:
        """Mint an asset over a received file (its blake3 `digest`); True when its bytes are new."""
        created_new = digest not in self._blobs
        size = received.stat().st_size
        if created_new:
            ext = received.suffix.lstrip(".")
            named = Path(file_path).suffix.lstrip(".").lower()
            if ext == ANY_FILE.ext and _SAFE_EXT.fullmatch(named):
                ext = named
            final = self.blobs_dir / f"{digest}.{ext}"
            os.replace(received, final)
            self._blobs[digest] = final
        else:
            received.unlink(missing_ok=True)
        kind = KIND_BY_EXT.get(received.suffix.lstrip("."))
        return self._mint(digest, size, content_type or (kind.media_type if kind else ANY_FILE.media_type),
                          file_path), created_new

    def mint_from_hash(self, digest: str, file_path: str | None) -> tuple[AssetRecord, bool] | None:
        """An asset over bytes already stored (None: no such blob); False when an asset of that
        hash and name existed already and is returned as it is."""
        blob = self._blobs.get(digest)
        if blob is None:
            return None
        same = [a for a in self._assets.values() if a.hash == digest]
        name = file_path or (same[0].file_path if same else blob.name)
        for asset in same:
            if asset.file_path == name:
                return asset, False
        content_type = same[0].content_type if same else media_type_for(blob.name)
        return self._mint(digest, blob.stat().st_size, content_type, name), True

    def _mint(self, digest: str, size: int, content_type: str, file_path: str) -> AssetRecord:
        asset = AssetRecord(id=f"asset_{uuid.uuid4().hex}", hash=digest, size=size,
                            content_type=content_type, file_path=file_path, created=time.time())
        self._assets[asset.id] = asset
        self.store.save_record("asset", asset.id, asdict(asset))
        return asset

    # ------------------------------------------------------------------ lookups
    def get(self, asset_id: str) -> AssetRecord | None:
        return self._assets.get(asset_id) if ASSET_ID.fullmatch(asset_id or "") else None

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs

    def path(self, asset: AssetRecord) -> Path:
        return self._blobs[asset.hash]

    def delete(self, asset: AssetRecord, in_use: set[Path]) -> None:
        """Forget the asset; its blob goes too unless another asset or a job still needs it."""
        self._assets.pop(asset.id, None)
        self.store.save_record("asset", asset.id, None)
        self._drop_blob(asset.hash, in_use)

    def release(self, paths, in_use: set[Path]) -> None:
        """A job that used these files ended: blobs whose assets were deleted meanwhile go now."""
        for path in paths:
            match = _BLOB.fullmatch(Path(path).name)
            if match and Path(path).parent == self.blobs_dir:
                self._drop_blob(match.group(1), in_use)

    def _drop_blob(self, digest: str, in_use: set[Path]) -> None:
        blob = self._blobs.get(digest)
        if blob is None or blob in in_use or any(a.hash == digest for a in self._assets.values()):
            return
        del self._blobs[digest]
        blob.unlink(missing_ok=True)
