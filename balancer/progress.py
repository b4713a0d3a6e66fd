"""Progress of one prompt as a percent of the whole graph, from ComfyUI's websocket events.

Every node that will run counts as one unit; a node that reports `progress` ticks (a sampler,
an upscaler) contributes its fraction while it runs. Cached nodes count as done at once. The
percent never goes down and stays below 100 until the job's results are stored.
"""
from __future__ import annotations


def is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def nodes_to_run(graph: dict, output_classes: frozenset[str] = frozenset()) -> set[str]:
    """Output nodes and everything upstream of them (ComfyUI ignores the rest)."""
    linked = {value[0] for node in graph.values() for value in node.get("inputs", {}).values()
              if is_link(value)}
    outputs = [nid for nid, node in graph.items() if node.get("class_type") in output_classes]
    if not outputs:  # classes unknown (no object_info yet): graph sinks are the outputs
        outputs = [nid for nid in graph if nid not in linked]
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in graph:
            continue
        seen.add(nid)
        stack.extend(v[0] for v in graph[nid].get("inputs", {}).values() if is_link(v))
    return seen


def format_percent(value: float) -> str:
    return f"{value:.2f}%"


class ProgressTracker:
    CEILING = 99.99  # 100.00% is said only once the results are stored

    def __init__(self, graph: dict, output_classes: frozenset[str] = frozenset()):
        self.nodes = nodes_to_run(graph, output_classes)
        self.done: set[str] = set()
        self.fractions: dict[str, float] = {}
        self.percent = 0.0

    def on_event(self, kind: str, data: dict) -> bool:
        """Feed one backend event; True when the percent moved."""
        if kind == "execution_cached":
            self.done.update(n for n in data.get("nodes") or () if n in self.nodes)
        elif kind == "executing":
            node = data.get("node")
            # A new node starting means every other node that was running is finished
            # (its own `progress_state` may already have announced it as running).
            self.done.update(n for n in self.fractions if n != node)
            self.fractions = {n: f for n, f in self.fractions.items() if n == node}
            if node in self.nodes:
                self.fractions.setdefault(node, 0.0)
        elif kind == "progress":
            node, value, maximum = data.get("node"), data.get("value"), data.get("max")
            if node in self.nodes and _number(value) and _number(maximum) and maximum > 0:
                self.fractions[node] = max(0.0, min(1.0, value / maximum))
        elif kind == "progress_state":
            for node, state in (data.get("nodes") or {}).items():
                if node not in self.nodes or not isinstance(state, dict):
                    continue
                if state.get("state") == "finished":
                    self.done.add(node)
                    self.fractions.pop(node, None)
                elif _number(state.get("value")) and _number(state.get("max")) and state["max"] > 0:
                    self.fractions[node] = max(0.0, min(1.0, state["value"] / state["max"]))
        elif kind == "executed":
            node = data.get("node")
            if node in self.nodes:
                self.done.add(node)
                self.fractions.pop(node, None)
        else:
            return False
        return self._update()

    def _update(self) -> bool:
        total = len(self.nodes) or 1
        running = sum(f for n, f in self.fractions.items() if n not in self.done)
        value = min(self.CEILING, 100.0 * (len(self.done) + running) / total)
        if value > self.percent:
            self.percent = value
            return True
        return False


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
