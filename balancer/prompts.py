"""Reading ComfyUI's answers about a prompt: rejections, execution errors and output files."""
from __future__ import annotations

from dataclasses import dataclass

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
