"""Uploaded input files: the bridge's own store, and a streaming multipart/form-data receiver.

`UploadStore` keeps files that clients sent with `POST /upload` in one directory, under names
the store makes up itself: `<uuid4 hex>.<ext>`, the extension taken from the file's detected
content. A client's file name or path never reaches the file system; it only appears
(sanitised, truncated) in error messages.

`MultipartReceiver` is fed the request body chunk by chunk from a `@stream_request_body`
handler's `data_received`. It keeps only a bounded window in memory (the look-behind needed to
spot a boundary split across chunks, one part's header block, the first bytes of a file used
to recognise its type) and writes file bytes straight to `<directory>/.incoming/`. Only when
the whole request was received and valid are the files renamed into place; any failure
removes every file of that request, finished parts included.

Decisions where the API contract is silent:
- A part is a *file part* when its Content-Disposition has a `filename` parameter, or its
  Content-Type is image/*, video/*, audio/* or application/octet-stream. Its field name is
  the identifier (`file` when missing or empty; at most 128 printable characters). Other
  parts are plain form fields: ignored, but each is limited to `max_field_bytes` (64 KiB)
  and counts towards the total.
- Two file parts with the same field name: 400 naming it.
- A file part with an empty file name and no content (what a browser sends for a file input
  left unselected) is skipped; any other empty file part is a 400.
- The type is recognised from the first `SNIFF_BYTES` of content only; the client's file name
  and Content-Type are not consulted (a PNG named `photo.jpg` is stored as `.png`).
- `max_total_bytes` counts the content of every part, not the multipart framing; at most
  64 parts, 8 KiB of headers per part, 64 KiB of preamble before the first boundary and of
  epilogue after the last.
- Files are not fsync'ed: an upload lost in a power cut is simply uploaded again, and fsync
  of a large file would stall the IOLoop.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote

log = logging.getLogger("bridge.uploads")

SNIFF_BYTES = 4096            # bytes of a file part looked at before its type is decided
MAX_PARTS = 64
MAX_HEADER_BYTES = 8 * 1024   # one part's header block
MAX_FIELD_BYTES = 64 * 1024   # one plain (non-file) form field
MAX_PREAMBLE_BYTES = 64 * 1024   # text before the first boundary
MAX_EPILOGUE_BYTES = 64 * 1024   # text after the closing boundary
MAX_IDENTIFIER_CHARS = 128
_MAX_BOUNDARY_PADDING = 64    # whitespace allowed between a boundary and its line end
_STALE_INCOMING_SECONDS = 3600


class UploadError(Exception):
    """An upload the bridge refuses. `str(e)` is safe to show to the client."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


# --------------------------------------------------------------------------- file types

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
_KIND_BY_EXT = {k.ext: k for k in _KINDS}
ACCEPTED_LABELS = ", ".join(k.label for k in _KINDS)

_SAVED_NAME = re.compile(r"[0-9a-f]{32}\.(?:%s)" % "|".join(re.escape(k.ext) for k in _KINDS))

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


# --------------------------------------------------------------------------- header helpers

def _parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """Split `main; key=value; key="quoted"` into the main value and lower-cased parameters.

    Raises ValueError for an unterminated quoted string or a repeated parameter."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        key = rest[i:j].strip().lower()
        if j >= n or rest[j] == ";":
            if key:
                params.setdefault(key, "")
            i = j
            continue
        j += 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            j += 1
            chars = []
            while True:
                if j >= n:
                    raise ValueError(f"unterminated quoted value for {key!r}")
                c = rest[j]
                if c == "\\" and j + 1 < n and rest[j + 1] in '"\\':
                    chars.append(rest[j + 1])
                    j += 2
                elif c == '"':
                    j += 1
                    break
                else:
                    chars.append(c)
                    j += 1
            val = "".join(chars)
            while j < n and rest[j] != ";":
                if rest[j] not in " \t":
                    raise ValueError(f"unexpected text after the quoted value of {key!r}")
                j += 1
        else:
            k = rest.find(";", j)
            k = n if k < 0 else k
            val, j = rest[j:k].strip(), k
        if key in params:
            raise ValueError(f"parameter {key!r} given twice")
        params[key] = val
        i = j
    return main.strip(), params


def _decode_ext_value(value: str) -> str | None:
    """RFC 5987 `charset'lang'percent-encoded` (used by `filename*`)."""
    parts = value.split("'", 2)
    if len(parts) != 3:
        return None
    charset = parts[0] or "utf-8"
    try:
        return unquote(parts[2], encoding=charset, errors="replace")
    except LookupError:
        return None


def _display(text: str, limit: int = 64, basename: bool = False) -> str:
    """A client-supplied string made safe to quote in a message: printable and short."""
    if basename:
        text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n // mib} MB" if n >= mib and n % mib == 0 else f"{n} bytes"


_FILE_MEDIA_PREFIXES = ("image/", "video/", "audio/")
_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


# --------------------------------------------------------------------------- the store

class UploadStore:
    """Uploaded files under one directory, named `<uuid4 hex>.<ext>` by the store itself."""

    def __init__(self, directory: Path, max_total_bytes: int, *, max_parts: int = MAX_PARTS,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_field_bytes: int = MAX_FIELD_BYTES):
        self.directory = Path(directory)
        self.incoming = self.directory / ".incoming"
        self.max_total_bytes = max_total_bytes
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.max_field_bytes = max_field_bytes
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o750, exist_ok=True)
        self._remove_stale_incoming()

    def _remove_stale_incoming(self) -> None:
        # Left behind only by a crash mid-upload; a live upload touches its file constantly.
        cutoff = time.time() - _STALE_INCOMING_SECONDS
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def receiver(self, content_type: str) -> MultipartReceiver:
        """A receiver for one request body; UploadError(400) unless multipart/form-data with a boundary."""
        try:
            main, params = _parse_header_value(content_type or "")
        except ValueError as e:
            raise UploadError(f"malformed Content-Type header: {e}") from None
        if main.lower() != "multipart/form-data":
            shown = _display(main) or "(none)"
            raise UploadError(f"expected Content-Type multipart/form-data, got '{shown}'")
        boundary = params.get("boundary", "")
        if not boundary:
            raise UploadError("Content-Type multipart/form-data has no boundary parameter")
        if not _BOUNDARY_CHARS.fullmatch(boundary):
            raise UploadError(f"invalid multipart boundary '{_display(boundary, 80)}'")
        return MultipartReceiver(self, boundary.encode("ascii"))

    @staticmethod
    def is_saved_name(saved_name: object) -> bool:
        """True when `saved_name` has the shape of a name this store issues."""
        return isinstance(saved_name, str) and _SAVED_NAME.fullmatch(saved_name) is not None

    def exists(self, saved_name: str) -> bool:
        # The name is matched against our own pattern before any path is built from it.
        if not self.is_saved_name(saved_name):
            return False
        return (self.directory / saved_name).is_file()

    def path(self, saved_name: str) -> Path:
        """Where a stored upload is; ValueError for a foreign name or one whose file is gone."""
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {_display(str(saved_name))!r}")
        path = self.directory / saved_name
        if not path.is_file():
            raise ValueError(f"no uploaded file named {saved_name!r}")
        return path

    def media_type(self, saved_name: str) -> str:
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {_display(str(saved_name))!r}")
        return _KIND_BY_EXT[saved_name.rsplit(".", 1)[1]].media_type

    def remove(self, saved_name: str) -> None:
        if not self.is_saved_name(saved_name):
            raise ValueError(f"not an uploaded file name: {_display(str(saved_name))!r}")
        (self.directory / saved_name).unlink(missing_ok=True)

    def list(self) -> list[tuple[str, float, int]]:
        """(saved name, mtime, size) of every stored upload."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not _SAVED_NAME.fullmatch(entry.name):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        found.append((entry.name, st.st_mtime, st.st_size))
                except FileNotFoundError:
                    pass  # removed meanwhile
        return found

    def _new_saved_name(self, kind: FileKind) -> str:
        return f"{uuid.uuid4().hex}.{kind.ext}"


# --------------------------------------------------------------------------- the receiver

_PREAMBLE, _AFTER_BOUNDARY, _HEADERS, _BODY, _EPILOGUE, _DONE, _ABORTED = range(7)


def _open_new(path: Path) -> IO[bytes]:
    return open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o640))


@dataclass
class _Part:
    number: int                 # 1-based position in the body
    identifier: str = ""
    filename: str | None = None
    is_file: bool = False
    size: int = 0
    head: bytearray = field(default_factory=bytearray)  # first bytes, until the type is known
    file: IO[bytes] | None = None
    temp: Path | None = None
    saved_name: str = ""

    @property
    def label(self) -> str:
        shown = f"part '{_display(self.identifier)}'"
        if self.filename:
            shown += f" ({_display(self.filename, basename=True)})"
        return shown


class MultipartReceiver:
    """Parses one multipart/form-data body fed in chunks and stores its file parts.

    The body is scanned for `CRLF--boundary`; the text before the first boundary is handled
    the same way by starting the buffer with a CRLF. Between feeds only the unconsumed tail is
    kept: at most len(delimiter) - 1 bytes inside a part, one header block otherwise."""

    def __init__(self, store: UploadStore, boundary: bytes):
        self._store = store
        self._delimiter = b"\r\n--" + boundary
        self._lookbehind = len(self._delimiter) - 1
        self._tail = b"\r\n"
        self._state = _PREAMBLE
        self._preamble = -2          # the CRLF put in front above is not the client's
        self._epilogue = 0
        self._total = 0
        self._parts = 0
        self._part: _Part | None = None
        self._identifiers: set[str] = set()
        self._complete: list[_Part] = []
        self._temps: list[Path] = []
        self._finals: list[Path] = []
        self._error: UploadError | None = None

    # -- public interface

    @contextlib.contextmanager
    def _cleanup_on_error(self):
        """Any failure removes every file of this request; an UploadError is remembered, so
        later calls repeat it."""
        try:
            yield
        except UploadError as e:
            self._error = e
            self.abort()
            raise
        except BaseException:
            self.abort()
            raise

    async def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body. On an error the request's files are already gone."""
        self._check_usable()
        if not chunk:
            return
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        with self._cleanup_on_error():
            self._consume(chunk)

    async def finish(self) -> dict[str, str]:
        """Check the body was complete, move its files into the store; {identifier: saved name}."""
        self._check_usable()
        with self._cleanup_on_error():
            if self._state != _EPILOGUE:
                raise UploadError(self._truncation_reason())
            if not self._complete:
                raise UploadError("no file part in the upload: send each file as a multipart/form-data "
                                  "field with a file name")
            result = {}
            for part in self._complete:
                assert part.temp is not None
                final = self._store.directory / part.saved_name
                os.replace(part.temp, final)
                self._finals.append(final)
                result[part.identifier] = part.saved_name
            self._state = _DONE
            self._temps.clear()
            self._finals.clear()
            return result

    def abort(self) -> None:
        """Remove every file of this request. Idempotent; does nothing once finish() succeeded."""
        if self._state == _DONE:
            return
        self._state = _ABORTED
        part, self._part = self._part, None
        if part is not None and part.file is not None:
            part.file.close()
        for path in (*self._temps, *self._finals):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove %s of an aborted upload: %s", path, e)
        self._temps.clear()
        self._finals.clear()
        self._complete.clear()
        self._tail = b""

    # -- parsing

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state == _ABORTED:
            raise UploadError("the upload was aborted")
        if self._state == _DONE:
            raise UploadError("the upload was already completed")

    def _truncation_reason(self) -> str:
        if self._state == _PREAMBLE:
            return ("malformed multipart body: the boundary given in Content-Type never appears "
                    "(truncated body or wrong boundary)")
        if self._state == _BODY and self._part is not None:
            what = self._part.label if self._part.is_file else f"part {self._part.number}"
            return f"truncated multipart body: it ended inside {what}, before the closing boundary"
        return f"truncated multipart body: it ended inside the headers of part {self._parts}"

    def _consume(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        delimiter = self._delimiter
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _BODY:
                found = data.find(delimiter, pos)
                if found < 0:
                    end = n - self._lookbehind   # the rest may be the start of a boundary
                    if end > pos:
                        self._part_data(data, pos, end)
                        pos = end
                    break
                if found > pos:
                    self._part_data(data, pos, found)
                self._end_part()
                pos = found + len(delimiter)
                self._state = _AFTER_BOUNDARY
            elif state == _PREAMBLE:
                found = data.find(delimiter, pos)
                end = found if found >= 0 else max(pos, n - self._lookbehind)
                self._preamble += end - pos
                if self._preamble > MAX_PREAMBLE_BYTES:
                    raise UploadError("malformed multipart body: no boundary within the first "
                                      f"{MAX_PREAMBLE_BYTES} bytes (wrong boundary?)")
                if found < 0:
                    pos = end
                    break
                pos = found + len(delimiter)
                self._state = _AFTER_BOUNDARY
            elif state == _AFTER_BOUNDARY:
                if n - pos < 2:
                    break
                if data[pos:pos + 2] == b"--":
                    pos += 2
                    self._state = _EPILOGUE
                    continue
                line_end = data.find(b"\r\n", pos, pos + _MAX_BOUNDARY_PADDING + 2)
                if line_end < 0:
                    if n - pos >= _MAX_BOUNDARY_PADDING + 2:
                        raise UploadError("malformed multipart body: unexpected bytes after a boundary")
                    break
                if data[pos:line_end].strip(b" \t"):
                    raise UploadError("malformed multipart body: unexpected bytes after a boundary")
                pos = line_end + 2
                self._parts += 1
                if self._parts > self._store.max_parts:
                    raise UploadError(f"too many parts in the upload: at most {self._store.max_parts}")
                self._state = _HEADERS
            elif state == _HEADERS:
                if n - pos < 2:
                    break
                if data[pos:pos + 2] == b"\r\n":
                    block_end, next_pos = pos, pos + 2          # a part with no headers at all
                else:
                    block_end = data.find(b"\r\n\r\n", pos, pos + self._store.max_header_bytes + 4)
                    if block_end < 0:
                        if n - pos >= self._store.max_header_bytes + 4:
                            raise UploadError(f"part {self._parts}: header block larger than "
                                              f"{self._store.max_header_bytes} bytes")
                        break
                    next_pos = block_end + 4
                self._begin_part(data[pos:block_end])
                pos = next_pos
                self._state = _BODY
            else:  # _EPILOGUE: ignored, within a bound
                self._epilogue += n - pos
                if self._epilogue > MAX_EPILOGUE_BYTES:
                    raise UploadError("malformed multipart body: more than "
                                      f"{MAX_EPILOGUE_BYTES} bytes after the closing boundary")
                pos = n
        self._tail = data[pos:] if pos < n else b""

    def _begin_part(self, block: bytes) -> None:
        number = self._parts
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = block.decode("latin-1")
        headers: dict[str, str] = {}
        last = None
        for line in text.split("\r\n") if text else ():
            if line[:1] in (" ", "\t") and last is not None:   # folded continuation line
                headers[last] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            name = name.strip().lower()
            if not colon or not name:
                raise UploadError(f"part {number}: malformed header line '{_display(line)}'")
            if name in headers:
                raise UploadError(f"part {number}: header '{_display(name)}' given twice")
            headers[name] = value.strip()
            last = name
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise UploadError(f"part {number}: missing Content-Disposition header")
        try:
            kind, params = _parse_header_value(disposition)
        except ValueError as e:
            raise UploadError(f"part {number}: malformed Content-Disposition header: {e}") from None
        if kind.lower() != "form-data":
            raise UploadError(f"part {number}: Content-Disposition must be form-data, got "
                              f"'{_display(kind)}'")
        filename = params.get("filename")
        if "filename*" in params:
            filename = _decode_ext_value(params["filename*"]) or filename
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        media_part = (content_type.startswith(_FILE_MEDIA_PREFIXES)
                      or content_type == "application/octet-stream")
        part = _Part(number=number, identifier=params.get("name") or "file", filename=filename,
                     is_file=filename is not None or media_part)
        encoding = headers.get("content-transfer-encoding", "").strip().lower()
        if encoding not in ("", "binary", "8bit", "7bit"):
            raise UploadError(f"{part.label}: unsupported Content-Transfer-Encoding "
                              f"'{_display(encoding)}'; send the raw bytes")
        if part.is_file:
            ident = part.identifier
            if len(ident) > MAX_IDENTIFIER_CHARS or not ident.isprintable():
                raise UploadError(f"part {number}: field name '{_display(ident)}' is not a usable "
                                  f"identifier (1 to {MAX_IDENTIFIER_CHARS} printable characters)")
            if ident in self._identifiers:
                raise UploadError(f"{part.label}: field name '{_display(ident)}' used by more than one "
                                  "file; give each file its own field name")
            self._identifiers.add(ident)
        self._part = part

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        size = end - start
        self._total += size
        if self._total > self._store.max_total_bytes:
            what = part.label if part.is_file else f"form field '{_display(part.identifier)}'"
            raise UploadError(f"upload too large: {what} takes it over the limit of "
                              f"{_size_text(self._store.max_total_bytes)} in total", status=413)
        part.size += size
        if not part.is_file:
            if part.size > self._store.max_field_bytes:
                raise UploadError(f"form field '{_display(part.identifier)}' is larger than "
                                  f"{self._store.max_field_bytes} bytes; send files with a file name")
            return
        if part.file is None:
            take = min(SNIFF_BYTES - len(part.head), size)
            part.head += data[start:start + take]
            start += take
            if len(part.head) < SNIFF_BYTES:
                return
            self._open_part_file(part, complete=False)
        if start < end:
            assert part.file is not None
            part.file.write(memoryview(data)[start:end])

    def _open_part_file(self, part: _Part, complete: bool) -> None:
        kind = detect_kind(bytes(part.head), complete=complete)
        if kind is None:
            raise UploadError(f"{part.label}: unsupported file type; accepted: {ACCEPTED_LABELS}")
        part.saved_name = self._store._new_saved_name(kind)
        part.temp = self._store.incoming / f"{part.saved_name}.part"
        self._temps.append(part.temp)          # listed before it exists: abort always finds it
        part.file = _open_new(part.temp)
        part.file.write(part.head)
        part.head = bytearray()

    def _end_part(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if not part.is_file:
            return
        if part.file is None:
            if part.size == 0:
                if not part.filename:
                    # A browser's file input left empty: no file, and the name is free again.
                    self._identifiers.discard(part.identifier)
                    return
                raise UploadError(f"{part.label}: the file is empty")
            self._part = part                  # so abort() closes the file if this fails
            self._open_part_file(part, complete=True)
            self._part = None
        assert part.file is not None
        part.file.close()
        part.file = None
        self._complete.append(part)
