"""What the v2 handlers call: submit, look up, cancel and list v2 jobs, their outputs as
assets, and the idempotency of submits. Every job goes through the one `JobService`."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path

from blake3 import blake3

from ..errors import Busy
from ..jobs import DEFAULT_TENANT, Job, JobState
from .errors import V2Refused
from .events import JobFollowers
from .idempotency import IdempotencyKeys, fingerprint
from .intake import build_job
from .view import client_id_of, job_view, parse_output_id, summary_view

log = logging.getLogger("bridge.v2")
DEFAULT_PAGE = 50
MAX_PAGE = 100
HASH_CHUNK = 1024 * 1024


def _hash_file(path: Path) -> str | None:
    hasher = blake3()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                hasher.update(chunk)
    except OSError:
        return None
    return hasher.hexdigest()


def key_kind(what: str, tenant: str) -> str:
    """Where a tenant's Idempotency-Keys for `what` (jobs, assets) are kept: each tenant's its own."""
    return what if tenant == DEFAULT_TENANT else f"{what}/{tenant}"


class V2Surface:
    def __init__(self, settings, service, assets, store, hub):
        self.settings = settings
        self.service = service          # balancer.service.JobService
        self.assets = assets            # storage.assets.AssetStore
        self.store = store              # storage.jobstore.JobStore
        self.keys = IdempotencyKeys(store)
        self.followers = JobFollowers(hub)
        self._hashing: set[str] = set()
        self.previews: dict[str, tuple] = {}   # clientId -> the latest (node id, type, image) while it runs
        service.preview_listeners.append(self._previewed)

    def start(self) -> None:
        """After the service restored its jobs: outputs whose hashes a restart interrupted."""
        for job in self.service.jobs.values():
            if job.v2 is not None and job.state is JobState.DONE and job.v2.get("hashes") is None:
                self._hash_outputs(job)

    # ------------------------------------------------------------------ a service observer
    def on_job_event(self, event: str, job: Job, backend, detail: dict) -> None:
        if job.v2 is None:
            return
        if event == "dispatched" and not job.v2.get("started"):
            job.v2["started"] = time.time()   # in the record this transition writes
        elif event == "done":
            self._hash_outputs(job)
        if job.ended:
            self.previews.pop(job.client_id, None)
            if job.files:
                self.assets.release(job.files.values(), self.files_in_use())
        self.followers.nudge(job.client_id)

    def _previewed(self, job: Job, node_id, content_type: str, image: bytes) -> None:
        if job.v2 is not None:
            self.previews[job.client_id] = (node_id, content_type, image)
            self.followers.nudge(job.client_id)

    def _hash_outputs(self, job: Job) -> None:
        if job.id in self._hashing:
            return
        self._hashing.add(job.id)
        asyncio.get_running_loop().create_task(self._compute_hashes(job))

    async def _compute_hashes(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = list(job.results)
            job.v2["hashes"] = [await loop.run_in_executor(None, _hash_file, r.path) for r in results]
            if self.service.jobs.get(job.client_id) is job:
                await self.store.save(job.client_id, job.to_record())
        except Exception:   # a fault of ours must not leave a stream waiting for the hashes
            log.exception("job %s: hashing its outputs failed", job.id)
            job.v2["hashes"] = [None] * len(job.results)
        finally:
            self._hashing.discard(job.id)
            self.followers.nudge(job.client_id)

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str, tenant: str = DEFAULT_TENANT) -> Job:
        """The v2 job of that id, if it is the tenant's (another tenant's is not found either)."""
        job = self.service.get(client_id_of(job_id), tenant) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if job is None or job.v2 is None:
            raise V2Refused("not_found", f"no job {job_id[:64]!r} (never submitted, or past its expires_at)")
        return job

    def view(self, job: Job, origin: str) -> dict:
        position = self.service.queue.position(job) if job.state is JobState.QUEUED else None
        return job_view(job, position, origin, self.settings.result_ttl, time.time())

    def outputs_ready(self, job: Job) -> bool:
        """Ended, and the outputs' hashes are known: the stream may send its last frames."""
        return job.ended and (job.state is not JobState.DONE or job.v2.get("hashes") is not None)

    async def submit(self, body: dict, key: str | None, origin: str,
                     tenant: str = DEFAULT_TENANT) -> tuple[dict, bool]:
        """(the job object, replayed). With a key, the answer is recorded before it is given.
        Keys are the tenant's own: two tenants may use the same one."""
        print_ = fingerprint(body) if key is not None else None
        kind = key_kind("jobs", tenant)
        if key is not None:
            recorded = self.keys.begin(kind, key, print_)
            if recorded is not None:
                return recorded["body"], True
        try:
            job = build_job(body, self.assets, lambda asset_id: self.output_path(asset_id, tenant), self.service.backends,
                            self.settings.v2_allowed_node_classes)
            job.tenant = tenant
            try:
                saved = self.service.submit_job(job)
            except Busy as exc:
                raise V2Refused("queue_full", str(exc), retry_after=exc.retry_after) from None
        except BaseException:
            if key is not None:
                self.keys.abandon(kind, key)
            raise
        answer = self.view(job, origin)
        # The key's answer is committed with the job itself: a crash keeps both or neither.
        recorded = self.keys.finish(kind, key, print_, 201, answer) if key is not None else None
        await saved
        if recorded is not None:
            await recorded
        return answer, False

    def cancel(self, job: Job) -> None:
        """Idempotent: an ended job stays as it is."""
        if job.active:
            job.v2["canceled"] = True   # before the transition, so its record says so
            self.service.cancel(job.client_id)

    def list(self, metadata: dict[str, str], limit: int | None, cursor: str | None,
             tenant: str = DEFAULT_TENANT) -> dict:
        """Newest first; `next_cursor` names the last item of a full page."""
        limit = DEFAULT_PAGE if limit is None else limit
        if not 1 <= limit <= MAX_PAGE:
            raise V2Refused("invalid_request", f"limit must be between 1 and {MAX_PAGE}")
        after = self._parse_cursor(cursor) if cursor else None
        jobs = sorted((j for j in self.service.jobs.values() if j.v2 is not None and j.tenant == tenant
                       and all((j.v2.get("metadata") or {}).get(k) == v for k, v in metadata.items())),
                      key=lambda j: (j.created, j.id), reverse=True)
        if after is not None:
            jobs = [j for j in jobs if (j.created, j.id) < after]
        page = jobs[:limit]
        answer: dict = {"jobs": [summary_view(j) for j in page]}
        if len(jobs) > limit:
            last = page[-1]
            answer["next_cursor"] = base64.urlsafe_b64encode(f"{last.created!r}/{last.id}".encode()).decode()
        return answer

    @staticmethod
    def _parse_cursor(cursor: str) -> tuple[float, str]:
        try:
            created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("/", 1)
            return float(created), job_id
        except (ValueError, UnicodeError):
            raise V2Refused("invalid_cursor", "cursor was not issued by this server") from None

    # ------------------------------------------------------------------ outputs as assets
    def output(self, asset_id: str, tenant: str = DEFAULT_TENANT) -> tuple[Job, int] | None:
        """(job, index) of an output asset of the tenant's own v2 jobs."""
        parsed = parse_output_id(asset_id)
        if parsed is None:
            return None
        job = self.service.get(client_id_of(parsed[0]), tenant)
        if job is None or job.v2 is None or parsed[1] >= len(job.results):
            return None
        return job, parsed[1]

    def output_path(self, asset_id: str, tenant: str = DEFAULT_TENANT) -> Path | None:
        found = self.output(asset_id, tenant)
        return found[0].results[found[1]].path if found else None

    def files_in_use(self) -> set[Path]:
        return {path for job in self.service.jobs.values() if job.active for path in job.files.values()}

    def sweep(self, now: float) -> None:
        self.keys.sweep(now)
