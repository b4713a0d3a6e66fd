"""The workflow catalog: aliases, exposed inputs, and prompts built from them.

An administrator keeps ComfyUI workflows (API format) in ``WORKFLOW_DIR`` and an
alias file (``WORKFLOW_ALIAS``, JSON) that names them. An alias entry is either a
file name or an object::

    {"text-to-image": "t2i.json",
     "invert": {"file": "invert.json", "inputs": ["1/image"],
                "description": "...", "backends": ["127.0.0.1:8188"]}}

Which inputs a client may set ("exposed" inputs, keyed ``"<node id>/<input>"``):
the entry's ``inputs`` list; else each node's ``_meta.apiinput`` (comma-separated
input names, as written by the original project's patched editor); else every
literal input of every node, with a warning.

The catalog notices edits without a restart: on access, at most once per
``check_interval`` seconds, it stats the alias file and every workflow file it
names and reloads only what changed. One broken workflow does not hide the others.
A file that breaks during a live edit (half saved, invalid, gone) keeps its last good
version serving: a workflow file its workflow, the alias file its alias table;
``broken()`` names each such file, since when and why, until it is fixed. At start-up
there is no last good version: such an alias is unavailable and ``get()`` and
``load_errors()`` say why.

Nothing here knows about HTTP. ``CatalogError`` messages are written for the
client (they name the field and value) and never carry server paths.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("bridge.catalog")

# Longest string a client may put in a str input (a prompt text is far shorter).
MAX_STR_LEN = 100_000
# ComfyUI's widest INT inputs (seeds) take any unsigned 64-bit value; nothing takes more.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1

# (class_type, input name) pairs whose value names a file in ComfyUI's input
# folder, i.e. something the client uploads through the bridge first. Kept short
# and explicit: guessing from input names ("image" is also a link name) would be
# wrong more often than right. Loaders that take a server filesystem path
# (VHS_LoadImagePath, VHS_LoadVideoPath) are deliberately absent: their value is
# not an uploaded file name.
FILE_INPUTS = frozenset({
    ("LoadImage", "image"),
    ("LoadImageMask", "image"),
    ("LoadImageOutput", "image"),
    ("LoadVideo", "file"),
    ("LoadAudio", "audio"),
    ("VHS_LoadVideo", "video"),
    ("VHS_LoadAudioUpload", "audio"),
})

_ENTRY_KEYS = ("file", "inputs", "description", "backends")

# Clocks: the check interval's, and the wall clock of "broken since"; module attributes so
# tests can move time.
_now = time.monotonic
_wall = time.time


class CatalogError(ValueError):
    """Message is safe and meant for the client (names the field/value)."""


class _LoadError(Exception):
    """Why one alias (or the alias file) could not be loaded; for admins and clients."""


def _json_type(value: Any) -> str:
    """The name a client would recognise for a JSON value's type."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(text: str, limit: int = 80) -> str:
    """Client-supplied text echoed in an error, cut to a readable length."""
    return text if len(text) <= limit else text[:limit] + "..."


def _is_link(value: Any) -> bool:
    """A link in API format: ``[source_node_id, output_index]``."""
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], str) and isinstance(value[1], int)
            and not isinstance(value[1], bool))


def _literal_type(value: Any) -> str | None:
    """The exposed type of a default value, or None if it cannot be exposed."""
    # bool first: True is also an int in Python.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else None
    if isinstance(value, str):
        return "str"
    return None


@dataclass(frozen=True)
class ExposedInput:
    key: str            # "6/text"
    node_id: str
    name: str
    type: str           # "str" | "int" | "float" | "bool"
    title: str          # node _meta.title, else class_type
    class_type: str
    default: object     # value in the workflow file
    is_file: bool       # names an uploaded file (see FILE_INPUTS)

    def info(self) -> dict:
        out = {"type": self.type, "title": self.title,
               "class": self.class_type, "default": self.default}
        if self.is_file:
            out["upload"] = True
        return out

    def check(self, value: Any) -> Any:
        """The value to put in the prompt, or CatalogError naming this input."""
        got = _json_type(value)
        if self.type == "bool":
            if isinstance(value, bool):
                return value
        elif self.type == "int":
            if got == "int":
                if not INT_MIN <= value <= INT_MAX:
                    raise CatalogError(f"input '{self.key}' is out of range: {_short(str(value), 40)}; "
                                       f"an int is between {INT_MIN} and {INT_MAX}")
                return value
        elif self.type == "float":
            if got in ("int", "float"):
                try:
                    number = float(value)
                except OverflowError:
                    raise CatalogError(f"input '{self.key}' is out of range") from None
                if not math.isfinite(number):
                    raise CatalogError(f"input '{self.key}' must be a finite number")
                return number
        elif self.type == "str":
            if got == "str":
                if len(value) > MAX_STR_LEN:
                    raise CatalogError(
                        f"input '{self.key}' is too long ({len(value)} characters; "
                        f"at most {MAX_STR_LEN})")
                if self.is_file and not value:
                    raise CatalogError(f"input '{self.key}' must name an uploaded file")
                return value
        raise CatalogError(f"input '{self.key}' must be {self.type}, got {got}")


@dataclass(frozen=True, eq=False)
class Workflow:
    """An immutable snapshot of one alias. Do not mutate ``graph``; use build_prompt."""
    alias: str
    file: str                        # path relative to the workflow dir
    description: str
    graph: dict                      # API-format workflow as loaded
    inputs: dict[str, ExposedInput]  # in exposure order
    backends: list[str] | None       # addresses allowed to run it; None = any
    class_types: frozenset[str] = field(default=frozenset())

    def info(self) -> dict:
        """The /workflow-info body."""
        return {key: inp.info() for key, inp in self.inputs.items()}

    def build_prompt(self, values: dict) -> tuple[dict, dict[str, str]]:
        """Apply client values to a copy of the graph.

        ``values`` is the request body without "workflow". Returns the prompt and
        ``{key: file name}`` for each file input the client set. Inputs not given
        keep their defaults.
        """
        if not isinstance(values, dict):
            raise CatalogError("request body must be a JSON object")
        checked: dict[str, Any] = {}
        files: dict[str, str] = {}
        for key, value in values.items():
            inp = self.inputs.get(key)
            if inp is None:
                allowed = ", ".join(self.inputs) or "(none)"
                raise CatalogError(
                    f"unknown input '{_short(str(key))}' for workflow '{self.alias}'; "
                    f"allowed: {allowed}")
            checked[key] = inp.check(value)
            if inp.is_file:
                files[key] = checked[key]
        prompt = copy.deepcopy(self.graph)
        for key, value in checked.items():
            inp = self.inputs[key]
            prompt[inp.node_id]["inputs"][inp.name] = value
        return prompt, files


# ---------------------------------------------------------------------------
# Loading


def _parse_json(raw: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")
    try:
        # utf-8-sig: some editors start a UTF-8 file with a byte order mark.
        return json.loads(raw.decode("utf-8-sig"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise _LoadError("not UTF-8 text") from None
    except ValueError as exc:  # JSONDecodeError says line and column
        raise _LoadError(f"invalid JSON: {exc}") from None


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is edited or replaced; None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class _Entry:
    """One alias-file entry, checked for shape (not yet loaded)."""
    file: str
    inputs: tuple[str, ...] | None
    description: str
    backends: tuple[str, ...] | None


def _parse_entry(raw: Any) -> _Entry:
    if isinstance(raw, str):
        raw = {"file": raw}
    if not isinstance(raw, dict):
        raise _LoadError("alias entry must be a file name or an object with \"file\"")
    # Keys starting with "_" are comments.
    unknown = [k for k in raw if k not in _ENTRY_KEYS and not k.startswith("_")]
    if unknown:
        raise _LoadError(f"unknown key '{unknown[0]}' in alias entry; "
                         f"allowed: {', '.join(_ENTRY_KEYS)}")
    file = raw.get("file")
    if not isinstance(file, str) or not file.strip():
        raise _LoadError("alias entry needs \"file\": the workflow's file name")
    inputs = raw.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise _LoadError("\"inputs\" must be a list of \"<node id>/<input>\" strings")
        inputs = tuple(dict.fromkeys(inputs))  # drop repeats, keep order
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _LoadError("\"description\" must be a string")
    backends = raw.get("backends")
    if backends is not None:
        if (not isinstance(backends, list)
                or not all(isinstance(b, str) and b.strip() for b in backends)):
            raise _LoadError("\"backends\" must be a list of backend addresses")
        backends = tuple(b.strip() for b in backends)
    return _Entry(file=file.strip(), inputs=inputs, description=description,
                  backends=backends)


def _resolve_inside(root: Path, name: str) -> Path:
    """The workflow file's path; refuses anything that leaves the workflow dir."""
    rel = PurePosixPath(name.replace("\\", "/"))
    # Clients read this reason too (GET /workflow-info): a server path is not repeated to them.
    shown = "(an absolute path)" if rel.is_absolute() else f"'{name}'"
    if rel.is_absolute() or ".." in rel.parts:
        raise _LoadError(f"workflow file {shown} must be a path inside the workflow directory")
    path = root / rel
    # Also refuse a symlink that points out of the directory.
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:  # also a NUL byte in the name
        raise _LoadError(
            f"workflow file {shown} must be a path inside the workflow directory") from None
    return path


def _check_graph(graph: Any, name: str) -> None:
    if isinstance(graph, dict) and ("nodes" in graph or "links" in graph):
        raise _LoadError(
            f"'{name}' is a ComfyUI UI-format workflow (it has \"nodes\"/\"links\"); "
            "the bridge needs API format: open it in ComfyUI and export it with "
            "\"Save (API Format)\" (newer menus: Workflow > Export (API))")
    if not isinstance(graph, dict) or not graph:
        raise _LoadError(f"'{name}' is not an API-format workflow (expected an object of nodes)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise _LoadError(
                f"node '{_short(node_id)}' in '{name}' has no class_type; the bridge needs "
                "API format: export the workflow with \"Save (API Format)\" in ComfyUI")
        if not isinstance(node.get("inputs", {}), dict):
            raise _LoadError(f"node '{node_id}' in '{name}' has \"inputs\" that are not an object")
        meta = node.get("_meta", {})
        if not isinstance(meta, dict):
            raise _LoadError(f"node '{node_id}' in '{name}' has \"_meta\" that is not an object")


def _title(node: dict) -> str:
    title = node.get("_meta", {}).get("title")
    return title if isinstance(title, str) and title.strip() else node["class_type"]


def _expose(graph: dict, node_id: str, name: str) -> ExposedInput:
    """One exposed input; _LoadError naming it if it cannot be exposed."""
    key = f"{node_id}/{name}"
    node = graph.get(node_id)
    if node is None:
        raise _LoadError(f"exposed input '{key}' not found: there is no node '{node_id}'")
    inputs = node.get("inputs", {})
    if name not in inputs:
        raise _LoadError(f"exposed input '{key}' not found: node {node_id} "
                         f"({node['class_type']}) has no input '{name}'")
    value = inputs[name]
    if _is_link(value):
        raise _LoadError(f"exposed input '{key}' is a link from node {value[0]}, not a value")
    kind = _literal_type(value)
    if kind is None:
        raise _LoadError(f"exposed input '{key}' cannot be exposed: its value is a "
                         f"{_json_type(value)}, only str, int, float and bool are")
    return ExposedInput(
        key=key, node_id=node_id, name=name, type=kind, title=_title(node),
        class_type=node["class_type"], default=value,
        is_file=(node["class_type"], name) in FILE_INPUTS)


def _exposed_inputs(alias: str, entry: _Entry, graph: dict) -> dict[str, ExposedInput]:
    if entry.inputs is not None:
        found = {}
        for key in entry.inputs:
            node_id, sep, name = key.partition("/")
            if not sep or not node_id or not name:
                raise _LoadError(f"exposed input '{key}' must look like \"<node id>/<input>\"")
            found[key] = _expose(graph, node_id, name)
        return found

    found = {}
    for node_id, node in graph.items():
        names = node.get("_meta", {}).get("apiinput")
        if names is None:
            continue
        if not isinstance(names, str):
            raise _LoadError(f"_meta.apiinput of node '{node_id}' must be a "
                             "comma-separated string of input names")
        for name in (n.strip() for n in names.split(",")):
            if name:
                inp = _expose(graph, node_id, name)
                found[inp.key] = inp
    if found:
        return found

    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if not _is_link(value) and _literal_type(value) is not None:
                inp = _expose(graph, node_id, name)
                found[inp.key] = inp
    log.warning("workflow '%s' names no inputs; exposing all %d literal inputs. "
                "List the ones clients may set in its alias entry (\"inputs\")",
                alias, len(found))
    return found


def _load_workflow(alias: str, entry: _Entry, path: Path) -> Workflow:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _LoadError(f"workflow file '{entry.file}' not found") from None
    except OSError as exc:
        raise _LoadError(f"workflow file '{entry.file}' cannot be read: {exc.strerror}") from None
    try:
        graph = _parse_json(raw)
    except _LoadError as exc:
        raise _LoadError(f"workflow file '{entry.file}': {exc}") from None
    _check_graph(graph, entry.file)
    inputs = _exposed_inputs(alias, entry, graph)
    return Workflow(
        alias=alias, file=entry.file, description=entry.description, graph=graph,
        inputs=inputs,
        backends=list(entry.backends) if entry.backends is not None else None,
        class_types=frozenset(node["class_type"] for node in graph.values()))


@dataclass
class _Slot:
    """What the catalog knows about one alias."""
    entry: _Entry | None                      # as last read (None: the entry itself is bad)
    signature: tuple[int, int, int] | None    # of the workflow file as last read
    workflow: Workflow | None                 # what is served: this version or the last good one
    error: str | None = None                  # why the version last read did not load
    broken_file: str | None = None            # the file that error is blamed on
    since: float | None = None                # wall-clock time the file first failed


@dataclass(frozen=True)
class _Broken:
    error: str
    since: float


class WorkflowCatalog:
    def __init__(self, workflow_dir: Path, alias_file: Path, *, check_interval: float = 1.0):
        self.workflow_dir = Path(workflow_dir)
        self.alias_file = Path(alias_file)
        self.check_interval = check_interval
        self._alias_sig: tuple[int, int, int] | None | bool = False  # False: never read
        self._alias_broken: _Broken | None = None
        self._alias_loaded = False      # a good alias table was read at least once
        self._raw_entries: dict[str, Any] = {}
        self._slots: dict[str, _Slot] = {}
        self._last_check: float | None = None
        self._refresh()

    # -- public ------------------------------------------------------------

    def aliases(self) -> list[str]:
        """Loadable aliases, in alias-file order."""
        self._maybe_refresh()
        return [a for a, s in self._slots.items() if s.workflow is not None]

    def get(self, alias: str) -> Workflow:
        self._maybe_refresh()
        if not isinstance(alias, str):
            raise CatalogError("'workflow' must be a string naming a workflow alias")
        slot = self._slots.get(alias)
        if slot is None:
            available = ", ".join(self.aliases()) or "(none)"
            raise CatalogError(f"unknown workflow '{_short(alias)}'; available: {available}")
        if slot.workflow is None:
            raise CatalogError(f"workflow '{alias}' is unavailable: {slot.error}")
        return slot.workflow

    def load_errors(self) -> dict[str, str]:
        """alias -> why it is unavailable (an alias serving its last good version is not).
        If no alias table could ever be read, one entry keyed by the alias file's name."""
        self._maybe_refresh()
        if self._alias_broken is not None and not self._alias_loaded:
            return {self.alias_file.name: self._alias_broken.error}
        return {a: s.error for a, s in self._slots.items()
                if s.error is not None and s.workflow is None}

    def broken(self) -> list[dict]:
        """Files whose version on disk could not be loaded, for /status: ``{"file", "since",
        "error", "aliases"}`` (names relative to the workflow dir; ``since`` in Unix time).
        What such a file held before is still served; at start-up there was nothing before."""
        self._maybe_refresh()
        found: dict[str, dict] = {}
        if self._alias_broken is not None:
            found[self.alias_file.name] = {
                "file": self.alias_file.name, "since": round(self._alias_broken.since, 3),
                "error": self._alias_broken.error, "aliases": []}
        for alias, slot in self._slots.items():
            if slot.error is None:
                continue
            item = found.setdefault(slot.broken_file, {
                "file": slot.broken_file, "since": round(slot.since, 3), "error": slot.error,
                "aliases": []})
            item["since"] = min(item["since"], round(slot.since, 3))
            item["aliases"].append(alias)
        return list(found.values())

    # -- reloading ---------------------------------------------------------

    def _maybe_refresh(self) -> None:
        now = _now()
        if self._last_check is not None and now - self._last_check < self.check_interval:
            return
        self._refresh()

    def _refresh(self) -> None:
        self._last_check = _now()
        sig = _signature(self.alias_file)
        if sig != self._alias_sig:
            self._alias_sig = sig
            self._read_alias_file(sig)
        slots: dict[str, _Slot] = {}
        for alias, raw in self._raw_entries.items():
            slots[alias] = self._refresh_alias(alias, raw, self._slots.get(alias))
        for alias in self._slots.keys() - slots.keys():
            log.info("workflow '%s' removed", alias)
        self._slots = slots

    def _read_alias_file(self, sig: tuple[int, int, int] | None) -> None:
        name = self.alias_file.name
        entries: dict[str, Any] = {}
        error = None
        if sig is None:
            error = f"alias file '{name}' not found"
        else:
            try:
                data = _parse_json(self.alias_file.read_bytes())
            except OSError as exc:
                error = f"alias file '{name}' cannot be read: {exc.strerror}"
            except _LoadError as exc:
                error = f"alias file '{name}': {exc}"
            else:
                if isinstance(data, dict):
                    entries = data
                else:
                    error = (f"alias file '{name}' must be a JSON object mapping "
                             "aliases to workflow files")
        if error is None:
            if self._alias_broken is not None:
                log.info("alias file '%s' is fixed", name)
            log.info("alias file '%s' read: %d aliases", name, len(entries))
            self._alias_broken = None
            self._alias_loaded = True
            self._raw_entries = entries
            return
        # The last good table (if any) stays: a half-saved edit must not empty the catalog.
        if self._alias_loaded:
            log.error("%s; still serving its last good version (%d aliases) until it is fixed",
                      error, len(self._raw_entries))
        else:
            log.error("%s; serving no workflows until it is fixed", error)
        since = self._alias_broken.since if self._alias_broken is not None else _wall()
        self._alias_broken = _Broken(error=error, since=since)

    def _refresh_alias(self, alias: str, raw: Any, old: _Slot | None) -> _Slot:
        try:
            entry = _parse_entry(raw)
            path = _resolve_inside(self.workflow_dir, entry.file)
        except _LoadError as exc:
            return self._failed(alias, old, None, None, self.alias_file.name, str(exc))
        sig = _signature(path)
        if old is not None and old.entry == entry and old.signature == sig:
            return old
        try:
            workflow = _load_workflow(alias, entry, path)
        except _LoadError as exc:
            return self._failed(alias, old, entry, sig, entry.file, str(exc))
        if old is not None and old.error is not None:
            log.info("workflow '%s': '%s' is fixed", alias, old.broken_file)
        log.info("workflow '%s' loaded from '%s' (%d inputs: %s)", alias, entry.file,
                 len(workflow.inputs), ", ".join(workflow.inputs) or "none")
        return _Slot(entry=entry, signature=sig, workflow=workflow)

    @staticmethod
    def _failed(alias: str, old: _Slot | None, entry: _Entry | None,
                sig: tuple[int, int, int] | None, file: str, error: str) -> _Slot:
        """The alias's new version did not load: keep serving the last good one, if any."""
        kept = old.workflow if old is not None else None
        still = old is not None and old.error is not None and old.broken_file == file
        if not (still and old.error == error):
            if kept is not None:
                log.error("workflow '%s' not reloaded: %s; still serving its last good version",
                          alias, error)
            else:
                log.warning("workflow '%s' not loaded: %s", alias, error)
        return _Slot(entry=entry, signature=sig, workflow=kept, error=error, broken_file=file,
                     since=old.since if still else _wall())
