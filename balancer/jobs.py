"""A job: one client's request, from generate to history, and the messages clients see."""
from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .progress import ProgressTracker, format_percent

DONE_DETAIL = "Execution is done"
CONNECTED_DETAIL = "server connected"
LISTENING_DETAIL = "server is listening"
INTERRUPTED = "interrupted"


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
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    backend: object | None = None   # balancer.backend.Backend while it holds a slot
    last_backend: object | None = None
    prompt_id: str | None = None
    dispatched_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0               # dispatches so far
    requeues: int = 0               # times it went back to the queue after a backend was lost
    oom_retried: bool = False
    percent: float = 0.0
    tracker: ProgressTracker | None = None
    results: list = field(default_factory=list)   # storage.results.ResultFile
    error: str = ""
    error_reported: bool = False
    stop_reason: StopReason | None = None
    task: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)

    @property
    def ended(self) -> bool:
        return not self.active

    def status(self, queue_position: int | None = None) -> dict:
        """The job's state in the words of the websocket and /execution-info."""
        if self.state is JobState.DONE:
            return status_message("closed", DONE_DETAIL)
        if self.state is JobState.ERROR:
            return status_message("error", self.error)
        if self.state is JobState.RUNNING and self.prompt_id is not None:
            return status_message("progress", format_percent(self.percent))
        if queue_position is not None:
            return status_message("connected", f"queued / {queue_position}", queue_position=queue_position)
        return status_message("connected", CONNECTED_DETAIL)
