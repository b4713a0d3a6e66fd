"""Today's ComfyUI jobs API (GET /api/jobs, GET /api/jobs/{id}, the cancel routes): how a
queue item or a history entry becomes a job, and how the list is filtered and sorted.

The rules are those of ComfyUI's comfy_execution/jobs.py, for the outputs the simulator's
nodes produce (image lists; the 3D/text/video cases are folded into the same checks):
- status: pending (queued), in_progress (running), completed / failed / cancelled (history;
  an error whose messages hold execution_interrupted is "cancelled");
- keys whose value would be None are left out;
- the list is sorted by create_time (or by execution duration), stably, descending unless asked.
"""
from __future__ import annotations

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
ALL_STATUSES = [PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED]
HISTORY_STATUSES = {COMPLETED, FAILED, CANCELLED}

PREVIEWABLE_MEDIA = {"images", "video", "audio", "3d", "text"}
THREE_D_SUFFIXES = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
TEXT_SUFFIXES = (".txt", ".md", ".json")
TEXT_PREVIEW_MAX = 1024


def _no_nones(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _metadata(extra_data: dict) -> tuple:
    """(create_time, workflow_id) from a queue item's extra_data."""
    workflow = extra_data.get("extra_pnginfo", {}).get("workflow", {})
    return extra_data.get("create_time"), workflow.get("id")


def _as_file(item):
    """An output list entry as a file dict, or None when it is not one (3D names become files)."""
    if isinstance(item, dict):
        return item
    if isinstance(item, str) and item.lower().endswith(THREE_D_SUFFIXES):
        return {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
    return None


def _previewable(media: str, item: dict) -> bool:
    fmt = item.get("format", "")
    name = item.get("filename", "").lower()
    return (media in PREVIEWABLE_MEDIA or (bool(fmt) and fmt.startswith(("video/", "audio/")))
            or name.endswith(THREE_D_SUFFIXES) or name.endswith(TEXT_SUFFIXES))


def _output_lists(outputs: dict):
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media != "animated" and isinstance(items, list):
                yield node_id, media, items


def summarize_outputs(outputs: dict) -> tuple[int, dict | None, int]:
    """(outputs_count, preview_output, previewable_outputs_count) of history outputs.

    The preview is the first saved ("output" type) visual item, else the first other
    visual item, else the first text file, else the first raw text (which is not counted).
    """
    count = previewable = 0
    saved = other = text_file = raw_text = None
    for node_id, media, items in _output_lists(outputs):
        for raw in items:
            item = _as_file(raw)
            if item is None:
                if media == "text" and raw is not None and raw_text is None and saved is None:
                    if isinstance(raw, tuple):
                        value = str(raw[0]) if raw else ""
                    else:
                        value = str(raw)
                    raw_text = {"content": value[:TEXT_PREVIEW_MAX], "nodeId": node_id, "mediaType": media}
                    if len(value) > TEXT_PREVIEW_MAX:
                        raw_text["truncated"] = True
                continue
            count += 1
            if not _previewable(media, item):
                continue
            previewable += 1
            if saved is not None:
                continue
            enriched = {**item, "nodeId": node_id}
            enriched.setdefault("mediaType", media)
            if media == "text" or item.get("filename", "").lower().endswith(TEXT_SUFFIXES):
                text_file = text_file or enriched
            elif item.get("type") == "output":
                saved = enriched
            else:
                other = other or enriched
    return count, saved or other or text_file or raw_text, previewable


def normalize_outputs(outputs: dict) -> dict:
    """History outputs as the single-job answer shows them: 3D names as file dicts, no None items."""
    out = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            out[node_id] = node_outputs
            continue
        out[node_id] = {media: ([_as_file(i) or i for i in items if i is not None]
                                if media != "animated" and isinstance(items, list) else items)
                        for media, items in node_outputs.items()}
    return out


def from_queue_item(item: list, status: str, detail: bool = False) -> dict:
    """A pending or running queue item (5-element view) as a job."""
    number, prompt_id, prompt, extra_data, _ = item
    create_time, workflow_id = _metadata(extra_data)
    job = _no_nones({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                     "outputs_count": 0, "previewable_outputs_count": 0, "workflow_id": workflow_id})
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def from_history(prompt_id: str, entry: dict, detail: bool = False) -> dict:
    """A history entry as a finished job."""
    number, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    outputs = entry.get("outputs", {})
    count, preview, previewable = summarize_outputs(outputs)
    started = ended = error = None
    interrupted = False
    for message in status_info.get("messages", []) if status_info else []:
        if not (isinstance(message, (list, tuple)) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            started = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    status_str = status_info.get("status_str") if status_info else None
    status = (CANCELLED if interrupted else FAILED) if status_str == "error" else COMPLETED
    job = _no_nones({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                     "execution_start_time": started, "execution_end_time": ended, "execution_error": error,
                     "outputs_count": count, "previewable_outputs_count": previewable,
                     "preview_output": preview, "workflow_id": workflow_id})
    if detail:
        job["outputs"] = normalize_outputs(outputs)
        job["execution_status"] = entry.get("status")
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def find(prompt_id: str, running: list, pending: list, history: dict) -> dict | None:
    """One job with its details (history first, then running, then pending), or None."""
    if prompt_id in history:
        return from_history(prompt_id, history[prompt_id], detail=True)
    for items, status in ((running, IN_PROGRESS), (pending, PENDING)):
        for item in items:
            if item[1] == prompt_id:
                return from_queue_item(item, status, detail=True)
    return None


def _duration(job: dict):
    start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
    return end - start if start and end else 0


def listing(running: list, pending: list, history: dict, statuses=None, workflow_id=None,
            sort_by="created_at", sort_order="desc", limit=None, offset=0) -> tuple[list, int]:
    """(the page of jobs, how many matched) for GET /api/jobs."""
    wanted = set(statuses) if statuses is not None else set(ALL_STATUSES)
    jobs = []
    if IN_PROGRESS in wanted:
        jobs += [from_queue_item(i, IN_PROGRESS) for i in running]
    if PENDING in wanted:
        jobs += [from_queue_item(i, PENDING) for i in pending]
    if wanted & HISTORY_STATUSES:
        for prompt_id, entry in history.items():
            job = from_history(prompt_id, entry)
            if job["status"] in wanted:
                jobs.append(job)
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    key = _duration if sort_by == "execution_duration" else (lambda j: j.get("create_time", 0))
    jobs = sorted(jobs, key=key, reverse=sort_order == "desc")
    total = len(jobs)
    if offset > 0:
        jobs = jobs[offset:]
    if limit is not None:
        jobs = jobs[:limit]
    return jobs, total
