"""Fake model files and a GPU's memory of them.

The simulator has no weights: a model folder is a list of file names (`DEFAULT_MODEL_FILES`,
or `SimulatedComfy(model_files=...)` / `--model-files`), which the loader nodes offer as
their options and validate against, as ComfyUI does with `folder_paths.get_filename_list`.

`GpuMemory` is what loading costs: one simulated process keeps the last `sim.models_kept`
files it loaded (least recently used goes first). A loader node whose file is not among them
waits `sim.model_load_seconds` (not divided by `speed`: loading is disk-bound) and counts
one load; a file among them costs nothing and becomes the most recent. Files are named
"folder/name" ("checkpoints/v1-5-pruned-emaonly-fp16.safetensors"), so the same name in
two folders is two files.

How this meets ComfyUI's output cache (the simplest rule with warm = in this LRU): a cached
loader output is only reused while its files are still held; at a prompt's start the cached
outputs of loaders whose files were evicted or unloaded are dropped, so such a loader runs
again and pays its load inside its own execution. (Real ComfyUI keeps the cached model in
RAM and pays a RAM-to-VRAM move in the sampler instead.) A cached loader read by a node the
prompt runs refreshes its files' place in the LRU. Keep `models_kept` at least the number
of files one prompt uses, or a prompt evicts its own models.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

# Model folders the loader nodes read (ComfyUI's folder_paths names), with names used by
# workflows/*.json and a few more so a scheduler has several checkpoints to choose from.
DEFAULT_MODEL_FILES: dict[str, list[str]] = {
    "checkpoints": ["v1-5-pruned-emaonly-fp16.safetensors", "sd_xl_base_1.0.safetensors",
                    "dreamshaper_8.safetensors", "realisticVisionV60B1_v51VAE.safetensors"],
    "loras": ["add_detail.safetensors", "pixel-art-xl.safetensors", "film-grain.safetensors"],
    "vae": ["vae-ft-mse-840000-ema-pruned.safetensors", "sdxl_vae.safetensors"],
    "diffusion_models": ["flux1-dev.safetensors", "flux1-schnell.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
    "controlnet": ["control_v11p_sd15_canny.pth", "control_v11f1p_sd15_depth.pth"],
    "upscale_models": ["RealESRGAN_x4plus.pth", "4x-UltraSharp.pth"],
}


def checked_model_files(files) -> dict[str, list[str]]:
    """A copy of a {folder: [file names]} mapping, or ValueError naming what is wrong."""
    if not isinstance(files, dict):
        raise ValueError("model files must be an object {folder: [file names]}")
    out = {}
    for folder, names in files.items():
        if not isinstance(folder, str) or not folder or "/" in folder:
            raise ValueError(f"model folder {folder!r} must be a plain folder name")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"model folder {folder!r} must list file names (non-empty strings)")
        out[folder] = sorted(set(names))
    return out


class GpuMemory:
    """The model files one simulated process holds (LRU, at most `sim.models_kept`)."""

    def __init__(self, sim):
        self.sim = sim
        self._held: OrderedDict[str, None] = OrderedDict()   # oldest first

    @property
    def held(self) -> list[str]:
        """Files held now, least recently used first."""
        return list(self._held)

    def is_warm(self, file: str) -> bool:
        return file in self._held

    def touch(self, file: str) -> None:
        if file in self._held:
            self._held.move_to_end(file)

    async def use(self, file: str) -> bool:
        """Make `file` the most recent; True if it had to be loaded (after the load time)."""
        if file in self._held:
            self._held.move_to_end(file)
            return False
        seconds = self.sim.model_load_seconds
        if seconds > 0:
            await asyncio.sleep(seconds)
        await self.sim._gate()
        self._held[file] = None
        self.trim()
        return True

    def trim(self) -> None:
        """Evict the least recently used files beyond `sim.models_kept`."""
        while len(self._held) > max(0, self.sim.models_kept):
            self._held.popitem(last=False)

    def unload_all(self) -> None:
        """POST /free {"unload_models": true} (or free_memory): nothing stays on the GPU."""
        self._held.clear()
