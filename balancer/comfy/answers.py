"""Reading ComfyUI's answers: rejections, execution errors, history entries, queue listings and
output files. Pure functions of the parsed JSON."""
from __future__ import annotations

from dataclasses import dataclass

import ujson

MAX_REASON = 600


@dataclass(frozen=True)
class OutputItem:
    filename: str
    subfolder: str
    type: str       # "output" | "temp" | "input"
    node_id: str


def _node_label(node_id, graph: dict, class_type: str | None = None) -> str:
    node = graph.get(str(node_id)) or {}
    klass = class_type or node.get("class_type") or "?"
    return f"node {node_id} ({klass})"


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def describe_rejection(body, graph: dict, status: int = 400) -> str:
    """A client-readable reason from POST /prompt's 400 body (or a 200 with node_errors)."""
    if not isinstance(body, dict):
        return f"the backend refused the prompt (HTTP {status})"
    problems = []
    for node_id, info in (body.get("node_errors") or {}).items():
        if not isinstance(info, dict):
            continue
        label = _node_label(node_id, graph, info.get("class_type"))
        for error in info.get("errors") or ():
            if not isinstance(error, dict):
                continue
            message, details = error.get("message", "invalid"), error.get("details", "")
            problems.append(f"{label}: {message}" + (f" ({details})" if details else ""))
    if problems:
        return _clip("invalid prompt: " + "; ".join(problems))
    error = body.get("error")
    if isinstance(error, dict):
        message, details = error.get("message", "invalid prompt"), error.get("details", "")
        return _clip(f"invalid prompt: {message}" + (f" ({details})" if details else ""))
    return f"the backend refused the prompt (HTTP {status})"


def describe_execution_error(data: dict, graph: dict) -> str:
    node_id = data.get("node_id")
    message = data.get("exception_message") or data.get("exception_type") or "unknown error"
    if node_id is None:
        return _clip(f"execution error: {message}")
    return _clip(f"execution error in {_node_label(node_id, graph, data.get('node_type'))}: {message}")


def output_files(entry: dict, graph: dict) -> list[OutputItem]:
    """Every file a history entry lists, in output-node order (the workflow's node order)."""
    outputs = entry.get("outputs") or {}
    order = [nid for nid in graph if nid in outputs] + [nid for nid in outputs if nid not in graph]
    items: list[OutputItem] = []
    seen = set()
    for node_id in order:
        ui = outputs.get(node_id)
        if not isinstance(ui, dict):
            continue
        for values in ui.values():
            if not isinstance(values, list):
                continue
            for value in values:
                if not isinstance(value, dict) or not isinstance(value.get("filename"), str):
                    continue
                item = OutputItem(value["filename"], str(value.get("subfolder") or ""),
                                  str(value.get("type") or "output"), str(node_id))
                key = (item.filename, item.subfolder, item.type)
                if key not in seen:
                    seen.add(key)
                    items.append(item)
    return items


def entry_from_events(outputs: dict[str, dict | None], graph: dict, output_classes) -> dict | None:
    """The `outputs` of a history entry as the `executed` events gave them (see
    PromptWatch.outputs), when they came for every output node of the graph; else None: a
    node served from cache is not reported again by some versions, an output node without UI
    is never reported, and an event can be lost with a websocket. ComfyUI's history stores
    the very `output` each event carried, so `output_files` reads both alike."""
    expected = [nid for nid, node in graph.items()
                if isinstance(node, dict) and node.get("class_type") in output_classes]
    if not expected or any(nid not in outputs for nid in expected):
        return None
    return {"outputs": {nid: output for nid, output in outputs.items() if output is not None}}


def queue_prompt_ids(answer) -> tuple[set[str], set[str]]:
    """Prompt ids running and waiting in a GET /queue answer (items are [number, id, ...])."""
    answer = answer if isinstance(answer, dict) else {}

    def ids(key: str) -> set[str]:
        items = answer.get(key)
        if not isinstance(items, list):
            return set()
        return {item[1] for item in items if isinstance(item, list) and len(item) > 1}
    return ids("queue_running"), ids("queue_pending")


def outcome_from_history(entry: dict) -> tuple[str, dict] | None:
    """("success" | "error" | "interrupted", data) once a history entry says the prompt ended."""
    status = entry.get("status") or {}
    if status.get("completed") and status.get("status_str") == "success":
        return "success", {}
    if status.get("status_str") == "error":
        for kind, data in status.get("messages") or ():
            if kind in ("execution_error", "execution_interrupted"):
                return ("error" if kind == "execution_error" else "interrupted"), data
        return "error", {"exception_message": "execution failed"}
    return None


def lost_input_file(body, file_nodes: set[str]) -> bool:
    """A 400 from /prompt that says one of the given file-input nodes has no file."""
    if not isinstance(body, dict):
        return False
    for node_id, info in (body.get("node_errors") or {}).items():
        if node_id in file_nodes and any(
                isinstance(e, dict) and e.get("type") == "custom_validation_failed"
                for e in (info or {}).get("errors") or ()):
            return True
    return False


def is_out_of_memory(data: dict) -> bool:
    text = f"{data.get('exception_type', '')} {data.get('exception_message', '')}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text


def refuses_prompt_id(body) -> bool:
    """POST /prompt's 400 for a prompt_id the server will not take (current servers want a
    canonical UUID)."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("type") == "invalid_prompt_id"


# Marks of a list input the user uploads into: its choices are the server's input folder.
UPLOAD_MARKS = ("image_upload", "video_upload", "audio_upload", "file_upload")


def input_spec(object_info, class_type: str, name: str):
    """One input's entry in a GET /object_info answer (``["INT", {...}]``), or None."""
    node = object_info.get(class_type) if isinstance(object_info, dict) else None
    inputs = node.get("input") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return None
    for section in ("required", "optional"):
        part = inputs.get(section)
        if isinstance(part, dict) and name in part:
            return part[name]
    return None


def input_limits(spec) -> dict:
    """What a form needs from one input's object_info entry: ``min``/``max``/``step`` (those
    given) for INT and FLOAT; ``choices`` for a list, written ``[["a", "b"], {...}]`` by older
    servers and ``["COMBO", {"options": ["a", "b"]}]`` by newer ones, except a list the user
    uploads into. {} when there is nothing to say."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return {}
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind in ("INT", "FLOAT"):
        return {key: options[key] for key in ("min", "max", "step") if _finite(options.get(key))}
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if not isinstance(choices, list) or any(options.get(mark) for mark in UPLOAD_MARKS):
        return {}
    return {"choices": list(choices)}


def _finite(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and value not in (float("inf"), float("-inf")))


_PREVIEW_TYPES = {1: "image/jpeg", 2: "image/png"}


def parse_preview(frame: bytes) -> tuple[str | None, str | None, str, bytes] | None:
    """(prompt id, node id, content type, image) of a binary preview frame: type 1 (a format
    number, then the image; no prompt named) or type 4 (JSON metadata naming the prompt and
    node, then the image); None for any other frame (type 3 is progress text)."""
    if len(frame) < 8:
        return None
    kind, second = int.from_bytes(frame[:4], "big"), int.from_bytes(frame[4:8], "big")
    if kind == 1:
        return None, None, _PREVIEW_TYPES.get(second, "image/jpeg"), frame[8:]
    if kind == 4 and 8 + second <= len(frame):
        try:
            meta = ujson.loads(frame[8:8 + second])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        prompt_id, node_id = meta.get("prompt_id"), meta.get("node_id")
        content_type = meta.get("image_type") if isinstance(meta.get("image_type"), str) else "image/png"
        return (prompt_id if isinstance(prompt_id, str) else None, str(node_id) if node_id is not None else None,
                content_type, frame[8 + second:])
    return None
