"""What kind of file some bytes are: the accepted file types and their recognition from the
first bytes of content (magic numbers, plus a structural check for MP3 and Matroska)."""
from __future__ import annotations

from dataclasses import dataclass

SNIFF_BYTES = 4096            # bytes of a file part looked at before its type is decided


@dataclass(frozen=True)
class FileKind:
    label: str       # the name used in messages ("jpeg")
    ext: str         # the saved file's extension ("jpg")
    media_type: str


_KINDS = (
    FileKind("png", "png", "image/png"),
    FileKind("jpeg", "jpg", "image/jpeg"),
    FileKind("webp", "webp", "image/webp"),
    FileKind("gif", "gif", "image/gif"),
    FileKind("bmp", "bmp", "image/bmp"),
    FileKind("tiff", "tiff", "image/tiff"),
    FileKind("mp4", "mp4", "video/mp4"),
    FileKind("webm", "webm", "video/webm"),
    FileKind("mov", "mov", "video/quicktime"),
    FileKind("mkv", "mkv", "video/x-matroska"),
    FileKind("wav", "wav", "audio/wav"),
    FileKind("mp3", "mp3", "audio/mpeg"),
    FileKind("flac", "flac", "audio/flac"),
    FileKind("ogg", "ogg", "audio/ogg"),
)
KIND_BY_LABEL = {k.label: k for k in _KINDS}
KIND_BY_EXT = {k.ext: k for k in _KINDS}
ACCEPTED_LABELS = ", ".join(k.label for k in _KINDS)

# ISO-BMFF major brands that are still images (HEIF, AVIF, JPEG 2000, camera raw), not video.
_STILL_IMAGE_BRANDS = {
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"mif2",
    b"msf1", b"avif", b"avis", b"avci", b"crx ", b"jp2 ", b"jpx ", b"jpm ", b"mjp2", b"jxl ",
}
_BIGTIFF_HEADS = (b"II+\x00\x08\x00\x00\x00", b"MM\x00+\x00\x08\x00\x00")
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_MP3_BITRATES = {  # kbit/s by bitrate index, Layer III
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),   # MPEG-1
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),      # MPEG-2
    0: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),      # MPEG-2.5
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(version, sample rate, frame length) of a Layer III frame header at `pos`, or None."""
    if len(data) < pos + 4 or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    b1, b2 = data[pos + 1], data[pos + 2]
    version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values, free format, or not Layer III (e.g. AAC/ADTS)
    if data[pos + 3] & 3 == 2:
        return None  # reserved emphasis
    bitrate = _MP3_BITRATES[version][bitrate_index] * 1000
    rate = _MP3_RATES[version][rate_index]
    length = (144 if version == 3 else 72) * bitrate // rate + padding
    return version, rate, length


def _looks_like_mp3(data: bytes, complete: bool) -> bool:
    if data[:3] == b"ID3":
        return (len(data) >= 10 and data[3] in (2, 3, 4) and data[4] != 0xFF
                and all(b < 0x80 for b in data[6:10]))
    first = _mp3_frame(data, 0)
    if first is None:
        return False
    version, rate, length = first
    if len(data) >= length + 4:
        second = _mp3_frame(data, length)   # a real stream has another frame right after
        return second is not None and second[:2] == (version, rate)
    # Fewer bytes than two frames: only a whole part holding at least one full frame passes.
    return complete and len(data) >= length


def _ebml_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int] | None:
    """Decode an EBML variable-size integer at `pos`: (value, next position) or None."""
    if pos >= len(data) or data[pos] == 0:
        return None
    first = data[pos]
    width = 9 - first.bit_length()
    if pos + width > len(data):
        return None
    value = first if keep_marker else first & ((1 << (8 - width)) - 1)
    for b in data[pos + 1:pos + width]:
        value = (value << 8) | b
    return value, pos + width


def _matroska_doctype(data: bytes) -> bytes | None:
    """The DocType of an EBML header (`webm`, `matroska`), or None when there is none."""
    size = _ebml_vint(data, 4, keep_marker=False)
    if size is None:
        return None
    header_size, pos = size
    end = min(len(data), pos + header_size)
    while pos < end:
        element = _ebml_vint(data, pos, keep_marker=True)
        if element is None:
            return None
        element_id, pos = element
        length = _ebml_vint(data, pos, keep_marker=False)
        if length is None:
            return None
        element_size, pos = length
        if element_id == 0x4282:
            return bytes(data[pos:pos + element_size]).rstrip(b"\x00")
        pos += element_size
    return None


def detect_kind(data: bytes, complete: bool = False) -> FileKind | None:
    """Recognise an accepted file type from its first bytes.

    `complete` says `data` is the whole file (a part smaller than SNIFF_BYTES)."""
    head = bytes(data[:16])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return KIND_BY_LABEL["png"]
    if head[:3] == b"\xff\xd8\xff":
        return KIND_BY_LABEL["jpeg"]
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return KIND_BY_LABEL["gif"]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and head[12:16] in (b"VP8 ", b"VP8L", b"VP8X"):
        return KIND_BY_LABEL["webp"]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return KIND_BY_LABEL["wav"]
    if head[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return KIND_BY_LABEL["bmp"]
    if head[:4] in (b"II*\x00", b"MM\x00*") or head[:8] in _BIGTIFF_HEADS:
        return KIND_BY_LABEL["tiff"]
    if head[4:8] == b"ftyp" and len(head) >= 12 and int.from_bytes(head[:4], "big") >= 12:
        brand = head[8:12]
        if brand == b"qt  ":
            return KIND_BY_LABEL["mov"]
        return None if brand in _STILL_IMAGE_BRANDS else KIND_BY_LABEL["mp4"]
    if head[4:8] in (b"moov", b"wide") and int.from_bytes(head[:4], "big") >= 8:
        return KIND_BY_LABEL["mov"]   # QuickTime files older than the ftyp box
    if head[:4] == b"\x1a\x45\xdf\xa3":
        doctype = _matroska_doctype(data)
        if doctype == b"webm":
            return KIND_BY_LABEL["webm"]
        if doctype == b"matroska":
            return KIND_BY_LABEL["mkv"]
        return None
    if head[:4] == b"fLaC" and len(head) >= 8 and head[4] & 0x7F == 0:   # STREAMINFO comes first
        return KIND_BY_LABEL["flac"]
    if head[:4] == b"OggS" and len(data) >= 27 and data[4] == 0:
        return KIND_BY_LABEL["ogg"]
    if _looks_like_mp3(data, complete):
        return KIND_BY_LABEL["mp3"]
    return None
