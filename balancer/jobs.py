"""A job: one client's request, from generate to history, and the messages clients see."""
from __future__ import annotations

import asyncio
import enum
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .affinity import models_of
from .progress import format_percent

DONE_DETAIL = "Execution is done"
CONNECTED_DETAIL = "server connected"
LISTENING_DETAIL = "server is listening"
INTERRUPTED = "interrupted"
# What a clientId may be (fullmatch: "$" would let a trailing newline in).
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Who a job belongs to: the name its API key has (BRIDGE_API_KEYS); everyone without keys, and
# the single BRIDGE_API_KEY, is DEFAULT_TENANT.
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_TENANT = "default"
PRIORITY_RANGE = (-100, 100)   # generate's `priority`: orders one tenant's own jobs, higher first


def status_message(status: str, detail: str, **extra) -> dict:
    """Clients read either spelling: the specification's examples use both."""
    return {"status": status, "detail": detail, "details": detail, **extra}


class JobState(str, enum.Enum):
    QUEUED = "queued"      # in the bridge's queue
    RUNNING = "running"    # holds a backend slot (files, prompt, execution, downloads)
    DONE = "done"          # results stored, waiting for GET /history
    ERROR = "error"        # failed, timed out or cancelled


class StopReason(str, enum.Enum):
    CANCEL = "cancel"          # the client asked (interrupt, socket closed)
    BACKEND_LOST = "lost"      # its backend went down: requeue


@dataclass(eq=False)
class Job:
    client_id: str
    alias: str
    graph: dict                     # the prompt built from the workflow and the client's inputs
    files: dict[str, Path]          # graph node/input key -> local file to put on the backend
    class_types: frozenset[str]
    allowed_backends: tuple[str, ...] | None = None
    webhook: str | None = None      # where the job's end is posted (balancer/webhooks.py)
    tenant: str = DEFAULT_TENANT
    priority: int = 0
    v2: dict | None = None          # a job submitted through /api/v2: its own data (balancer/v2/)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    backend: object | None = None   # balancer.comfy.Backend while it holds a slot
    last_backend: object | None = None
    prompt_id: str | None = None
    dispatched_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0               # dispatches so far
    requeues: int = 0               # times it went back to the queue after a backend was lost
    oom_retried: bool = False
    refused_by: dict[str, str] = field(default_factory=dict)  # backend address -> its 5xx answer
    percent: float = 0.0
    executing: bool = False         # the backend has started it (not only received it)
    started_at: float | None = None  # time.monotonic() of its prompt's execution_start
    results: list = field(default_factory=list)   # storage.results.ResultFile
    error: str = ""
    stop_reason: StopReason | None = None
    task: asyncio.Task | None = None
    models: frozenset[str] = field(init=False)   # model files its prompt loads (affinity.py)

    def __post_init__(self):
        self.models = models_of(self.graph)

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)

    @property
    def ended(self) -> bool:
        return not self.active

    def to_record(self) -> dict:
        """What a restart needs to carry on with this job (JSON-ready)."""
        where = self.backend or self.last_backend
        return {
            "id": self.id, "client_id": self.client_id, "alias": self.alias, "graph": self.graph,
            "files": {k: str(v) for k, v in self.files.items()},
            "class_types": sorted(self.class_types),
            "allowed_backends": list(self.allowed_backends) if self.allowed_backends is not None else None,
            "state": self.state.value, "created": self.created,
            "backend": where.address if where is not None else None,
            "prompt_id": self.prompt_id, "attempts": self.attempts, "requeues": self.requeues,
            "oom_retried": self.oom_retried, "percent": self.percent,
            "results": [{"name": r.name, "path": str(r.path), "media_type": r.media_type, "size": r.size,
                         "node_id": r.node_id} for r in self.results],
            "error": self.error, "finished_at": self.finished_at, "webhook": self.webhook,
            "tenant": self.tenant, "priority": self.priority,
            "v2": self.v2,
        }

    @classmethod
    def from_record(cls, record: dict, result_type) -> "Job":
        allowed = record.get("allowed_backends")
        return cls(
            client_id=record["client_id"], alias=record["alias"], graph=record["graph"],
            files={k: Path(v) for k, v in record["files"].items()},
            class_types=frozenset(record["class_types"]),
            allowed_backends=tuple(allowed) if allowed is not None else None,
            id=record["id"], state=JobState(record["state"]), created=record["created"],
            prompt_id=record.get("prompt_id"), attempts=record.get("attempts", 0),
            requeues=record.get("requeues", 0), oom_retried=record.get("oom_retried", False),
            percent=record.get("percent", 0.0),
            results=[result_type(name=r["name"], path=Path(r["path"]), media_type=r["media_type"], size=r["size"],
                                 node_id=r.get("node_id", "")) for r in record.get("results", ())],
            error=record.get("error", ""), finished_at=record.get("finished_at"), webhook=record.get("webhook"),
            # Records written before tenants and priorities existed: the default ones.
            tenant=record.get("tenant", DEFAULT_TENANT), priority=record.get("priority", 0), v2=record.get("v2"))

    def status(self, queue_position: int | None = None, waiting_for: str | None = None) -> dict:
        """The job's state in the words of the websocket and /execution-info; a queued job
        that no backend can take now says why (`waiting_for`) instead of its place."""
        if self.state is JobState.DONE:
            return status_message("closed", DONE_DETAIL)
        if self.state is JobState.ERROR:
            return status_message("error", self.error)
        if self.state is JobState.RUNNING and self.executing:
            return status_message("progress", format_percent(self.percent))
        if waiting_for is not None:
            return status_message("connected", waiting_for, queue_position=queue_position)
        if queue_position is not None:
            return status_message("connected", f"queued / {queue_position}", queue_position=queue_position)
        return status_message("connected", CONNECTED_DETAIL)
