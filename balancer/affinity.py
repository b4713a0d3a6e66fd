"""What the bridge believes about each backend's GPU, and how long a job will take there.

The bridge is normally a backend's only client, so the model files its recent jobs loaded
are what the GPU holds: up to MODELS_KEPT_PER_SERVER of them, the least recently used given up
first, as ComfyUI's model management does under memory pressure. After a /free, an out-of-memory
failure or a restart of the backend, it knows nothing. A job is warm on a backend when every
model file it loads is among them.

What a job costs is learned from what was observed, in two parts:
- loading: the time ComfyUI spent in each loader node that ran (a loader whose output ComfyUI
  had cached sends no `executing` and costs nothing), per model file;
- the rest of the run, from the prompt's `execution_start` to its end (time waiting in
  ComfyUI's own queue does not count), per backend, workflow and warm (no loader ran) or cold.
A cold job's expected time is the rest of its run plus the load of each of its files not held.
Pure: no IOLoop, no I/O.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

# The files ComfyUI's loader nodes (checkpoint, LoRA, VAE, UNet, CLIP, ControlNet, upscale
# model...) are given: an input of a node whose class names a loader, ending like a model file.
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
SAMPLES_KEPT = 20           # recent run times kept per backend, workflow and warm/cold
DEFAULT_RUN_SECONDS = 1.0   # a guess for a workflow never seen anywhere: all backends alike
# Before any load was seen anywhere, a load is taken to cost this many runs of the job: loading
# a checkpoint takes seconds where a run often takes less, and counting it as free would spread
# the first jobs' models over every backend.
UNSEEN_LOAD_RUNS = 4.0


def loader_nodes(graph: dict) -> dict[str, frozenset[str]]:
    """Node id -> the model files that node loads, for the prompt's loader nodes."""
    loaders = {}
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "Loader" not in str(node.get("class_type", "")):
            continue
        inputs = node.get("inputs")
        files = frozenset(value for value in (inputs.values() if isinstance(inputs, dict) else ())
                          if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS))
        if files:
            loaders[str(node_id)] = files
    return loaders


def models_of(graph: dict) -> frozenset[str]:
    """The model files a prompt makes ComfyUI load."""
    return frozenset().union(*loader_nodes(graph).values())


def held_after(held: Iterable[str], loads: Iterable[frozenset], kept: int) -> list[str]:
    """The files a GPU keeping the last `kept` holds, least recent first, once jobs loading each
    of `loads` in turn have run on it (holding `held` before)."""
    order = list(held)
    for models in loads:
        for model in sorted(models):
            if model in order:
                order.remove(model)
            order.append(model)
    return order[-kept:] if kept else []


class RecentMeans:
    """The last SAMPLES_KEPT values per key, and their mean, kept as values come (the means are
    read for every backend and job a scheduling pass compares)."""

    def __init__(self):
        self.samples: dict = {}
        self.means: dict = {}

    def add(self, key, value: float) -> None:
        samples = self.samples.setdefault(key, deque(maxlen=SAMPLES_KEPT))
        samples.append(value)
        self.means[key] = sum(samples) / len(samples)


class GpuBelief:
    """One backend's loaded model files (most recent last) and its observed run times."""

    def __init__(self, kept: int):
        self.kept = kept
        self._models: dict[str, None] = {}           # least recent first
        self._runs = RecentMeans()                    # (workflow, warm) -> its runs' seconds, loads left out
        self._recent: deque = deque(maxlen=SAMPLES_KEPT)   # its last runs, any workflow
        self.typical_run: float | None = None              # their median
        self._loads = RecentMeans()                   # model file -> seconds its loads took here
        self._load_mean_any: float | None = None      # the mean of those means

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def holds(self, model: str) -> bool:
        return model in self._models

    def loaded(self, models: frozenset[str]) -> None:
        """A job using these files was sent here: by the time the next one runs, they are loaded."""
        self._models = dict.fromkeys(held_after(self._models, [models], self.kept))

    def forget(self) -> None:
        """/free, out of memory, a restart: nothing is known to be loaded any more."""
        self._models.clear()

    def record(self, alias: str, warm: bool, seconds: float) -> None:
        self._runs.add((alias, warm), seconds)
        self._recent.append(seconds)
        ordered = sorted(self._recent)
        self.typical_run = ordered[len(ordered) // 2]

    def record_load(self, model: str, seconds: float) -> None:
        self._loads.add(model, seconds)
        means = self._loads.means
        self._load_mean_any = sum(means.values()) / len(means)

    def load_mean(self, model: str | None = None) -> float | None:
        """This backend's mean load of `model`, or of any file it loaded (None: not seen)."""
        if model is not None:
            return self._loads.means.get(model)
        return self._load_mean_any

    def samples(self, alias: str, warm: bool) -> deque | tuple:
        return self._runs.samples.get((alias, warm), ())

    def mean(self, alias: str, warm: bool) -> float | None:
        return self._runs.means.get((alias, warm))


@dataclass
class Estimator:
    """Expected run time of a job on a backend, from that backend's own observations first, then
    from the farm's (for a backend that never ran the workflow): memoised for one scheduling pass,
    over which observations do not change."""
    backends: list
    _farm: dict = field(default_factory=dict)

    def expected(self, backend, alias: str, cold: frozenset[str] = frozenset()) -> float:
        """Seconds a job of `alias` should take on `backend` once started, loading the files `cold`."""
        run = self.run_time(alias, backend, not cold)
        if not cold:
            return run
        loads = sum(self.load_time(backend, model) for model in cold)
        if self._farm_load(None) is None:
            loads = UNSEEN_LOAD_RUNS * run * len(cold)
        return run + loads

    def run_time(self, alias: str, backend, warm: bool) -> float:
        """The run without its loads: this backend's, else the farm's, warm or cold (the other
        kind when only that was seen), else a guess."""
        seconds = backend.gpu.mean(alias, warm)
        if seconds is None:
            seconds = backend.gpu.mean(alias, not warm)
        if seconds is None:
            seconds = self._farm_mean(alias, warm)
        if seconds is None:
            seconds = self._farm_mean(alias, not warm)
        return DEFAULT_RUN_SECONDS if seconds is None else seconds

    def load_time(self, backend, model: str) -> float:
        """Loading `model` there: its own loads of that file, else the farm's of that file, else
        its loads of any file, else the farm's; 0 while no load was ever seen."""
        seconds = backend.gpu.load_mean(model)
        if seconds is None:
            seconds = self._farm_load(model)
        if seconds is None:
            seconds = backend.gpu.load_mean()
        if seconds is None:
            seconds = self._farm_load(None)
        return 0.0 if seconds is None else seconds

    def _farm_load(self, model: str | None) -> float | None:
        key = ("load", model)
        if key not in self._farm:
            seen = [m for b in self.backends if (m := b.gpu.load_mean(model)) is not None]
            self._farm[key] = sum(seen) / len(seen) if seen else None
        return self._farm[key]

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
