"""Runs one queued prompt the way ComfyUI 0.3.64 does, emitting the same messages in the same order.

Per prompt (captures 03/04/05/06/07/10):
  execution_start, execution_cached, then for every node picked by the scheduler
  either (cached output node) `executed` with its old UI + progress_state(finished),
  or progress_state(running), executing, [progress_state + progress per tick],
  [executed if it has UI], progress_state(finished);
  then execution_success | execution_error | execution_interrupted.
The worker (server.py) then writes history, broadcasts status and sends `executing null`.

Caching is ComfyUI's "classic" cache: outputs are keyed by a signature of the node's
class, inputs and upstream signatures (plus IS_CHANGED, e.g. LoadImage's file hash), and
at the start of each prompt every entry not used by that prompt is dropped - so only
the previous prompt's nodes can be reused. Today's ComfyUI defaults to its RAM-pressure
cache instead, which keeps entries until memory runs short: the "current" profile keeps
the RAM_CACHE_ENTRIES most recently used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import traceback
import uuid

from . import protocol
from .nodes import NODE_CLASSES, Node
from .profiles import RAM_CACHE_ENTRIES

log = logging.getLogger("comfysim")


class InterruptProcessing(Exception):
    """The interrupt flag was seen (before a node or at a progress tick)."""


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError (fail_next_oom); reported under torch's name."""


OutOfMemoryError.__module__ = "torch"

OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 10.55 GiB\nRequested               : 3.00 GiB\n"
    "Device limit            : 11.99 GiB\nFree (according to CUDA): 0 bytes\n"
    "PyTorch limit (set by user-supplied memory fraction)\n                        : 17179869184.00 GiB"
)
OOM_TIPS = ("This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before "
            "you might have accidentally set the batch_size to a large number.")


def _full_type_name(cls) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], str) and isinstance(value[1], int))


def _format_value(x):
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


class ProgressState:
    """`progress_state` messages: every node touched so far in this prompt, in first-touch order."""

    def __init__(self, hub, prompt_id: str):
        self.hub, self.prompt_id, self.nodes = hub, prompt_id, {}

    def _entry(self, node_id, value, maximum, state):
        return {"value": value, "max": maximum, "state": state, "node_id": node_id,
                "prompt_id": self.prompt_id, "display_node_id": node_id,
                "parent_node_id": None, "real_node_id": node_id}

    def _send(self):
        self.hub.send("progress_state", {"prompt_id": self.prompt_id, "nodes": self.nodes}, self.hub.client_id)

    def start(self, node_id):
        self.nodes[node_id] = self._entry(node_id, 0.0, 1.0, "running")
        self._send()

    def update(self, node_id, value, maximum):
        self.nodes[node_id] = self._entry(node_id, value, maximum, "running")
        self._send()

    def finish(self, node_id):
        entry = self.nodes.get(node_id)
        maximum = entry["max"] if entry else 1  # cached nodes were never started: ints 1/1
        self.nodes[node_id] = self._entry(node_id, maximum, maximum, "finished")
        self._send()


class ExecutionList:
    """ComfyUI's scheduler: output nodes plus their *uncached* ancestors, run when unblocked.

    Among ready nodes it prefers an output node, then a node that unblocks an output
    node (one or two levels down), else the first added - which is why capture 07 ran
    10, 31, 20, 21, 30 rather than in id order.
    """

    def __init__(self, prompt: dict, is_cached):
        self.prompt, self.is_cached = prompt, is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def _is_output(self, node_id) -> bool:
        return NODE_CLASSES[self.prompt[node_id]["class_type"]].OUTPUT_NODE

    def add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            nid = stack.pop()
            if nid in self.pending:
                continue
            self.pending[nid], self.block_count[nid], self.blocking[nid] = True, 0, {}
            for value in self.prompt[nid]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], nid))
        for src, dst in links:
            if not self.is_cached(src):
                self.add_node(src)
                if dst not in self.blocking[src]:
                    self.blocking[src][dst] = True
                    self.block_count[dst] += 1

    def is_empty(self) -> bool:
        return not self.pending

    def next_node(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            return None  # dependency cycle
        for n in ready:
            if self._is_output(n):
                return n
        for n in ready:
            if any(self._is_output(b) for b in self.blocking[n]):
                return n
        for n in ready:
            if any(self._is_output(b1) for b in self.blocking[n] for b1 in self.blocking.get(b, {})):
                return n
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for dst in self.blocking.pop(node_id):
            self.block_count[dst] -= 1


class NodeContext:
    """What a node's `run()` may use: folders, the prompt, the executor, progress, binary sends."""

    def __init__(self, run: "PromptRun", node_id: str):
        self.run, self.node_id = run, node_id
        self.sim = run.executor.sim
        self.folders = run.executor.folders
        self.extra_data = run.extra_data
        self.sim_name = self.sim.name

    async def offload(self, fn, *args):
        return await self.run.executor.offload(fn, *args)

    def prompt_with_hashes(self) -> dict:
        return self.run.prompt_with_hashes()

    async def sleep_tick(self) -> None:
        await self.sim._sleep_tick()

    async def load_models(self, files) -> None:
        """A loader's files onto the GPU: the load time for each one it does not hold."""
        for file in files:
            if await self.run.executor.gpu.use(file):
                self.run.models_loaded.append(file)
                self.sim.model_loads += 1

    async def progress(self, value, total, preview_png: bytes | None = None) -> None:
        """ComfyUI's progress hook: interrupt check, progress_state, [type 4], progress, [type 1]."""
        self.run.check_interrupt()
        hub, cid, pid = self.run.hub, self.run.hub.client_id, self.run.prompt_id
        self.run.progress.update(self.node_id, value, total)
        metadata = hub.supports_preview_metadata(cid)
        if preview_png is not None and cid is not None and metadata:
            hub.send_binary(protocol.preview_with_metadata_frame(preview_png, self.node_id, pid), cid)
        hub.send("progress", {"value": value, "max": total, "prompt_id": pid, "node": self.node_id}, cid)
        if preview_png is not None and not metadata:
            hub.send_binary(protocol.preview_frame(preview_png), cid)

    def send_progress_text(self, text: str) -> None:
        # ComfyUI sends these with sid=None: every connected client gets them.
        self.run.hub.send_binary(protocol.progress_text_frame(self.node_id, text), None)


class Executor:
    """Holds the node-output caches across prompts; `execute()` runs one queue item."""

    def __init__(self, sim, hub, folders, gpu):
        self.sim, self.hub, self.folders, self.gpu = sim, hub, folders, gpu
        self.outputs: dict[str, tuple] = {}   # signature -> node outputs
        self.ui: dict[str, dict] = {}         # signature -> {"meta", "output"}
        self.last_models_loaded: tuple[str, ...] = ()   # files the last run loaded

    def reset(self) -> None:
        """POST /free {"free_memory": true}: forget every cached output."""
        self.outputs.clear()
        self.ui.clear()

    def prune(self, used: set[str]) -> None:
        """At the start of a prompt: what the cache policy of the profile lets go."""
        if self.sim.spec.cache == "classic":
            for cache in (self.outputs, self.ui):
                for key in [k for k in cache if k not in used]:
                    del cache[key]
            return
        for key in used:  # most recently used last
            if key in self.outputs:
                self.outputs[key] = self.outputs.pop(key)
        while len(self.outputs) > RAM_CACHE_ENTRIES:
            oldest = next(iter(self.outputs))
            del self.outputs[oldest]
            self.ui.pop(oldest, None)

    async def offload(self, fn, *args):
        return await self.sim._offload(fn, *args)

    async def execute(self, item: list):
        run = PromptRun(self, item)
        try:
            await run.execute()
        finally:
            self.last_models_loaded = tuple(run.models_loaded)
        return run.success, run.messages, run.history_result()


class PromptRun:
    """One execution of one prompt."""

    def __init__(self, executor: Executor, item: list):
        self.executor, self.hub, self.sim = executor, executor.hub, executor.sim
        _, self.prompt_id, self.prompt, extra_data, self.outputs_to_execute, sensitive = item
        # the keys split off at submission go back in for the nodes (never into history)
        self.extra_data = {**extra_data, **sensitive} if sensitive else extra_data
        self.record = None  # set by the simulator when the first node runs
        self.ui_nodes: set[str] = set()  # nodes whose UI output this run reported (run or cached)
        self.messages: list = []
        self.executed: list[str] = []
        self.signatures: dict[str, str] = {}
        self.is_changed: dict[str, object] = {}
        self.success = True
        self.progress = ProgressState(self.hub, self.prompt_id)
        self.models_loaded: list[str] = []   # model files this run loaded, in order

    # -- messages ---------------------------------------------------------------------------
    def add_message(self, event: str, data: dict, broadcast: bool) -> None:
        if event in self.hub.absent:
            return  # an event this version does not know: neither sent nor kept in history
        data = {**data, "timestamp": protocol.now_ms()}
        self.messages.append([event, data])
        if self.hub.client_id is not None or broadcast:
            self.hub.send(event, data, self.hub.client_id)

    def check_interrupt(self) -> None:
        if self.sim._interrupt_flag:
            self.sim._interrupt_flag = False
            raise InterruptProcessing()

    # -- cache keys -------------------------------------------------------------------------
    async def _compute_signatures(self) -> None:
        for node_id, node in self.prompt.items():
            cls = NODE_CLASSES[node["class_type"]]
            if cls.is_changed.__func__ is not Node.is_changed.__func__:
                try:
                    self.is_changed[node_id] = await self.executor.offload(
                        cls.is_changed, self.executor.folders, node["inputs"])
                except Exception:
                    self.is_changed[node_id] = uuid.uuid4().hex  # like ComfyUI's NaN: never equal
        for node_id in self.prompt:
            self._signature(node_id, set())

    def _signature(self, node_id: str, visiting: set) -> str:
        if node_id in self.signatures:
            return self.signatures[node_id]
        if node_id in visiting:
            return uuid.uuid4().hex  # a cycle never matches anything
        visiting.add(node_id)
        node = self.prompt[node_id]
        cls = NODE_CLASSES[node["class_type"]]
        parts = [node["class_type"], repr(self.is_changed.get(node_id))]
        if cls.UNIQUE_ID:
            parts.append(node_id)
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value) and value[0] in self.prompt:
                parts.append([name, "link", self._signature(value[0], visiting), value[1]])
            else:
                parts.append([name, json.dumps(value, sort_keys=True, default=str)])
        sig = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        self.signatures[node_id] = sig
        return sig

    def _cached(self, node_id: str) -> bool:
        return self.signatures.get(node_id) in self.executor.outputs

    def _loader_files(self, node_id: str) -> list[str]:
        node = self.prompt[node_id]
        return NODE_CLASSES[node["class_type"]].model_files(node["inputs"])

    def _forget_cold_loaders(self) -> None:
        """Warm = on the GPU: a cached loader whose files were evicted or unloaded runs again
        (and pays its load), instead of handing on a model the GPU no longer holds."""
        gpu = self.executor.gpu
        for node_id in self.prompt:
            if self._cached(node_id) and not all(gpu.is_warm(f) for f in self._loader_files(node_id)):
                sig = self.signatures[node_id]
                self.executor.outputs.pop(sig, None)
                self.executor.ui.pop(sig, None)

    def _touch_cached_loaders(self, running) -> None:
        """Cached loaders read by the nodes this prompt runs use their files: most recent now."""
        for node_id in running:
            for value in self.prompt[node_id]["inputs"].values():
                if is_link(value) and value[0] in self.prompt and self._cached(value[0]):
                    for file in self._loader_files(value[0]):
                        self.executor.gpu.touch(file)

    def prompt_with_hashes(self) -> dict:
        """The prompt as embedded in PNGs: LoadImage nodes carry their IS_CHANGED value."""
        out = {}
        for node_id, node in self.prompt.items():
            node = dict(node)
            if node_id in self.is_changed and node["class_type"] == "LoadImage":
                node["is_changed"] = [self.is_changed[node_id]]
            out[node_id] = node
        return out

    # -- the run ----------------------------------------------------------------------------
    async def execute(self) -> None:
        self.sim._interrupt_flag = False  # ComfyUI clears it when a prompt starts
        self.hub.client_id = self.extra_data.get("client_id") if isinstance(self.extra_data, dict) else None
        self.add_message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        await self._compute_signatures()
        self.executor.prune(set(self.signatures.values()))
        self._forget_cold_loaders()
        cached = [n for n in self.prompt if self._cached(n)]
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, broadcast=False)

        current_outputs = list(self.prompt)
        elist = ExecutionList(self.prompt, self._cached)
        for node_id in self.outputs_to_execute:
            elist.add_node(node_id)
        self._touch_cached_loaders(elist.pending)
        while not elist.is_empty():
            node_id = elist.next_node()
            if node_id is None:
                node_id = next(iter(elist.pending))
                self._report_failure(current_outputs, {
                    "node_id": node_id, "exception_message": "Dependency cycle detected",
                    "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}, None)
                break
            error, ex = await self._execute_node(node_id)
            if error is not None:
                self._report_failure(current_outputs, error, ex)
                break
            elist.complete(node_id)
        else:
            self.add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)
        self.hub.last_node_id = None

    def _report_failure(self, current_outputs, error, ex) -> None:
        self.success = False
        node_id = error["node_id"]
        base = {"prompt_id": self.prompt_id, "node_id": node_id,
                "node_type": self.prompt[node_id]["class_type"], "executed": list(self.executed)}
        if isinstance(ex, InterruptProcessing):
            self.add_message("execution_interrupted", base, broadcast=True)
        else:
            self.add_message("execution_error", {
                **base, "exception_message": error["exception_message"],
                "exception_type": error["exception_type"], "traceback": error["traceback"],
                "current_inputs": error["current_inputs"], "current_outputs": list(current_outputs)},
                broadcast=False)

    def _inputs_for(self, node_id: str) -> dict:
        node = self.prompt[node_id]
        cls = NODE_CLASSES[node["class_type"]]
        declared = cls.input_types(self.executor.folders)
        values = {}
        for category in ("required", "optional"):
            for name in declared.get(category, {}):
                if name not in node["inputs"]:
                    continue
                value = node["inputs"][name]
                if is_link(value):
                    value = self.executor.outputs[self.signatures[value[0]]][value[1]]
                values[name] = value
        return values

    async def _execute_node(self, node_id: str):
        """Returns (None, None) on success, else (error details, exception)."""
        hub, sig = self.hub, self.signatures[node_id]
        cls = NODE_CLASSES[self.prompt[node_id]["class_type"]]
        if sig in self.executor.outputs:
            # A cached output node is not run again; its old UI output is re-reported.
            if sig in self.executor.ui:
                self.ui_nodes.add(node_id)
            if hub.client_id is not None:
                ui = self.executor.ui.get(sig)
                hub.send("executed", {"node": node_id, "display_node": node_id,
                                      "output": ui["output"] if ui else None, "prompt_id": self.prompt_id},
                         hub.client_id)
            self.progress.finish(node_id)
            return None, None

        inputs = None
        try:
            self.progress.start(node_id)
            inputs = self._inputs_for(node_id)
            if hub.client_id is not None:
                hub.last_node_id = node_id
                hub.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id},
                         hub.client_id)
            await self.sim._gate()
            self.check_interrupt()
            self.sim._node_started(self, node_id)
            if self.sim._take_oom():
                raise OutOfMemoryError(OOM_MESSAGE)
            outputs, ui = await cls().run(NodeContext(self, node_id), **inputs)
            if ui:
                meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                self.executor.ui[sig] = {"meta": meta, "output": ui}
                self.ui_nodes.add(node_id)
                if hub.client_id is not None:
                    hub.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                          "prompt_id": self.prompt_id}, hub.client_id)
            self.executor.outputs[sig] = outputs
        except InterruptProcessing as ex:
            return {"node_id": node_id}, ex
        except Exception as ex:
            tb = sys.exc_info()[2]
            log.info("node %s (%s) failed: %s", node_id, cls.__name__, ex)
            tips = OOM_TIPS if isinstance(ex, OutOfMemoryError) else ""
            current = {name: [_format_value(v)] for name, v in (inputs or {}).items()}
            return {"node_id": node_id, "exception_message": f"{ex}\n{tips}",
                    "exception_type": _full_type_name(type(ex)), "traceback": traceback.format_tb(tb),
                    "current_inputs": current}, ex
        self.progress.finish(node_id)
        self.executed.append(node_id)
        return None, None

    def history_result(self) -> dict:
        outputs, meta = {}, {}
        for node_id in self.prompt:
            entry = self.executor.ui.get(self.signatures.get(node_id)) if node_id in self.ui_nodes else None
            if entry is not None:
                outputs[node_id] = entry["output"]
                meta[node_id] = entry["meta"]
        return {"outputs": outputs, "meta": meta}
