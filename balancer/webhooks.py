"""Webhooks: when a job that asked for one ends (done, error, cancelled, expired in the queue),
the bridge POSTs a JSON event to its URL, signed as the Standard Webhooks specification says.

`WebhookSender.on_job_event` is a `JobService` observer. At the job's end it queues the
delivery in the job database (`JobStore.save_delivery`) before the service writes the job's
final record, so both go to disk in one commit: a crash after the job ended finds the
delivery again (`restore`). Delivery is at least once: attempts with a timeout, exponential
backoff for up to WEBHOOK_RETRY_FOR; a 2xx ends it, a 410 stops it. Redirects are never
followed (a 3xx is a failed attempt), and each attempt checks the URL again
(`egress.check_url`), so a name that now resolves to an internal address is not reached.

Delivering does not consume the results: GET /history still answers until RESULT_TTL. The
bytes of small outputs travel in the event (base64, up to WEBHOOK_INLINE_MAX in all); the
body is built once and kept, so every attempt (across restarts too) sends the same event
under the same `webhook-id`.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import uuid
from collections import Counter
from pathlib import Path

import ujson
from tornado import httpclient, simple_httpclient

from . import egress
from .errors import Refused
from .jobs import DONE_DETAIL, INTERRUPTED

log = logging.getLogger("bridge.webhooks")

RETRY_FIRST = 1.0     # seconds before the second attempt; doubled each time
RETRY_CAP = 300.0     # longest wait between two attempts
OUTCOMES = ("delivered", "retried", "gave_up", "gone")
USER_AGENT = "comfy-bridge-webhooks"


def secret_key(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: `whsec_` then base64 (ValueError otherwise)."""
    if not secret.startswith("whsec_"):
        raise ValueError("must be 'whsec_' followed by base64 (e.g. whsec_ + 32 random bytes in base64)")
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except (ValueError, TypeError):
        raise ValueError("the part after 'whsec_' is not base64") from None
    if len(key) < 16:
        raise ValueError("the key must be at least 16 bytes (24 or more base64 characters)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: v1, base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def retry_delay(attempts: int) -> float:
    """Wait after the `attempts`-th failed attempt: 1, 2, 4, ... seconds, at most RETRY_CAP."""
    return min(RETRY_CAP, RETRY_FIRST * 2 ** max(0, attempts - 1))


def build_body(event: dict, files: list[str] | None, recent: dict[str, bytes]) -> str:
    """The event as sent; with `files` (the outputs' paths, in order) their bytes in base64.
    Blocking (it may read files): runs in an executor. An output whose file is gone (fetched
    and removed meanwhile) is sent without its bytes."""
    if files:
        event = dict(event, outputs=[dict(o) for o in event["outputs"]])
        for output, path in zip(event["outputs"], files):
            data = recent.get(path)
            if data is None:
                try:
                    data = Path(path).read_bytes()
                except OSError:
                    continue
            output["data"] = base64.b64encode(data).decode()
    return ujson.dumps(event, escape_forward_slashes=False, ensure_ascii=False)


class WebhookSender:
    """Deliveries of job events; one per bridge, started with the bridge, closed at shutdown."""

    def __init__(self, settings, store, results, generation_count):
        self.settings = settings
        self.store = store                          # storage.jobstore.JobStore
        self.results = results                      # storage.results.ResultStore (recent bytes)
        self.generation_count = generation_count    # () -> int
        self.key = secret_key(settings.webhook_secret) if settings.webhook_secret else None
        self.counters: Counter[str] = Counter({name: 0 for name in OUTCOMES})
        self.pending: dict[str, asyncio.Task] = {}
        self._client: httpclient.AsyncHTTPClient | None = None
        self._closing = False

    # ------------------------------------------------------------------ requests
    async def check(self, url) -> str:
        """The `webhook` option of a generate: a URL the bridge may post to (Refused otherwise)."""
        if not isinstance(url, str) or not url:
            raise Refused("webhook: must be a URL (http:// or https://)")
        if self.key is None:
            raise Refused("webhook: this bridge sends no webhooks (WEBHOOK_SECRET is not set)")
        await egress.check_url(url, "webhook", self.settings.webhook_allowed_hosts)
        return url

    # ------------------------------------------------------------------ job ends (an observer)
    def on_job_event(self, event: str, job, backend, detail: dict) -> None:
        """Never raises: a webhook bug must not break a job's transition."""
        try:
            self._on_event(event, job, detail)
        except Exception:  # noqa: BLE001 - see docstring
            log.exception("webhook: could not queue the event %s of job %s", event, getattr(job, "id", "?"))

    def _on_event(self, event: str, job, detail: dict) -> None:
        if event not in ("done", "failed"):
            return
        cancelled = detail.get("cancelled", False)   # a "failed" that ends a cancel
        if not job.webhook or self.key is None:
            return
        if event == "done":
            status, text = "done", DONE_DETAIL
        elif cancelled:
            status, text = "cancelled", job.error or INTERRUPTED
        else:
            status, text = ("expired" if detail.get("queue_timeout") else "error"), job.error
        outputs = [{"name": r.name, "contentType": r.media_type, "size": r.size} for r in job.results] \
            if status == "done" else []
        finished = job.finished_at or time.time()
        message = {
            "type": f"job.{status}", "clientId": job.client_id, "status": status, "detail": text,
            "workflow": job.alias,
            "generationCount": detail.get("count") or self.generation_count(),
            "timings": {"submitted": job.created, "finished": finished,
                        "totalSeconds": max(0.0, finished - job.created),
                        "runSeconds": detail.get("duration")},
            "outputs": outputs,
        }
        inline = status == "done" and sum(r.size for r in job.results) <= self.settings.webhook_inline_max_bytes
        delivery = {
            "id": f"msg_{uuid.uuid4().hex}", "url": job.webhook, "job_id": job.id, "client_id": job.client_id,
            "event": message, "files": [str(r.path) for r in job.results] if inline else None,
            "body": None, "created": time.time(), "attempts": 0,
        }
        # Bytes just downloaded are still in memory: taken now, before GET /history may remove the files.
        recent = {str(r.path): data for r in job.results if inline
                  and (data := self.results.recent(r.path)) is not None}
        # A copy: the writer thread serialises it while this one goes on changing the delivery.
        saved = self.store.save_delivery(delivery["id"], dict(delivery))  # same commit as the job's end
        self._start(delivery, recent, saved)

    def restore(self, deliveries: list[dict]) -> None:
        """Carry on with the deliveries a previous run left pending (after a restart or a kill)."""
        for delivery in deliveries:
            self._start(delivery, {}, None)
        if deliveries:
            log.info("webhook: %d pending deliveries restored", len(deliveries))

    def _start(self, delivery: dict, recent: dict, saved) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(delivery, recent, saved))
        self.pending[delivery["id"]] = task
        task.add_done_callback(lambda _t, key=delivery["id"]: self.pending.pop(key, None))

    # ------------------------------------------------------------------ delivery
    async def _deliver(self, delivery: dict, recent: dict, saved) -> None:
        try:
            await self._deliver_until_done(delivery, recent, saved)
        except asyncio.CancelledError:
            raise  # shutting down: the delivery stays in the job database for the next start
        except Exception:  # noqa: BLE001 - a bug here must not go unseen; the row is kept for a restart
            log.exception("webhook %s for clientId %s: delivery failed", delivery.get("id"),
                          delivery.get("client_id"))

    async def _deliver_until_done(self, delivery: dict, recent: dict, saved) -> None:
        if saved is not None:
            await saved  # on disk before anyone hears of it
        if delivery["body"] is None:
            delivery["body"] = await asyncio.get_running_loop().run_in_executor(
                None, build_body, delivery["event"], delivery["files"], recent)
            delivery["files"] = None
            self.store.save_delivery(delivery["id"], dict(delivery))  # the same body on every attempt
        while True:
            result = await self._attempt(delivery)
            if result in ("delivered", "gone"):
                break
            delivery["attempts"] += 1
            delay = retry_delay(delivery["attempts"])
            if time.time() + delay - delivery["created"] > self.settings.webhook_retry_for:
                result = "gave_up"
                break
            self.counters["retried"] += 1
            log.info("webhook %s for clientId %s: attempt %d failed (%s); next in %.0f s", delivery["id"],
                     delivery["client_id"], delivery["attempts"], result, delay)
            # Not saved again per attempt: the row holds the body (MBs of base64); a restart only
            # starts the backoff over, and giving up still counts from `created`.
            await asyncio.sleep(delay)
        self.counters[result] += 1
        level = logging.INFO if result == "delivered" else logging.WARNING
        log.log(level, "webhook %s for clientId %s: %s after %d attempt(s)", delivery["id"],
                delivery["client_id"], result.replace("_", " "), delivery["attempts"] + (result != "gave_up"))
        self.store.save_delivery(delivery["id"], None)

    async def _attempt(self, delivery: dict) -> str:
        """One POST: "delivered" (2xx), "gone" (410), else why it failed."""
        url = delivery["url"]
        try:
            await egress.check_url(url, "webhook", self.settings.webhook_allowed_hosts)
        except Refused as exc:
            return str(exc)
        timestamp = int(time.time())
        body = delivery["body"]
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "webhook-id": delivery["id"], "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.key, delivery["id"], timestamp, body)}
        timeout = self.settings.webhook_timeout
        request = httpclient.HTTPRequest(
            url, method="POST", body=body.encode(), headers=headers, follow_redirects=False,
            connect_timeout=min(timeout, 10.0), request_timeout=timeout, decompress_response=False,
            streaming_callback=lambda _chunk: None)  # the receiver's answer is not kept
        try:
            response = await self._http().fetch(request, raise_error=False)
        except Exception as exc:  # noqa: BLE001 - refused, reset, timed out, TLS: all a failed attempt
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.code < 300:
            return "delivered"
        if response.code == 410:
            return "gone"
        return f"HTTP {response.code}"

    def _http(self) -> httpclient.AsyncHTTPClient:
        # Its own client (never tornado's shared one), so its queue and limits are the webhooks' own;
        # it connects only to addresses egress allows at connection time (no DNS rebinding).
        if self._client is None:
            self._client = simple_httpclient.SimpleAsyncHTTPClient(
                force_instance=True, max_clients=20,
                resolver=egress.PublicResolver(allowed_hosts=self.settings.webhook_allowed_hosts))
        return self._client

    async def close(self) -> None:
        """Stop delivering; what is pending stays in the job database for the next start."""
        self._closing = True
        tasks = list(self.pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            self._client.close()
