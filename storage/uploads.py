"""Uploaded input files: the bridge's own store of them.

`UploadStore` keeps files that clients sent with `POST /upload` in one directory, under names
the store makes up itself: `<uuid4 hex>.<ext>`, the extension taken from the file's detected
content. A client's file name or path never reaches the file system; it only appears
(sanitised, truncated) in error messages. Request bodies are parsed by `storage.multipart`.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path

from .filetypes import KIND_BY_EXT, FileKind
from .multipart import (MAX_FIELD_BYTES, MAX_HEADER_BYTES, MAX_PARTS, MultipartReceiver, display_text,
                        form_data_boundary)

_STALE_INCOMING_SECONDS = 3600
_SAVED_NAME = re.compile(r"[0-9a-f]{32}\.(?:%s)" % "|".join(re.escape(ext) for ext in KIND_BY_EXT))


class UploadStore:
    """Uploaded files under one directory, named `<uuid4 hex>.<ext>` by the store itself."""

    def __init__(self, directory: Path, max_total_bytes: int, *, max_parts: int = MAX_PARTS,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_field_bytes: int = MAX_FIELD_BYTES):
        self.directory = Path(directory)
        self.incoming = self.directory / ".incoming"
        self.max_total_bytes = max_total_bytes
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.max_field_bytes = max_field_bytes
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o750, exist_ok=True)
        self._remove_stale_incoming()

    def _remove_stale_incoming(self) -> None:
        # Left behind only by a crash mid-upload; a live upload touches its file constantly.
        cutoff = time.time() - _STALE_INCOMING_SECONDS
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def receiver(self, content_type: str) -> MultipartReceiver:
        """A receiver for one request body; UploadError(400) unless multipart/form-data with a boundary."""
        return MultipartReceiver(form_data_boundary(content_type), directory=self.directory,
                                 incoming=self.incoming, new_name=self.new_saved_name,
                                 max_total_bytes=self.max_total_bytes, max_parts=self.max_parts,
                                 max_header_bytes=self.max_header_bytes,
                                 max_field_bytes=self.max_field_bytes)

    @staticmethod
    def is_saved_name(saved_name: object) -> bool:
        """True when `saved_name` has the shape of a name this store issues."""
        return isinstance(saved_name, str) and _SAVED_NAME.fullmatch(saved_name) is not None

    def exists(self, saved_name: str) -> bool:
        # The name is matched against our own pattern before any path is built from it.
        if not self.is_saved_name(saved_name):
            return False
        return (self.directory / saved_name).is_file()

    def path(self, saved_name: str) -> Path:
        """Where a stored upload is; ValueError for a foreign name or one whose file is gone."""
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {display_text(str(saved_name))!r}")
        path = self.directory / saved_name
        if not path.is_file():
            raise ValueError(f"no uploaded file named {saved_name!r}")
        return path

    def media_type(self, saved_name: str) -> str:
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {display_text(str(saved_name))!r}")
        return KIND_BY_EXT[saved_name.rsplit(".", 1)[1]].media_type

    def remove(self, saved_name: str) -> None:
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {display_text(str(saved_name))!r}")
        (self.directory / saved_name).unlink(missing_ok=True)

    def list(self) -> list[tuple[str, float, int]]:
        """(saved name, mtime, size) of every stored upload."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not _SAVED_NAME.fullmatch(entry.name):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        found.append((entry.name, st.st_mtime, st.st_size))
                except FileNotFoundError:
                    pass  # removed meanwhile
        return found

    def new_incoming(self) -> Path:
        """A fresh path in the incoming folder, for a file on its way into the store."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def store_once(self, temp: Path, kind: FileKind, key: bytes) -> str:
        """Move a complete file from the incoming folder into the store under a name derived
        from `key` (its origin and content): the same key gives the same saved name, and a file
        already stored under it is kept (and its UPLOAD_TTL restarted) instead of stored twice."""
        name = f"{hashlib.sha256(key).hexdigest()[:32]}.{kind.ext}"
        final = self.directory / name
        if final.is_file():
            os.utime(final)
            temp.unlink(missing_ok=True)
        else:
            os.replace(temp, final)
        return name

    def new_saved_name(self, kind: FileKind) -> str:
        """A fresh name for a file of `kind`, of the shape `is_saved_name` accepts."""
        return f"{uuid.uuid4().hex}.{kind.ext}"

