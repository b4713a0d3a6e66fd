"""From a client's request to a job ready to queue: the workflow, its inputs, its files and
where it can run. Refuses (`errors.Refused`) what could never run."""
from __future__ import annotations

import os
from pathlib import Path

from storage.catalog import CatalogError
from .errors import FileNotUploaded, Refused
from .jobs import Job
from .scheduler import can_run


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
        files = self._resolve_files(workflow, file_values)
        job = Job(client_id=client_id, alias=alias, graph=graph, files=files,
                  class_types=workflow.class_types,
                  allowed_backends=tuple(workflow.backends) if workflow.backends else None)
        self._check_runnable(workflow, job, backends)
        for path in files.values():
            if path.parent == self.uploads.directory:
                _touch(path)  # UPLOAD_TTL counts from the last use
        return job

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
        candidates = [b for b in backends if workflow.backends is None or b.address in workflow.backends]
        if workflow.backends is not None and not candidates:
            raise Refused(f"workflow '{workflow.alias}' names backends that are not configured: "
                          + ", ".join(workflow.backends))
        if not candidates or any(not b.node_classes or can_run(job, b) for b in candidates):
            return  # some backend can run it, or is not known yet: let it queue
        missing = sorted(workflow.class_types - candidates[-1].node_classes)
        raise Refused(f"workflow '{workflow.alias}' needs node class {', '.join(missing)}, which no backend has")


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
