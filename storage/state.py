"""The state file (`CURRENT_STATE`): the generation count, kept across restarts and crashes.

Written by atomic replace (temp file, fsync, rename) so a crash never leaves it half written,
and mirrored to `<name>.bak`, which is used when the main file is damaged. The job database
holds the same count and wins at start-up; this file is what the specification names.
Writes run in an executor and are coalesced: a burst of increments costs one or two writes.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import ujson

log = logging.getLogger("bridge.state")
MIN_WRITE_INTERVAL = 1.0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read_count(path: Path) -> int:
    data = ujson.loads(path.read_bytes())
    count = data["generation_count"] if isinstance(data, dict) else data
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"generation_count is {count!r}")
    return count


class StateFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self._count = self._load()
        self._written = self._count
        self._writer: asyncio.Task | None = None
        self._last_write = float("-inf")
        self._hurry = False
        self._hurry_event = asyncio.Event()

    def _load(self) -> int:
        for candidate in (self.path, self.backup):
            if not candidate.exists():
                continue
            try:
                count = _read_count(candidate)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("state file %s is damaged (%s); trying the last good copy", candidate, exc)
                continue
            if candidate is self.backup:
                log.warning("generation count %d restored from %s", count, candidate)
            return count
        if self.path.exists() or self.backup.exists():
            log.error("no readable state file at %s; the generation count starts from 0", self.path)
        return 0

    @property
    def generation_count(self) -> int:
        return self._count

    def set_count(self, count: int) -> None:
        """Take the count from a source that knows better (the job database)."""
        if count != self._count:
            log.warning("generation count %d in %s corrected to %d", self._count, self.path, count)
            self._count = count  # written by the next write_if_changed() or increment()

    def write_if_changed(self) -> None:
        if self._written != self._count:
            self._schedule_write()

    def increment(self) -> int:
        self._count += 1
        self._schedule_write()
        return self._count

    def _schedule_write(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_until_current())

    async def _write_until_current(self) -> None:
        loop = asyncio.get_running_loop()
        while self._written != self._count:
            # At most one write a second: the job database already holds the exact count, so
            # this file may lag a moment; fsyncs on every finished job would cost the loop.
            wait = self._last_write + MIN_WRITE_INTERVAL - loop.time()
            if wait > 0 and not self._hurry:
                try:
                    await asyncio.wait_for(self._hurry_event.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            count = self._count
            self._last_write = loop.time()
            try:
                await loop.run_in_executor(None, self._write, count)
            except OSError as exc:
                log.error("cannot write state file %s: %s", self.path, exc)
                return
            self._written = count

    def _write(self, count: int) -> None:
        # Two copies, each replaced atomically and one after the other: whatever a crash
        # or a disk error damages, one of them holds the latest count.
        body = ujson.dumps({"generation_count": count}).encode()
        atomic_write_bytes(self.path, body)
        atomic_write_bytes(self.backup, body)

    async def flush(self) -> None:
        """Wait until the count on disk is the count in memory (used at shutdown and in tests)."""
        self._hurry = True
        self._hurry_event.set()
        while self._writer is not None and not self._writer.done():
            await self._writer
        if self._written != self._count:
            self._schedule_write()
            await self._writer
        self._hurry = False
        self._hurry_event.clear()
