"""A v2 submit becomes a `Job`: the API-format graph taken verbatim, checked before it is
queued (its shape, node classes the backends have and the operator allows, required inputs
from the backends' /object_info, links), and its `core/ASSET` references turned into files the
run places on whichever backend takes the job (as the original API's uploads are)."""
from __future__ import annotations

import uuid

from ..jobs import Job
from .errors import V2Refused
from .view import client_id_of

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_NODES_REPORTED = 50
RESERVED_FIELDS = ("webhook_url", "inputs")   # reserved by the contract, refused if present


def check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise V2Refused("metadata_invalid", "metadata must be an object of string labels")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise V2Refused("metadata_invalid", f"metadata has {len(metadata)} pairs; at most {MAX_METADATA_PAIRS}")
    for key, value in metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY or not key.isprintable():
            raise V2Refused("metadata_invalid", f"metadata key '{key[:MAX_METADATA_KEY]}' must be 1 to "
                                                f"{MAX_METADATA_KEY} printable characters")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise V2Refused("metadata_invalid", f"metadata '{key}': the value must be a string of at most "
                                                f"{MAX_METADATA_VALUE} characters")
    return dict(metadata)


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def _asset_reference(value) -> dict | None:
    """The `info` of a `{"__type": "core/ASSET", "info": {...}}` value, else None."""
    if isinstance(value, dict) and value.get("__type") == "core/ASSET":
        info = value.get("info")
        return info if isinstance(info, dict) else {}
    return None


def _described(backends, class_type: str) -> dict | None:
    for backend in backends:
        info = getattr(backend, "object_info", None)
        if backend.up and isinstance(info, dict) and isinstance(info.get(class_type), dict):
            return info[class_type]
    return None


def build_job(body: dict, assets, outputs, backends, allowed: frozenset[str]) -> Job:
    """Raises V2Refused for what the contract refuses at submit. `outputs(asset_id)` finds an
    earlier job's output (it may be given as an input too)."""
    for name in RESERVED_FIELDS:
        if name in body:
            raise V2Refused("unsupported_field", f"'{name}' is reserved for a later version of the API")
    workflow = body.get("workflow")
    if not isinstance(workflow, dict):
        raise V2Refused("invalid_request", "'workflow' is required: the API-format graph as an object")
    if is_ui_format(workflow):
        raise V2Refused("workflow_format_ui", "this is a UI-format workflow (nodes and links); export it "
                                              "with 'Export (API)' and send that graph")
    extra = body.get("extra_data")   # accepted; not forwarded (no partner nodes behind the bridge)
    if extra is not None and not isinstance(extra, dict):
        raise V2Refused("invalid_request", "'extra_data' must be an object")
    metadata = check_metadata(body.get("metadata"))
    if not workflow:
        raise V2Refused("invalid_workflow", "the workflow has no nodes")

    errors: dict[str, list[dict]] = {}
    graph: dict = {}
    files = {}
    known = [b for b in backends if b.node_classes]

    def refuse(node_id: str, field: str | None, reason: str, message: str) -> None:
        errors.setdefault(node_id, []).append({"field": field, "reason": reason, "message": message})

    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            refuse(node_id, "class_type", "invalid_node", "a node is an object with a 'class_type' string")
            continue
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            refuse(node_id, "inputs", "invalid_node", "'inputs' must be an object")
            continue
        class_type = node["class_type"]
        if allowed and class_type not in allowed:
            refuse(node_id, "class_type", "node_class_not_allowed",
                   f"node class {class_type} is not allowed here (V2_ALLOWED_NODE_CLASSES)")
            continue
        if known and all(class_type not in b.node_classes for b in known):
            refuse(node_id, "class_type", "unknown_node_class", f"no backend has the node class {class_type}")
            continue
        copied = dict(inputs)
        for name, value in inputs.items():
            reference = _asset_reference(value)
            if reference is not None:
                asset_id = reference.get("id")
                path = None
                if isinstance(asset_id, str):
                    asset = assets.get(asset_id)
                    path = assets.path(asset) if asset is not None else outputs(asset_id)
                if path is None:
                    raise V2Refused("missing_asset", f"node {node_id} input '{name}': asset {str(asset_id)[:80]!r} "
                                                     "does not exist (upload it first)",
                                    details={"node_id": node_id, "field": name, "asset_id": asset_id})
                files[f"{node_id}/{name}"] = path
                copied[name] = path.name   # replaced by the file's name on the backend that runs it
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                if value[0] not in workflow:
                    refuse(node_id, name, "invalid_link", f"input '{name}' links to node {value[0]}, which is not in the graph")
        spec = _described(backends, class_type)
        required = spec.get("input", {}).get("required", {}) if spec else {}
        for name in required if isinstance(required, dict) else ():
            if name not in inputs:
                refuse(node_id, name, "missing_input", f"required input '{name}' is missing")
        graph[node_id] = {**node, "inputs": copied}

    if errors:
        first_node, first = next(iter(errors.items()))
        shown = dict(list(errors.items())[:MAX_NODES_REPORTED])
        label = workflow[first_node].get("class_type") if isinstance(workflow.get(first_node), dict) else None
        raise V2Refused("invalid_workflow", f"node {first_node}" + (f" ({label})" if isinstance(label, str) else "")
                        + f": {first[0]['message']}", details={"node_errors": shown})
    job_id = uuid.uuid4().hex
    return Job(client_id=client_id_of(job_id), alias="v2", graph=graph, files=files,
               class_types=frozenset(node["class_type"] for node in graph.values()), id=job_id,
               v2={"metadata": metadata, "workflow": workflow, "started": None,
                   "canceled": False, "hashes": None})
