"""The node classes the simulator can execute, with real Pillow image work.

A batch of images (ComfyUI's IMAGE tensor [B,H,W,C]) is a list of RGB PIL images; a
MASK is a list of "L" images. Each node declares its `/object_info` entry by name
(the entries in object_info.json are copied from a real ComfyUI 0.3.64), and
implements `run(ctx, **inputs) -> (outputs tuple, ui dict or None)`.

Pillow work goes through `ctx.offload(...)` (a thread executor), never on the IOLoop.
"""
from __future__ import annotations

import json
import os
import random
import string
import time
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

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
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


NODE_CLASSES: dict[str, type[Node]] = {
    cls.__name__: cls
    for cls in (LoadImage, ImageInvert, EmptyImage, ImageScale, ImageBlur, SaveImage,
                PreviewImage, SaveImageWebsocket, GetImageSize, SimSlowProgress)
}


def object_info(folders, class_name: str | None = None) -> dict:
    """GET /object_info[/Class] body: the stored entries, with LoadImage's file list filled in."""
    names = [class_name] if class_name else list(NODE_CLASSES)
    out = {}
    for name in names:
        cls = NODE_CLASSES.get(name)
        if cls is None:
            continue
        entry = dict(cls.INFO)
        if cls is LoadImage:
            entry["input"] = cls.input_types(folders)
        out[name] = entry
    return out
