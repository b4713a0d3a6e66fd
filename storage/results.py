"""Result files of finished jobs, kept on the bridge's disk until `GET /history` takes them.

Each job gets its own folder named by its job id (never by a client-supplied string). Files
are stored as `<index>.<ext>`; the name a client sees travels in the job record.
"""
from __future__ import annotations

import logging
import mimetypes
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bridge.results")

# Bytes of recently downloaded small results also kept in memory, so the GET /history that
# usually follows at once sends them without a disk read (oldest dropped first).
RECENT_BYTES = 32 * 1024 * 1024

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_SAFE_EXT = re.compile(r"^\.[A-Za-z0-9]{1,8}$")

# Types ComfyUI's own outputs use that mimetypes may not know on a minimal system.
_EXTRA_TYPES = {".webp": "image/webp", ".webm": "video/webm", ".mkv": "video/x-matroska",
                ".flac": "audio/flac", ".glb": "model/gltf-binary", ".latent": "application/octet-stream"}


def media_type_for(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream"


@dataclass(frozen=True)
class ResultFile:
    name: str          # the file name the backend gave it (shown to the client)
    path: Path         # where the bridge keeps it
    media_type: str
    size: int
    node_id: str = ""  # the graph node that produced it (the v2 surface shows it)


class ResultStore:
    """Result files on disk, and a copy in memory of the recent small ones (`keep`, `recent`,
    `release`: called on the event loop only)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recent: OrderedDict[Path, bytes] = OrderedDict()
        self._recent_bytes = 0

    def keep(self, path: Path, data: bytes) -> None:
        """`data` is the content just stored at `path`."""
        if len(data) > RECENT_BYTES:
            return
        self._recent[path] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    def recent(self, path: Path) -> bytes | None:
        return self._recent.get(path)

    def release(self, files: list[ResultFile]) -> None:
        for result in files:
            data = self._recent.pop(result.path, None)
            if data is not None:
                self._recent_bytes -= len(data)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.directory / job_id

    def file_path(self, job_id: str, index: int, name: str) -> Path:
        ext = Path(name).suffix
        if not _SAFE_EXT.match(ext):
            ext = ".bin"
        return self.job_dir(job_id) / f"{index}{ext.lower()}"

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def remove_results(self, job_id: str, files: list[ResultFile]) -> None:
        """The job's folder with the files it is known to hold: a few system calls, where a walk
        of the folder costs several per file (the walk only for a folder that holds more)."""
        for result in files:
            try:
                os.unlink(result.path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.job_dir(job_id))
        except FileNotFoundError:
            pass
        except OSError:
            self.remove_job(job_id)

    def job_ids(self) -> list[str]:
        return [p.name for p in self.directory.iterdir() if _JOB_ID.match(p.name)]

    def sweep(self, max_age: float, keep: set[str], now: float | None = None) -> list[str]:
        """Remove job folders older than `max_age` seconds that no live job keeps."""
        removed = []
        cutoff = (time.time() if now is None else now) - max_age
        for job_id in self.job_ids():
            if job_id in keep:
                continue
            try:
                if self.job_dir(job_id).stat().st_mtime < cutoff:
                    self.remove_job(job_id)
                    removed.append(job_id)
            except OSError:
                continue
        return removed
