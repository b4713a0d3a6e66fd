"""What the bridge believes about each backend's GPU, and how long a job will take there.

The bridge is normally a backend's only client, so the model files its recent jobs loaded
are what the GPU holds: up to MODELS_KEPT_PER_SERVER of them, the least recently used given up
first, as ComfyUI's model management does under memory pressure. After a /free, an out-of-memory
failure or a restart of the backend, it knows nothing. A job is warm on a backend when every
model file it loads is among them.

Run times are learned from what was observed, from the prompt's `execution_start` to its end
(time waiting in ComfyUI's own queue does not count), per backend, workflow and warm or cold.
Pure: no IOLoop, no I/O.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

# The files ComfyUI's loader nodes (checkpoint, LoRA, VAE, UNet, CLIP, ControlNet, upscale
# model...) are given: an input of a node whose class names a loader, ending like a model file.
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
SAMPLES_KEPT = 20           # recent run times kept per backend, workflow and warm/cold
DEFAULT_RUN_SECONDS = 1.0   # a guess for a workflow never seen anywhere: all backends alike


def models_of(graph: dict) -> frozenset[str]:
    """The model files a prompt makes ComfyUI load."""
    files = set()
    for node in graph.values():
        if not isinstance(node, dict) or "Loader" not in str(node.get("class_type", "")):
            continue
        inputs = node.get("inputs")
        for value in (inputs.values() if isinstance(inputs, dict) else ()):
            if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
                files.add(value)
    return frozenset(files)


class GpuBelief:
    """One backend's loaded model files (most recent last) and its observed run times."""

    def __init__(self, kept: int):
        self.kept = kept
        self._models: OrderedDict[str, None] = OrderedDict()
        self._runs: dict[tuple[str, bool], deque] = {}
        self._means: dict[tuple[str, bool], float] = {}   # of _runs, kept as they come (read per backend and job)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def holds(self, model: str) -> bool:
        return model in self._models

    def is_warm(self, models: frozenset[str]) -> bool:
        return all(m in self._models for m in models)

    def loaded(self, models: frozenset[str]) -> None:
        """A job using these files was sent here: by the time the next one runs, they are loaded."""
        for model in sorted(models):
            self._models[model] = None
            self._models.move_to_end(model)
        while len(self._models) > self.kept:
            self._models.popitem(last=False)

    def forget(self) -> None:
        """/free, out of memory, a restart: nothing is known to be loaded any more."""
        self._models.clear()

    def record(self, alias: str, warm: bool, seconds: float) -> None:
        samples = self._runs.setdefault((alias, warm), deque(maxlen=SAMPLES_KEPT))
        samples.append(seconds)
        self._means[(alias, warm)] = sum(samples) / len(samples)

    def samples(self, alias: str, warm: bool) -> deque | tuple:
        return self._runs.get((alias, warm), ())

    def mean(self, alias: str, warm: bool) -> float | None:
        return self._means.get((alias, warm))


@dataclass
class Estimator:
    """Expected run time of a job on a backend, from that backend's own observations first, then
    from the farm's (for a backend that never ran the workflow): memoised for one scheduling pass,
    over which observations do not change."""
    backends: list
    _farm: dict = field(default_factory=dict)

    def run_time(self, alias: str, backend, warm: bool) -> float:
        own = backend.gpu.mean(alias, warm)
        if own is not None:
            return own
        other = backend.gpu.mean(alias, not warm)
        if other is not None:  # the same backend's other kind, shifted by the farm's load cost
            return max(other + (-1 if warm else 1) * self._load_cost(alias), 0.0)
        farm = self._farm_mean(alias, warm)
        if farm is not None:
            return farm
        farm = self._farm_mean(alias, not warm)
        if farm is not None:
            return max(farm + (-1 if warm else 1) * self._load_cost(alias), 0.0)
        return DEFAULT_RUN_SECONDS

    def _farm_mean(self, alias: str, warm: bool) -> float | None:
        key = ("mean", alias, warm)
        if key not in self._farm:
            total = count = 0
            for backend in self.backends:
                samples = backend.gpu.samples(alias, warm)
                total += sum(samples)
                count += len(samples)
            self._farm[key] = total / count if count else None
        return self._farm[key]

    def _load_cost(self, alias: str) -> float:
        """Cold minus warm, over the backends that have seen both."""
        key = ("load", alias)
        if key not in self._farm:
            costs = [cold - warm for b in self.backends
                     if (cold := b.gpu.mean(alias, False)) is not None and (warm := b.gpu.mean(alias, True)) is not None]
            self._farm[key] = max(sum(costs) / len(costs), 0.0) if costs else 0.0
        return self._farm[key]
