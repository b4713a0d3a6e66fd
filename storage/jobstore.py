"""Jobs on disk, so a restart or a crash of the bridge loses none: SQLite in WAL mode.

Every change of a job is an upsert of one row keyed by clientId (or a delete when the job's
life ends). Writes are batched: whatever accumulated while the previous transaction ran is
written in the next one, on one worker thread, so the event loop never waits on the disk and
a burst of a thousand changes costs a few transactions. `save()` returns a future that
resolves once the row is committed; callers that promise something to a client (a queued
job, stored results) await it first.

With `synchronous=NORMAL` in WAL mode a commit survives the process being killed (the data
is in the OS cache); only a power loss can take the last commits.

The generation count lives here too, written in the same transaction as the job that
finished, so the two can never disagree. So do pending webhook deliveries (`save_delivery`):
one queued while a job ends is committed with the job's final record, so a crash cannot keep
the one and lose the other. And so do other small keyed records (`save_record`: the v2
surface's assets and idempotency keys), committed in the same batches as the jobs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from pathlib import Path

import ujson

log = logging.getLogger("bridge.jobstore")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (client_id TEXT PRIMARY KEY, record TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhooks (id TEXT PRIMARY KEY, delivery TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, record TEXT NOT NULL,
                                    updated REAL NOT NULL, PRIMARY KEY (kind, key));
"""


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, dict | None] = {}
        self._pending_count: int | None = None
        self._pending_deliveries: dict[str, dict | None] = {}
        self._pending_records: dict[tuple[str, str], dict | None] = {}
        self._waiters: list[asyncio.Future] = []
        self._writer: asyncio.Task | None = None

    # ------------------------------------------------------------------ start-up (blocking, before serving)
    def open(self) -> tuple[list[dict], int | None]:
        """Open (or create) the database; returns the stored job records and generation count."""
        self._thread.submit(self._connect).result()
        return self._thread.submit(self._read_all).result()

    def _connect(self) -> None:
        try:
            self._db = self._open_db()
            self._db.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.DatabaseError as exc:
            # A damaged database must not keep the bridge down: keep it aside for inspection.
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.error("job database %s is damaged (%s); moved to %s, starting with an empty one",
                      self.path, exc, aside)
            if self._db is not None:
                self._db.close()
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.replace(Path(f"{aside}{suffix}"))
            self._db = self._open_db()

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _read_all(self) -> tuple[list[dict], int | None]:
        records = _decoded(self._db.execute("SELECT client_id, record FROM jobs"), "job record for clientId")
        row = self._db.execute("SELECT value FROM meta WHERE key='generation_count'").fetchone()
        return records, (int(row[0]) if row else None)

    def deliveries(self) -> list[dict]:
        """Pending webhook deliveries, oldest first (start-up, blocking, after `open`)."""
        return self._thread.submit(self._read_deliveries).result()

    def _read_deliveries(self) -> list[dict]:
        return _decoded(self._db.execute("SELECT id, delivery FROM webhooks ORDER BY rowid"), "webhook delivery")

    def records(self, kind: str) -> list[dict]:
        """Every stored record of `kind`, oldest first (start-up, blocking, after `open`)."""
        return self._thread.submit(self._read_records, kind).result()

    def _read_records(self, kind: str) -> list[dict]:
        return _decoded(self._db.execute("SELECT key, record FROM records WHERE kind=? ORDER BY updated", (kind,)),
                        f"{kind} record")

    # ------------------------------------------------------------------ writes
    def save(self, client_id: str, record: dict | None, generation_count: int | None = None) -> asyncio.Future:
        """Upsert (or, with record None, delete) a job row; the future resolves once committed."""
        self._pending[client_id] = record
        if generation_count is not None:
            self._pending_count = generation_count
        return self._wake()

    def save_delivery(self, delivery_id: str, delivery: dict | None) -> asyncio.Future:
        """Upsert (or, with None, delete) a pending webhook delivery; resolves once committed."""
        self._pending_deliveries[delivery_id] = delivery
        return self._wake()

    def save_record(self, kind: str, key: str, record: dict | None) -> asyncio.Future:
        """Upsert (or, with None, delete) a keyed record of `kind`; resolves once committed."""
        self._pending_records[(kind, key)] = record
        return self._wake()

    def _wake(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_batches())
        return future

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        # One loop pass first: what the same pass changes (a job queued and at once dispatched,
        # with its prompt id) goes to disk in one commit instead of two in a row.
        await asyncio.sleep(0)
        while self._pending or self._pending_count is not None or self._pending_deliveries or self._pending_records:
            batch, self._pending = self._pending, {}
            count, self._pending_count = self._pending_count, None
            deliveries, self._pending_deliveries = self._pending_deliveries, {}
            records, self._pending_records = self._pending_records, {}
            waiters, self._waiters = self._waiters, []
            try:
                await loop.run_in_executor(self._thread, self._commit, batch, count, deliveries, records)
            except Exception as exc:  # a failed write must not lose the loop; say it loudly
                log.error("job database write failed: %s", exc)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _commit(self, batch: dict[str, dict | None], count: int | None,
                deliveries: dict[str, dict | None] | None = None,
                records: dict[tuple[str, str], dict | None] | None = None) -> None:
        db = self._db
        now = time.time()
        db.execute("BEGIN")
        try:
            for client_id, record in batch.items():
                if record is None:
                    db.execute("DELETE FROM jobs WHERE client_id=?", (client_id,))
                else:
                    db.execute("INSERT OR REPLACE INTO jobs (client_id, record, updated) VALUES (?,?,?)",
                               (client_id, ujson.dumps(record, escape_forward_slashes=False), now))
            if count is not None:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation_count', ?)",
                           (str(count),))
            for delivery_id, delivery in (deliveries or {}).items():
                if delivery is None:
                    db.execute("DELETE FROM webhooks WHERE id=?", (delivery_id,))
                else:
                    db.execute("INSERT OR REPLACE INTO webhooks (id, delivery, updated) VALUES (?,?,?)",
                               (delivery_id, ujson.dumps(delivery, escape_forward_slashes=False), now))
            for (kind, key), record in (records or {}).items():
                if record is None:
                    db.execute("DELETE FROM records WHERE kind=? AND key=?", (kind, key))
                else:
                    db.execute("INSERT OR REPLACE INTO records (kind, key, record, updated) VALUES (?,?,?,?)",
                               (kind, key, ujson.dumps(record, escape_forward_slashes=False), now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def flush(self) -> None:
        while self._writer is not None and not self._writer.done():
            await self._writer

    async def close(self) -> None:
        await self.flush()
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=True)


def _decoded(rows, what: str) -> list[dict]:
    """The JSON of each (key, text) row; an unreadable one is logged and skipped."""
    found = []
    for key, raw in rows:
        try:
            found.append(ujson.loads(raw))
        except ValueError:
            log.error("unreadable %s %s skipped", what, key)
    return found
