"""Idempotency-Key with the contract's (Stripe's) semantics, kept in the job database.

The same key with the same request replays the recorded answer (and runs nothing again, also
after a restart); the same key with another request is `idempotency_key_reuse`; a retry while
the first request is still being answered is `idempotency_conflict` (retry after a second).
Only answers that created something are recorded: a refusal (a full queue, a bad graph) leaves
the key free, since a client retries a 429 with the same key. Keys are kept KEY_TTL seconds.
"""
from __future__ import annotations

import hashlib
import time

import ujson

from .errors import V2Refused

KEY_TTL = 24 * 3600.0
MAX_KEY_CHARS = 255


def fingerprint(data) -> str:
    """What "the same request" means: the same JSON, whatever its key order."""
    return hashlib.sha256(ujson.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")).hexdigest()


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise V2Refused("invalid_request", f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters")
    return key


class IdempotencyKeys:
    def __init__(self, store):
        self.store = store                       # storage.jobstore.JobStore, kind "idempotency"
        self._answers: dict[str, dict] = {}      # scope:key -> {"fingerprint", "status", "body", "at"}
        self._pending: set[str] = set()

    def load(self, records: list[dict], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for record in records:
            if now - record.get("at", 0) < KEY_TTL:
                self._answers[record["key"]] = record
            else:
                self.store.save_record("idempotency", record["key"], None)

    def begin(self, scope: str, key: str, print_: str | None) -> dict | None:
        """The recorded answer to replay, or None: go ahead, and call `finish` or `abandon`.
        With `print_` None (a body not read yet) the caller compares with `recorded` later."""
        name = f"{scope}:{key}"
        answer = self._answers.get(name)
        if answer is not None and time.time() - answer["at"] >= KEY_TTL:
            answer = None
        if answer is not None:
            if print_ is not None and answer["fingerprint"] != print_:
                raise V2Refused("idempotency_key_reuse",
                                "this Idempotency-Key was used with another request; use a new key")
            return answer
        if name in self._pending:
            raise V2Refused("idempotency_conflict", "a request with this Idempotency-Key is still being answered",
                            retry_after=1)
        self._pending.add(name)
        return None

    def finish(self, scope: str, key: str, print_: str, status: int, body: dict):
        """Record the answer; the future resolves once it is on disk."""
        name = f"{scope}:{key}"
        self._pending.discard(name)
        record = {"key": name, "fingerprint": print_, "status": status, "body": body, "at": time.time()}
        self._answers[name] = record
        return self.store.save_record("idempotency", name, record)

    def abandon(self, scope: str, key: str) -> None:
        self._pending.discard(f"{scope}:{key}")

    def sweep(self, now: float) -> None:
        for name in [n for n, a in self._answers.items() if now - a["at"] >= KEY_TTL]:
            del self._answers[name]
            self.store.save_record("idempotency", name, None)
