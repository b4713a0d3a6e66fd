"""The simulator's input/output/temp folders and ComfyUI's rules for naming files in them.

Everything here is synchronous and touches the disk: callers on the IOLoop run the
heavier functions (hashing, writing, saving) through an executor.
"""
from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import shutil
import time
from pathlib import Path

FOLDER_TYPES = ("input", "output", "temp")

# ComfyUI's LoadImage combo only lists files whose mimetype is an image.
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class Folders:
    """The three base directories of one simulated server, and its (fake) model folders."""

    def __init__(self, root: Path, model_files: dict[str, list[str]] | None = None):
        self.root = Path(root).resolve()
        self.input = str(self.root / "input")
        self.output = str(self.root / "output")
        self.temp = str(self.root / "temp")
        # folder -> file names, as folder_paths.get_filename_list sees them (no files on disk)
        self.model_files: dict[str, list[str]] = model_files or {}

    def list_models(self, folder: str) -> list[str]:
        return list(self.model_files.get(folder, ()))

    def create(self) -> None:
        for d in (self.input, self.output, self.temp):
            os.makedirs(d, exist_ok=True)

    def wipe(self, *kinds: str) -> None:
        """Remove and recreate the named folders (a restart wipes temp; a crash also input)."""
        for kind in kinds:
            path = self.by_type(kind)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path, exist_ok=True)

    def by_type(self, kind: str | None) -> str | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "")

    def annotated(self, name: str, default_dir: str | None = None) -> tuple[str, str | None]:
        """Split `"x.png [output]"` into ("x.png", output dir); no annotation -> default_dir."""
        for kind in FOLDER_TYPES:
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                return name[: -len(suffix)], self.by_type(kind)
        return name, default_dir

    def input_image_path(self, name: str) -> str:
        """Where LoadImage reads `name` (may be `sub/name` and/or carry an annotation)."""
        name, base = self.annotated(name, self.input)
        return os.path.join(base, name)

    def list_input_images(self) -> list[str]:
        """Top-level image files of the input folder, sorted (as LoadImage's combo shows them)."""
        try:
            names = os.listdir(self.input)
        except FileNotFoundError:
            return []
        return sorted(
            n for n in names
            if os.path.isfile(os.path.join(self.input, n))
            and os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS
        )


def inside(base: str, path: str) -> bool:
    base = os.path.abspath(base)
    return os.path.commonpath((base, os.path.abspath(path))) == base


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def save_upload(base_dir: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    """Store an uploaded file the way ComfyUI does; returns the name to report, None if the path escapes.

    Without overwrite an existing file with identical bytes (sha256) is reused, and a
    different one pushes the new file to `name (1).ext`, `name (2).ext`, ... where each
    candidate is compared again.
    """
    folder = os.path.join(base_dir, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if not inside(base_dir, path):
        return None
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    if not overwrite:
        digest = hashlib.sha256(data).hexdigest()
        i = 1
        while os.path.exists(path):
            if sha256_file(path) == digest:
                return filename
            filename = f"{stem} ({i}){ext}"
            path = os.path.join(folder, filename)
            i += 1
    with open(path, "wb") as f:
        f.write(data)
    return filename


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width), "%height%": str(height),
        "%year%": str(now.tm_year), "%month%": f"{now.tm_mon:02d}", "%day%": f"{now.tm_mday:02d}",
        "%hour%": f"{now.tm_hour:02d}", "%minute%": f"{now.tm_min:02d}", "%second%": f"{now.tm_sec:02d}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


def save_image_path(prefix: str, base_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's SaveImage naming: returns (folder, file stem, next counter, subfolder).

    The counter is one more than the highest `<stem>_<NNNNN>_` already in the folder,
    so two servers sharing a folder could pick the same one (as real ones do).
    """
    prefix = _expand_prefix(prefix, width, height)
    subfolder, stem = os.path.split(os.path.normpath(prefix))
    folder = os.path.join(base_dir, subfolder)
    if not inside(base_dir, folder):
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {base_dir}"
        )
    pattern = re.compile(re.escape(stem) + r"_(\d+)_")
    counter = 0
    try:
        for name in os.listdir(folder):
            m = pattern.match(name)
            if m:
                counter = max(counter, int(m.group(1)))
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return folder, stem, counter + 1, subfolder
