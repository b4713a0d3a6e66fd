"""Keeping the disk bounded: expired results and unused uploads are removed, and said so."""
from __future__ import annotations

import logging
import time

from .results import ResultStore
from .uploads import UploadStore

log = logging.getLogger("bridge.sweep")


def sweep_disk(uploads: UploadStore, results: ResultStore, *, upload_ttl: float, result_ttl: float,
               keep_uploads: set[str], keep_results: set[str], now: float | None = None) -> tuple[list, list]:
    """Blocking (run it in an executor). Removes uploads unused for `upload_ttl` seconds and
    result folders older than `result_ttl` that no job holds; returns what it removed."""
    now = time.time() if now is None else now
    removed_uploads = []
    for name, mtime, size in uploads.list():
        if name not in keep_uploads and now - mtime > upload_ttl:
            uploads.remove(name)
            removed_uploads.append(name)
            log.info("removed upload %s (%d bytes, unused for %.0fs)", name, size, now - mtime)
    removed_results = results.sweep(result_ttl, keep_results, now=now)
    for job_id in removed_results:
        log.info("removed results of job %s (older than %.0fs, no job holds them)", job_id, result_ttl)
    return removed_uploads, removed_results
