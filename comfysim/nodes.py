"""The node classes the simulator can execute, with real Pillow image work.

A batch of images (ComfyUI's IMAGE tensor [B,H,W,C]) is a list of RGB PIL images; a
MASK is a list of "L" images. Each node declares its `/object_info` entry by name
(the entries in object_info.json are copied from a real ComfyUI 0.3.64), and
implements `run(ctx, **inputs) -> (outputs tuple, ui dict or None)`.

Models have no weights: a MODEL, CLIP, VAE, CONTROL_NET or UPSCALE_MODEL is a `Weights`
naming the files it is made of, CONDITIONING is (clip, text), a LATENT a `Latent`. Loader
nodes (`ModelLoader`) offer the simulator's fake model folders and pay their loads through
the GPU memory (models.py). KSampler spends `steps` ticks; VAEDecode draws a picture that
depends only on the size, the seed and what was sampled (model files, texts, settings).

Pillow work goes through `ctx.offload(...)` (a thread executor), never on the IOLoop.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import string
import time
from dataclasses import dataclass
from importlib import resources

from PIL import Image, ImageFilter, ImageOps, ImageSequence, PngImagePlugin

from . import files

OBJECT_INFO: dict = json.loads(resources.files(__package__).joinpath("object_info.json").read_text())


class ImageBatch(list):
    """A list of PIL images that prints like a shape, not like a list of objects."""

    def __repr__(self) -> str:
        if not self:
            return "IMAGE[]"
        w, h = self[0].size
        return f"IMAGE[{len(self)}, {h}, {w}, 3]"

    __str__ = __repr__


class Node:
    """Base class: metadata comes from the object_info entry named like the class."""

    #: input names that the node's own VALIDATE_INPUTS checks (skips min/max/combo checks)
    VALIDATES: tuple[str, ...] = ()
    #: a hidden UNIQUE_ID input makes the node id part of the cache key
    UNIQUE_ID = False
    #: loader nodes: input name -> the model folder its combo lists (see models.py)
    MODEL_INPUTS: dict[str, str] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__name__ not in OBJECT_INFO:
            return   # a shared base (ModelLoader), not a node
        cls.INFO = OBJECT_INFO[cls.__name__]
        cls.RETURN_TYPES = tuple(cls.INFO["output"])
        cls.OUTPUT_NODE = bool(cls.INFO["output_node"])

    @classmethod
    def input_types(cls, folders) -> dict:
        return cls.INFO["input"]

    @classmethod
    def validate(cls, folders, **inputs):
        return True

    @classmethod
    def model_files(cls, inputs) -> list[str]:
        """The model files ("folder/name") this node loads with these inputs."""
        return [f"{folder}/{inputs[name]}" for name, folder in cls.MODEL_INPUTS.items()
                if isinstance(inputs.get(name), str)]

    @classmethod
    def is_changed(cls, folders, inputs):
        """Extra cache-key material (ComfyUI's IS_CHANGED); runs in the executor."""
        return None

    async def run(self, ctx, **inputs):
        raise NotImplementedError


def _png_info(ctx, prompt_with_hashes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(prompt_with_hashes))
    for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
        info.add_text(key, json.dumps(value))
    info.add_text("comfysim", ctx.sim_name)
    return info


def _save_batch(images, prefix, base_dir, kind, compress, pnginfo):
    w, h = images[0].size
    folder, stem, counter, subfolder = files.save_image_path(prefix, base_dir, w, h)
    results = []
    for batch_number, img in enumerate(images):
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        img.save(os.path.join(folder, name), pnginfo=pnginfo, compress_level=compress)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"images": results}


class LoadImage(Node):
    VALIDATES = ("image",)

    @classmethod
    def input_types(cls, folders):
        # The combo lists the current top-level input files, like the real node.
        return {"required": {"image": [folders.list_input_images(), {"image_upload": True}]}}

    @classmethod
    def validate(cls, folders, image):
        if not os.path.exists(folders.input_image_path(image)):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def is_changed(cls, folders, inputs):
        return files.sha256_file(folders.input_image_path(inputs["image"]))

    @staticmethod
    def _load(path):
        img = Image.open(path)  # a non-image raises PIL.UnidentifiedImageError, as in ComfyUI
        frames, masks, size = ImageBatch(), [], None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:
                continue
            if "A" in frame.getbands():
                masks.append(ImageOps.invert(frame.getchannel("A")))
            else:
                masks.append(Image.new("L", (64, 64), 0))
            frames.append(rgb)
        return frames, masks

    async def run(self, ctx, image):
        frames, masks = await ctx.offload(self._load, ctx.folders.input_image_path(image))
        return (frames, masks), None


class ImageInvert(Node):
    async def run(self, ctx, image):
        out = await ctx.offload(lambda: ImageBatch(ImageOps.invert(i) for i in image))
        return (out,), None


class EmptyImage(Node):
    async def run(self, ctx, width, height, batch_size=1, color=0):
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        out = await ctx.offload(
            lambda: ImageBatch(Image.new("RGB", (width, height), rgb) for _ in range(batch_size)))
        return (out,), None


_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageScale(Node):
    @staticmethod
    def _scale(images, method, width, height, crop):
        if width == 0 and height == 0:
            return images
        out = ImageBatch()
        for img in images:
            w, h = img.size
            tw = width or max(1, round(w * height / h))
            th = height or max(1, round(h * width / w))
            if crop == "center":
                # Cut the source to the target's aspect ratio first, as common_upscale does.
                src_ratio, dst_ratio = w / h, tw / th
                if src_ratio > dst_ratio:
                    cw = round(h * dst_ratio)
                    x = (w - cw) // 2
                    img = img.crop((x, 0, x + cw, h))
                elif src_ratio < dst_ratio:
                    ch = round(w / dst_ratio)
                    y = (h - ch) // 2
                    img = img.crop((0, y, w, y + ch))
            out.append(img.resize((tw, th), _RESAMPLE[method]))
        return out

    async def run(self, ctx, image, upscale_method, width, height, crop):
        out = await ctx.offload(self._scale, image, upscale_method, width, height, crop)
        return (out,), None


class ImageBlur(Node):
    async def run(self, ctx, image, blur_radius, sigma):
        if blur_radius == 0:
            return (image,), None
        out = await ctx.offload(
            lambda: ImageBatch(i.filter(ImageFilter.GaussianBlur(radius=sigma)) for i in image))
        return (out,), None


class SaveImage(Node):
    async def run(self, ctx, images, filename_prefix="ComfyUI"):
        info = _png_info(ctx, ctx.prompt_with_hashes())
        ui = await ctx.offload(_save_batch, images, filename_prefix, ctx.folders.output, "output", 4, info)
        return (), ui


class PreviewImage(Node):
    async def run(self, ctx, images):
        # Real previews go to temp as ComfyUI_temp_<5 random letters>_<counter>_.png.
        prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        info = _png_info(ctx, ctx.prompt_with_hashes())
        ui = await ctx.offload(_save_batch, images, prefix, ctx.folders.temp, "temp", 1, info)
        return (), ui


class SaveImageWebsocket(Node):
    """Sends each image as a binary preview frame with a progress tick (0..n-1 of n)."""

    @classmethod
    def is_changed(cls, folders, inputs):
        return time.time()  # never cached, like the real node

    @staticmethod
    def _png(img):
        from io import BytesIO
        buf = BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    async def run(self, ctx, images):
        for step, img in enumerate(images):
            png = await ctx.offload(self._png, img)
            await ctx.progress(step, len(images), preview_png=png)
        return (), None


class GetImageSize(Node):
    UNIQUE_ID = True

    async def run(self, ctx, image):
        w, h = image[0].size
        ctx.send_progress_text(f"width: {w}, height: {h}\n batch size: {len(image)}")
        return (w, h, len(image)), None


class SimSlowProgress(Node):
    """Simulator-only: pass the image through after `steps` progress ticks of tick_seconds each."""

    async def run(self, ctx, image, steps=10):
        for i in range(1, steps + 1):
            await ctx.sleep_tick()
            await ctx.progress(i, steps)  # raises if interrupted, like ComfyUI's progress hook
        return (image,), None


@dataclass(frozen=True)
class Weights:
    """What a loader hands on (MODEL, CLIP, VAE, ...): which files it is made of."""
    kind: str
    files: tuple[str, ...]

    def plus(self, file: str) -> "Weights":
        return Weights(self.kind, (*self.files, file))

    def __repr__(self) -> str:
        return f"{self.kind}({' + '.join(self.files)})"

    __str__ = __repr__


@dataclass(frozen=True)
class Latent:
    """ComfyUI's LATENT: a size, and (once sampled) what decides the picture."""
    width: int
    height: int
    batch_size: int
    seed: int | None = None
    content: str = ""

    def __repr__(self) -> str:
        return f"LATENT[{self.batch_size}, 4, {self.height // 8}, {self.width // 8}]"

    __str__ = __repr__


class ModelLoader(Node):
    """A loader: its combos list the model folders; running it loads the files the GPU does not hold."""

    @classmethod
    def input_types(cls, folders):
        declared = copy.deepcopy(cls.INFO["input"])
        for name, folder in cls.MODEL_INPUTS.items():
            spec = declared["required"][name]
            names = cls.extra_choices(folders.list_models(folder))
            if spec[0] == "COMBO":   # the newer node schema: ["COMBO", {"options": [...]}]
                spec[1]["options"] = names
            else:
                spec[0] = names
        return declared

    @staticmethod
    def extra_choices(names: list[str]) -> list[str]:
        return names

    async def run(self, ctx, **inputs):
        await ctx.load_models(self.model_files(inputs))
        return self.outputs(**inputs), None

    def outputs(self, **inputs) -> tuple:
        raise NotImplementedError


class CheckpointLoaderSimple(ModelLoader):
    MODEL_INPUTS = {"ckpt_name": "checkpoints"}

    def outputs(self, ckpt_name):
        file = f"checkpoints/{ckpt_name}"
        return Weights("MODEL", (file,)), Weights("CLIP", (file,)), Weights("VAE", (file,))


class LoraLoader(ModelLoader):
    MODEL_INPUTS = {"lora_name": "loras"}

    @classmethod
    def model_files(cls, inputs):
        if inputs.get("strength_model") == 0 and inputs.get("strength_clip") == 0:
            return []   # ComfyUI returns the inputs unchanged without opening the file
        return super().model_files(inputs)

    def outputs(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        file = f"loras/{lora_name}"
        return model.plus(file), clip.plus(file)


class LoraLoaderModelOnly(ModelLoader):
    MODEL_INPUTS = {"lora_name": "loras"}

    @classmethod
    def model_files(cls, inputs):
        return [] if inputs.get("strength_model") == 0 else super().model_files(inputs)

    def outputs(self, model, lora_name, strength_model):
        return (model if strength_model == 0 else model.plus(f"loras/{lora_name}"),)


class VAELoader(ModelLoader):
    MODEL_INPUTS = {"vae_name": "vae"}

    @staticmethod
    def extra_choices(names):
        return [*names, "pixel_space"]   # ComfyUI's vae_list always ends with it

    @classmethod
    def model_files(cls, inputs):
        return [] if inputs.get("vae_name") == "pixel_space" else super().model_files(inputs)

    def outputs(self, vae_name):
        return (Weights("VAE", (f"vae/{vae_name}",)),)


class UNETLoader(ModelLoader):
    MODEL_INPUTS = {"unet_name": "diffusion_models"}

    def outputs(self, unet_name, weight_dtype):
        return (Weights("MODEL", (f"diffusion_models/{unet_name}",)),)


class CLIPLoader(ModelLoader):
    MODEL_INPUTS = {"clip_name": "text_encoders"}

    def outputs(self, clip_name, type, device="default"):
        return (Weights("CLIP", (f"text_encoders/{clip_name}",)),)


class DualCLIPLoader(ModelLoader):
    MODEL_INPUTS = {"clip_name1": "text_encoders", "clip_name2": "text_encoders"}

    def outputs(self, clip_name1, clip_name2, type, device="default"):
        return (Weights("CLIP", (f"text_encoders/{clip_name1}", f"text_encoders/{clip_name2}")),)


class ControlNetLoader(ModelLoader):
    MODEL_INPUTS = {"control_net_name": "controlnet"}

    def outputs(self, control_net_name):
        return (Weights("CONTROL_NET", (f"controlnet/{control_net_name}",)),)


class UpscaleModelLoader(ModelLoader):
    MODEL_INPUTS = {"model_name": "upscale_models"}

    def outputs(self, model_name):
        return (Weights("UPSCALE_MODEL", (f"upscale_models/{model_name}",)),)


class ImageUpscaleWithModel(Node):
    """Resizes by the factor the model's name states ("4x-UltraSharp", "RealESRGAN_x2plus"; else 4)."""

    @staticmethod
    def _upscale(images, factor):
        return ImageBatch(i.resize((i.width * factor, i.height * factor), Image.Resampling.LANCZOS) for i in images)

    async def run(self, ctx, upscale_model, image):
        named = re.search(r"(?:^|[^0-9])([1-8])x|x([1-8])(?:[^0-9]|$)", upscale_model.files[0].rsplit("/", 1)[-1])
        factor = int(named.group(1) or named.group(2)) if named else 4
        return (await ctx.offload(self._upscale, image, factor),), None


class ControlNetApplyAdvanced(Node):
    """The conditioning goes on with the control noted in it (so it changes the sampled picture)."""

    async def run(self, ctx, positive, negative, control_net, image, strength, start_percent, end_percent,
                   vae=None):
        if strength == 0:
            return (positive, negative), None
        note = f" [{control_net.files[0]} {strength} {start_percent}-{end_percent} {image!r}]"
        return ((positive[0], positive[1] + note), (negative[0], negative[1] + note)), None


class CLIPTextEncode(Node):
    async def run(self, ctx, text, clip):
        return ((clip, text),), None   # CONDITIONING: the encoder and the text


class EmptyLatentImage(Node):
    async def run(self, ctx, width, height, batch_size=1):
        return (Latent(width, height, batch_size),), None


class KSampler(Node):
    """`steps` progress ticks of tick_seconds / speed; the latent then names what decides the image."""

    async def run(self, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                  latent_image, denoise=1.0):
        for step in range(1, steps + 1):
            await ctx.sleep_tick()
            await ctx.progress(step, steps)   # ComfyUI's sampler callback: value step+1 of steps
        content = json.dumps([model.files, positive[1], negative[1], steps, cfg, sampler_name, scheduler, denoise])
        return (Latent(latent_image.width, latent_image.height, latent_image.batch_size, seed, content),), None


def _render(latent: Latent) -> ImageBatch:
    """A picture that depends only on the latent: its size, seed and what was sampled."""
    width, height = max(8, latent.width - latent.width % 8), max(8, latent.height - latent.height % 8)
    out = ImageBatch()
    for index in range(latent.batch_size):
        if latent.seed is None:   # an unsampled latent decodes to flat grey
            out.append(Image.new("RGB", (width, height), (128, 128, 128)))
            continue
        rnd = random.Random(f"{latent.seed + index}/{latent.content}")
        dark, light = (tuple(rnd.randrange(256) for _ in range(3)) for _ in range(2))
        shade = Image.linear_gradient("L").rotate(rnd.randrange(360)).resize((width, height))
        out.append(ImageOps.colorize(shade, dark, light))
    return out


class VAEDecode(Node):
    async def run(self, ctx, samples, vae):
        return (await ctx.offload(_render, samples),), None


NODE_CLASSES: dict[str, type[Node]] = {
    cls.__name__: cls
    for cls in (LoadImage, ImageInvert, EmptyImage, ImageScale, ImageBlur, SaveImage,
                PreviewImage, SaveImageWebsocket, GetImageSize, SimSlowProgress,
                CheckpointLoaderSimple, LoraLoader, LoraLoaderModelOnly, VAELoader, UNETLoader,
                CLIPLoader, DualCLIPLoader, ControlNetLoader, UpscaleModelLoader,
                CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, ImageUpscaleWithModel,
                ControlNetApplyAdvanced)
}


def object_info(folders, class_name: str | None = None) -> dict:
    """GET /object_info[/Class] body: the stored entries, with the file lists (input images,
    model folders) filled in."""
    names = [class_name] if class_name else list(NODE_CLASSES)
    out = {}
    for name in names:
        cls = NODE_CLASSES.get(name)
        if cls is None:
            continue
        entry = dict(cls.INFO)
        entry["input"] = cls.input_types(folders)
        out[name] = entry
    return out
