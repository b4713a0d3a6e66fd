"""One bridge per data folder: two bridges writing one job database lose jobs.

The bridge holds an advisory lock (`flock`) on `DATA_DIR/bridge.lock` while it runs; the file
holds its pid, so a second bridge can say which process has the folder. The lock is released
on a clean stop, and by the OS when the process ends however it ends (kill -9 included), so a
left-over file never blocks a start.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "bridge.lock"


class DataDirInUse(Exception):
    """The folder is held by another bridge, or cannot be locked; the message says which."""


class DataDirLock:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "DataDirLock":
        """Take the lock or raise DataDirInUse at once (never waits)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirInUse(f"DATA_DIR: cannot create '{self.path}' ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"DATA_DIR: '{self.data_dir}' is in use by another bridge (pid {holder}); "
                               "run one bridge per data folder") from None
        except OSError as exc:
            os.close(fd)
            raise DataDirInUse(f"DATA_DIR: cannot lock '{self.path}' ({exc.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.ftruncate(fd, 0)  # no stale pid for the next reader
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
