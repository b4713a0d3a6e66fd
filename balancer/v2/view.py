"""A bridge job as the contract's Job object (and list item), derived from the job record
alone: the state is the bridge's own, never pieced together from reads of a backend.

`job.v2` holds what only v2 knows: `metadata`, `workflow` (as submitted), `started` (first
dispatch, epoch seconds), `canceled`, `hashes` (blake3 of each output, once computed)."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from ..jobs import INTERRUPTED, Job, JobState

API = "/api/v2"
TERMINAL = frozenset({"succeeded", "canceled", "failed", "expired"})
_OUTPUT_ID = re.compile(r"output_([0-9a-f]{32})_(\d{1,4})")


def iso(moment: float) -> str:
    """RFC 3339 in UTC with its zone, as the SDK's strict parsing wants."""
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def client_id_of(job_id: str) -> str:
    return f"v2.{job_id}"


def output_id(job_id: str, index: int) -> str:
    return f"output_{job_id}_{index}"


def parse_output_id(asset_id: str) -> tuple[str, int] | None:
    match = _OUTPUT_ID.fullmatch(asset_id or "")
    return (match.group(1), int(match.group(2))) if match else None


def status_of(job: Job) -> str:
    if job.state is JobState.QUEUED:
        return "queued"
    if job.state is JobState.RUNNING:
        return "running"
    if job.state is JobState.DONE:
        return "succeeded"
    return "canceled" if job.v2.get("canceled") or job.error == INTERRUPTED else "failed"


def output_kind(media_type: str, name: str) -> str:
    top = media_type.split("/", 1)[0]
    if top in ("image", "video", "audio", "text"):
        return top
    return "latent" if name.endswith(".latent") else "file"


def expires_at(job: Job, ttl: float, now: float) -> float:
    """Ended: RESULT_TTL after its end (when the sweep drops it); else at least that from now."""
    return (job.finished_at or now) + ttl if job.ended else now + ttl


def progress_of(job: Job) -> dict | None:
    if job.state is JobState.QUEUED or (job.state is JobState.ERROR and not job.percent):
        return None
    value = 1.0 if job.state is JobState.DONE else min(max(job.percent / 100.0, 0.0), 1.0)
    total = len(job.graph)
    return {"value": round(value, 4), "nodes_done": int(value * total), "nodes_total": total,
            "current_node": None, "current_node_class": None, "step": None, "steps": None, "message": None}


def error_of(job: Job, status: str) -> dict | None:
    if status not in ("failed", "canceled"):
        return None
    message = job.error or status
    if status == "canceled":
        code = "canceled"
    elif message.startswith("time out"):
        code = "execution_timeout"
    elif message.startswith("invalid prompt"):
        code = "invalid_workflow"      # the backend's validation refused it at dispatch
    elif message.startswith("rejected by"):
        code = "backend_rejected"
    else:
        code = "execution_error"
    return {"code": code, "message": message, "node_id": None, "class_type": None, "traceback": None}


def outputs_of(job: Job, origin: str, ttl: float, now: float) -> list[dict]:
    hashes = job.v2.get("hashes") or []
    until = iso(expires_at(job, ttl, now))
    found = []
    for index, result in enumerate(job.results):
        asset_id = output_id(job.id, index)
        digest = hashes[index] if index < len(hashes) else None
        found.append({
            "node_id": result.node_id, "name": result.name,
            "type": output_kind(result.media_type, result.name), "content_type": result.media_type,
            "size_bytes": result.size, "id": asset_id, "hash": f"blake3:{digest}" if digest else None,
            "url": f"{origin}{API}/assets/{asset_id}/content", "url_expires_at": until, "job_id": job.id})
    return found


def job_view(job: Job, queue_position: int | None, origin: str, ttl: float, now: float) -> dict:
    status = status_of(job)
    started = job.v2.get("started")
    finished = job.finished_at if job.ended else None
    base = f"{API}/jobs/{job.id}"
    return {
        "id": job.id, "status": status, "created_at": iso(job.created),
        "started_at": iso(started) if started else None,
        "completed_at": iso(finished) if finished else None,
        "expires_at": iso(expires_at(job, ttl, now)),
        "queue_position": queue_position if status == "queued" else None,
        "progress": progress_of(job),
        "outputs": outputs_of(job, origin, ttl, now),
        "error": error_of(job, status),
        "metrics": {
            "queue_ms": int((started - job.created) * 1000) if started else None,
            "execution_ms": int((finished - started) * 1000) if started and finished else None,
        },
        "metadata": job.v2.get("metadata") or {},
        "urls": {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"},
    }


def summary_view(job: Job) -> dict:
    """A list item: lighter than a job (no outputs, no links)."""
    updated = job.finished_at if job.ended else (job.v2.get("started") or job.created)
    return {"id": job.id, "status": status_of(job), "create_time": iso(job.created), "update_time": iso(updated),
            "metadata": job.v2.get("metadata") or {}}


def asset_view(asset, origin: str, ttl: float, now: float, created_new: bool | None = None) -> dict:
    """An uploaded asset (storage.assets.AssetRecord): kept until deleted (`expires_at` null)."""
    view = {"id": asset.id, "hash": asset.blake3, "size_bytes": asset.size, "content_type": asset.content_type,
            "file_path": asset.file_path, "created_at": iso(asset.created),
            "url": f"{origin}{API}/assets/{asset.id}/content", "url_expires_at": iso(now + ttl),
            "expires_at": None, "job_id": None}
    if created_new is not None:
        view["created_new"] = created_new
    return view


def output_asset_view(job: Job, index: int, origin: str, ttl: float, now: float) -> dict:
    """A job's output as an asset: it lives as long as its job (`expires_at`)."""
    output = outputs_of(job, origin, ttl, now)[index]
    until = iso(expires_at(job, ttl, now))
    return {"id": output["id"], "hash": output["hash"], "size_bytes": output["size_bytes"],
            "content_type": output["content_type"], "file_path": output["name"],
            "created_at": iso(job.finished_at or job.created), "url": output["url"], "url_expires_at": until,
            "expires_at": until, "job_id": job.id}
