"""From a client's request to a job ready to queue: the workflow, its inputs, its files and
where it can run. Refuses (`errors.Refused`) what could never run, including a value outside
the limits the backends' /object_info gives its input (what `describe` shows for a form)."""
from __future__ import annotations

import os
from pathlib import Path

from storage.catalog import CatalogError
from .comfy.answers import input_limits, input_spec
from .errors import FileNotUploaded, Refused
from .jobs import Job
from .scheduler import can_run

MAX_CHOICES_SHOWN = 10  # in a refusal; /workflow-info lists them all


class JobIntake:
    def __init__(self, catalog, uploads, workflow_dir: Path):
        self.catalog = catalog          # storage.catalog.WorkflowCatalog
        self.uploads = uploads          # storage.uploads.UploadStore
        self.workflow_dir = Path(workflow_dir)

    def build(self, client_id: str, alias: str, values: dict, backends) -> Job:
        try:
            workflow = self.catalog.get(alias)
            graph, file_values = workflow.build_prompt(values)
        except CatalogError as exc:
            raise Refused(str(exc)) from None
        _check_limits(workflow, graph, values, backends)
        files = self._resolve_files(workflow, file_values)
        job = Job(client_id=client_id, alias=alias, graph=graph, files=files,
                  class_types=workflow.class_types,
                  allowed_backends=tuple(workflow.backends) if workflow.backends else None)
        self._check_runnable(workflow, job, backends)
        for path in files.values():
            if path.parent == self.uploads.directory:
                _touch(path)  # UPLOAD_TTL counts from the last use
        return job

    @staticmethod
    def describe(workflow, backends) -> dict:
        """The /workflow-info body: the specification's keys for each input, then what a form
        needs beside them: its limits from the backends and the alias entry's description."""
        info = workflow.info()
        for key, limits in _limits(workflow, backends).items():
            for name, value in limits.items():
                info[key].setdefault(name, value)
        if workflow.description:
            for entry in info.values():
                entry.setdefault("workflow_description", workflow.description)
        return info

    def _resolve_files(self, workflow, file_values: dict[str, str]) -> dict[str, Path]:
        """Map each file input to the local file the backend must receive before the prompt."""
        files: dict[str, Path] = {}
        for key, exposed in workflow.inputs.items():
            if not exposed.is_file:
                continue
            value = file_values.get(key, exposed.default)
            if key in file_values and value != exposed.default:
                if not isinstance(value, str) or not self.uploads.exists(value):
                    raise FileNotUploaded(key, _clip(value))
                files[key] = self.uploads.path(value)
                continue
            # The workflow's own default: shipped beside the workflows, or already on the backend.
            asset = _asset_path(self.workflow_dir, value)
            if asset is not None:
                files[key] = asset
        return files

    @staticmethod
    def _check_runnable(workflow, job: Job, backends) -> None:
        """Refused when every backend whose node classes are known lacks one the workflow needs."""
        if workflow.backends is None:
            candidates = backends  # not copied: the first able backend usually answers (300 may be configured)
        else:
            candidates = [b for b in backends if b.address in workflow.backends]
            if not candidates:
                raise Refused(f"workflow '{workflow.alias}' names backends that are not configured: "
                              + ", ".join(workflow.backends))
        if not candidates or any(not b.node_classes or can_run(job, b) for b in candidates):
            return  # some backend can run it, or is not known yet: let it queue
        missing = sorted(workflow.class_types - candidates[-1].node_classes)
        raise Refused(f"workflow '{workflow.alias}' needs node class {', '.join(missing)}, which no backend has")


def _limits(workflow, backends) -> dict[str, dict]:
    """Exposed input -> its limits (`answers.input_limits`) as the first backend that is up,
    may run the workflow and knows the node's class describes them (the bridge is normally in
    front of identical servers). File inputs have none: the bridge places their files itself."""
    def sources():  # lazily: the first backend up usually describes every node (300 may be configured)
        return (getattr(b, "object_info", None) for b in backends
                if b.up and (workflow.backends is None or b.address in workflow.backends))
    found: dict[str, dict] = {}
    for key, exposed in workflow.inputs.items():
        if exposed.is_file:
            continue
        info = next((i for i in sources() if isinstance(i, dict) and exposed.class_type in i), None)
        limits = input_limits(input_spec(info, exposed.class_type, exposed.name)) if info else {}
        if exposed.type not in ("int", "float"):  # e.g. a number written as a string in the file
            limits = {k: v for k, v in limits.items() if k == "choices"}
        if limits:
            found[key] = limits
    return found


def _check_limits(workflow, graph: dict, values: dict, backends) -> None:
    """Refused for a value the backend would refuse at validation, naming the input and the
    limit; nothing is refused while no backend has described the node's class."""
    limits = _limits(workflow, backends)
    for key in values:
        if key not in limits:
            continue
        exposed = workflow.inputs[key]
        value, limit = graph[exposed.node_id]["inputs"][exposed.name], limits[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "min" in limit and value < limit["min"]:
                raise Refused(f"input '{key}': {value} is below its minimum {limit['min']}")
            if "max" in limit and value > limit["max"]:
                raise Refused(f"input '{key}': {value} is above its maximum {limit['max']}")
        choices = limit.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join(_clip(c, 40) for c in choices[:MAX_CHOICES_SHOWN])
            more = f" and {len(choices) - MAX_CHOICES_SHOWN} more" if len(choices) > MAX_CHOICES_SHOWN else ""
            raise Refused(f"input '{key}': '{_clip(value)}' is not one of its choices: {shown}{more}"
                          " (GET /workflow-info lists them)")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _asset_path(workflow_dir: Path, name) -> Path | None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = workflow_dir / name
    return path if path.is_file() else None


def _clip(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
