"""Wire formats shared by the handlers and the executor: JSON text and binary WS frames."""
from __future__ import annotations

import json
import struct
import time

# Binary frame event types (first big-endian u32 of every binary frame).
PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

IMAGE_FORMAT_JPEG = 1
IMAGE_FORMAT_PNG = 2

# What GET /features and the feature_flags answer advertise (ComfyUI's default 100 MB).
DEFAULT_MAX_UPLOAD_SIZE = 100 * 1024 * 1024


def dumps(obj) -> str:
    """JSON the way aiohttp's json_response writes it (json.dumps defaults, with spaces)."""
    return json.dumps(obj)


def now_ms() -> int:
    return int(time.time() * 1000)


def text_frame(event: str, data) -> str:
    return dumps({"type": event, "data": data})


def preview_frame(png: bytes) -> bytes:
    """Type 1: [u32 1][u32 format][image bytes] - for clients without preview metadata."""
    return struct.pack(">II", PREVIEW_IMAGE, IMAGE_FORMAT_PNG) + png


def preview_with_metadata_frame(png: bytes, node_id: str, prompt_id: str) -> bytes:
    """Type 4: [u32 4][u32 len(json)][json][image bytes] - for clients that asked for metadata."""
    meta = json.dumps({
        "node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
        "parent_node_id": None, "real_node_id": node_id, "image_type": "image/png",
    }).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + png


def progress_text_frame(node_id: str, text: str) -> bytes:
    """Type 3: [u32 3][u32 len(node_id)][node_id][text] - always broadcast by ComfyUI."""
    nid = node_id.encode()
    return struct.pack(">II", TEXT, len(nid)) + nid + text.encode()
