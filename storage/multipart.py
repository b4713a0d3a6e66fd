"""multipart/form-data: header parameter parsing (RFC 7578, RFC 5987 `filename*`) and a
streaming receiver that writes a request's file parts to files.

`MultipartReceiver` is fed the request body chunk by chunk from a `@stream_request_body`
handler's `data_received`. It keeps only a bounded window in memory (the look-behind needed to
spot a boundary split across chunks, one part's header block, the first bytes of a file used
to recognise its type) and writes file bytes straight to the store's incoming directory. Only
when the whole request was received and valid are the files renamed into place; any failure
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from .filetypes import ACCEPTED_LABELS, SNIFF_BYTES, FileKind, detect_kind

log = logging.getLogger("bridge.uploads")

MAX_PARTS = 64
MAX_HEADER_BYTES = 8 * 1024   # one part's header block
MAX_FIELD_BYTES = 64 * 1024   # one plain (non-file) form field
MAX_PREAMBLE_BYTES = 64 * 1024   # text before the first boundary
MAX_EPILOGUE_BYTES = 64 * 1024   # text after the closing boundary
MAX_IDENTIFIER_CHARS = 128
_MAX_BOUNDARY_PADDING = 64    # whitespace allowed between a boundary and its line end


class UploadError(Exception):
    """An upload the bridge refuses. `str(e)` is safe to show to the client."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


# --------------------------------------------------------------------------- headers and message text

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


def display_text(text: str, limit: int = 64, basename: bool = False) -> str:
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


def form_data_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; UploadError(400) for anything else."""
    try:
        main, params = _parse_header_value(content_type or "")
    except ValueError as e:
        raise UploadError(f"malformed Content-Type header: {e}") from None
    if main.lower() != "multipart/form-data":
        shown = display_text(main) or "(none)"
        raise UploadError(f"expected Content-Type multipart/form-data, got '{shown}'")
    boundary = params.get("boundary", "")
    if not boundary:
        raise UploadError("Content-Type multipart/form-data has no boundary parameter")
    if not _BOUNDARY_CHARS.fullmatch(boundary):
        raise UploadError(f"invalid multipart boundary '{display_text(boundary, 80)}'")
    return boundary.encode("ascii")


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
    hasher: object | None = None   # the receiver's `new_hasher()`, fed the file's bytes

    @property
    def label(self) -> str:
        shown = f"part '{display_text(self.identifier)}'"
        if self.filename:
            shown += f" ({display_text(self.filename, basename=True)})"
        return shown


class MultipartReceiver:
    """Parses one multipart/form-data body fed in chunks and stores its file parts.

    The body is scanned for `CRLF--boundary`; the text before the first boundary is handled
    the same way by starting the buffer with a CRLF. Between feeds only the unconsumed tail is
    kept: at most len(delimiter) - 1 bytes inside a part, one header block otherwise."""

    def __init__(self, boundary: bytes, *, directory: Path, incoming: Path,
                 new_name: Callable[[FileKind], str], max_total_bytes: int, max_parts: int,
                 max_header_bytes: int, max_field_bytes: int,
                 detect: Callable[..., FileKind | None] = detect_kind, keep_fields: bool = False,
                 new_hasher: Callable[[], object] | None = None):
        """Finished files are renamed into `directory`, under `new_name(kind)`; while being
        received they are `<incoming>/<that name>.part`. `detect(head, complete=)` names a
        file's kind (None: refused); with `keep_fields` the plain fields' values are kept in
        `fields`; with `new_hasher` (e.g. blake3) each file's digest is computed on the way in
        and left in `digests` (hex, by field name)."""
        self._directory = directory
        self._incoming = incoming
        self._new_name = new_name
        self._max_total_bytes = max_total_bytes
        self._max_parts = max_parts
        self._max_header_bytes = max_header_bytes
        self._max_field_bytes = max_field_bytes
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
        self._detect = detect
        self._keep_fields = keep_fields
        self._new_hasher = new_hasher
        self.fields: dict[str, str] = {}
        self.digests: dict[str, str] = {}

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
                final = self._directory / part.saved_name
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
                if self._parts > self._max_parts:
                    raise UploadError(f"too many parts in the upload: at most {self._max_parts}")
                self._state = _HEADERS
            elif state == _HEADERS:
                if n - pos < 2:
                    break
                if data[pos:pos + 2] == b"\r\n":
                    block_end, next_pos = pos, pos + 2          # a part with no headers at all
                else:
                    block_end = data.find(b"\r\n\r\n", pos, pos + self._max_header_bytes + 4)
                    if block_end < 0:
                        if n - pos >= self._max_header_bytes + 4:
                            raise UploadError(f"part {self._parts}: header block larger than "
                                              f"{self._max_header_bytes} bytes")
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
                raise UploadError(f"part {number}: malformed header line '{display_text(line)}'")
            if name in headers:
                raise UploadError(f"part {number}: header '{display_text(name)}' given twice")
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
                              f"'{display_text(kind)}'")
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
                              f"'{display_text(encoding)}'; send the raw bytes")
        if part.is_file:
            ident = part.identifier
            if len(ident) > MAX_IDENTIFIER_CHARS or not ident.isprintable():
                raise UploadError(f"part {number}: field name '{display_text(ident)}' is not a usable "
                                  f"identifier (1 to {MAX_IDENTIFIER_CHARS} printable characters)")
            if ident in self._identifiers:
                raise UploadError(f"{part.label}: field name '{display_text(ident)}' used by more than one "
                                  "file; give each file its own field name")
            self._identifiers.add(ident)
        self._part = part

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        size = end - start
        self._total += size
        if self._total > self._max_total_bytes:
            what = part.label if part.is_file else f"form field '{display_text(part.identifier)}'"
            raise UploadError(f"upload too large: {what} takes it over the limit of "
                              f"{_size_text(self._max_total_bytes)} in total", status=413)
        part.size += size
        if not part.is_file:
            if part.size > self._max_field_bytes:
                raise UploadError(f"form field '{display_text(part.identifier)}' is larger than "
                                  f"{self._max_field_bytes} bytes; send files with a file name")
            if self._keep_fields:
                part.head += data[start:end]
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
            chunk = memoryview(data)[start:end]
            part.file.write(chunk)
            if part.hasher is not None:
                part.hasher.update(chunk)

    def _open_part_file(self, part: _Part, complete: bool) -> None:
        kind = self._detect(bytes(part.head), complete=complete)
        if kind is None:
            raise UploadError(f"{part.label}: unsupported file type; accepted: {ACCEPTED_LABELS}")
        part.saved_name = self._new_name(kind)
        part.temp = self._incoming / f"{part.saved_name}.part"
        self._temps.append(part.temp)          # listed before it exists: abort always finds it
        part.file = _open_new(part.temp)
        part.file.write(part.head)
        if self._new_hasher is not None:
            part.hasher = self._new_hasher()
            part.hasher.update(part.head)
        part.head = bytearray()

    def _end_part(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if not part.is_file:
            if self._keep_fields:
                self.fields[part.identifier] = bytes(part.head).decode("utf-8", "replace")
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
        if part.hasher is not None:
            self.digests[part.identifier] = part.hasher.hexdigest()
        self._complete.append(part)
