"""File routes: POST /upload/image and GET /view, with ComfyUI's naming and path rules.

Disk work (hashing, writing, reading, re-encoding previews) runs in the simulator's executor.
"""
from __future__ import annotations

import os
import re
from email.utils import formatdate
from io import BytesIO

import tornado.web
from PIL import Image

from . import files
from .handlers import BaseHandler


class UploadImageHandler(BaseHandler):
    async def post(self):
        req = self.request
        if len(req.body) > self.sim.max_upload_size:
            self.set_status(413)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            return self.finish(f"Maximum request body size {self.sim.max_upload_size} exceeded.")
        if any(k in req.files for k in ("type", "subfolder", "overwrite")):
            raise tornado.web.HTTPError(500, "text field sent as a file part")
        kind = self.get_body_argument("type", None, strip=False) or "input"
        base = self.sim.folders.by_type(kind)
        if base is None or kind not in files.FOLDER_TYPES:
            raise tornado.web.HTTPError(500, "unknown upload type")  # UnboundLocalError in ComfyUI
        parts = req.files.get("image")
        if not parts:
            if "image" in req.body_arguments:
                raise tornado.web.HTTPError(500, "image is not a file part")
            return self.empty(400)
        part = parts[0]
        if not part.filename:
            return self.empty(400)
        subfolder = self.get_body_argument("subfolder", "", strip=False)
        overwrite = self.get_body_argument("overwrite", None, strip=False) in ("true", "1")
        name = await self.sim._offload(files.save_upload, base, subfolder, part.filename, part.body, overwrite)
        if name is None:
            return self.empty(400)
        self.send_json({"name": name, "subfolder": subfolder, "type": kind})


def _read_view(path: str, preview: str | None, channel: str | None):
    """File bytes (or a re-encoded preview / channel) and the content type; runs in the executor."""
    filename = os.path.basename(path)
    if preview:
        info = preview.split(";")
        fmt = info[0] if info[0] in ("webp", "jpeg") and "a" not in (channel or "") else "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        with Image.open(path) as img:
            buf = BytesIO()
            img.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
        return buf.getvalue(), f"image/{fmt}", False
    if channel in ("rgb", "a"):
        with Image.open(path) as img:
            if channel == "rgb":
                out = img.convert("RGB")
            else:
                rgba = img.convert("RGBA")
                out = Image.new("RGBA", rgba.size)
                out.putalpha(rgba.getchannel("A"))
            buf = BytesIO()
            out.save(buf, format="PNG")
        return buf.getvalue(), "image/png", False
    with open(path, "rb") as f:
        data = f.read()
    ctype = files.content_type(filename)
    if ctype in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
        ctype = "application/octet-stream"  # as ComfyUI: never render these inline
    return data, ctype, True


UNSATISFIABLE = "unsatisfiable"
_BYTES = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int):
    """What aiohttp's FileResponse (ComfyUI's raw /view) makes of a Range header: None (the whole
    file, 200), (start, stop) for a 206, or UNSATISFIABLE (416). One range only; anything else
    in the header is refused, as aiohttp does."""
    if header is None:
        return None
    match = _BYTES.fullmatch(header)
    if match is None or match.group(1) == match.group(2) == "":
        return UNSATISFIABLE
    first, last = match.groups()
    if first == "":                      # the last N bytes ("bytes=-0" is the whole file there)
        start = max(0, size - int(last)) if int(last) else 0
        stop = size
    else:
        start = int(first)
        if last != "" and int(last) < start:
            return UNSATISFIABLE
        stop = size if last == "" else min(int(last) + 1, size)
    if start >= size:
        return UNSATISFIABLE
    return start, stop


class ViewHandler(BaseHandler):
    async def get(self):
        args = {k: self.get_query_argument(k, strip=False) for k in self.request.query_arguments}
        if "filename" not in args:
            return self.empty(404)
        folders = self.sim.folders
        filename, base = folders.annotated(args["filename"])
        if not filename:
            return self.empty(400)
        if filename[0] == "/" or ".." in filename:
            return self.empty(400)
        if base is None:
            base = folders.by_type(args.get("type", "output"))
            if base is None:
                return self.empty(400)
        if "subfolder" in args:
            full = os.path.join(base, args["subfolder"])
            if not files.inside(base, full):
                return self.empty(403)
            base = full
        filename = os.path.basename(filename)
        path = os.path.join(base, filename)
        if not os.path.isfile(path):
            return self.empty(404)
        data, ctype, raw = await self.sim._offload(_read_view, path, args.get("preview"), args.get("channel"))
        self.set_header("Content-Type", ctype)
        self.set_header("Content-Disposition", f'filename="{filename}"')
        if raw:  # ComfyUI answers with aiohttp's FileResponse: validators, and byte ranges
            st = os.stat(path)
            self.set_header("Etag", f'"{int(st.st_mtime_ns):x}-{st.st_size:x}"')
            self.set_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
            self.set_header("Accept-Ranges", "bytes")
            wanted = byte_range(self.request.headers.get("Range"), len(data))
            if wanted == UNSATISFIABLE:
                self.set_status(416)
                self.set_header("Content-Range", f"bytes */{len(data)}")
                return self.finish()
            if wanted is not None:
                start, stop = wanted
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                data = data[start:stop]
        self.finish(data)
