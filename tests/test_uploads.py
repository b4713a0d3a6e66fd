"""storage.filetypes, storage.multipart and storage.uploads: file-type sniffing, the streaming multipart receiver and the upload store.

Bodies are built by hand and fed in chunks of every shape; each test also checks what is
left on disk, since a failed upload must leave nothing behind.
"""
from __future__ import annotations

import asyncio
import io
import os
import re
import string
import struct
import tempfile
import time
import tracemalloc
import wave
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from storage.filetypes import SNIFF_BYTES, detect_kind
from storage.multipart import UploadError
from storage.uploads import UploadStore

BOUNDARY = "----bridgeTestBoundary7MA4YWxk"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
SAVED = re.compile(r"[0-9a-f]{32}\.[a-z0-9]{3,4}")


# --------------------------------------------------------------------------- sample files

def _pillow(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 90)).save(out, fmt)
    return out.getvalue()


def _ftyp(brand: bytes) -> bytes:
    box = struct.pack(">I4s4sI4s4s", 24, b"ftyp", brand, 0x200, brand, b"isom")
    return box + struct.pack(">I4s", 16, b"mdat") + bytes(8)


def _ebml(doctype: bytes) -> bytes:
    children = (b"\x42\x86\x81\x01"                       # EBMLVersion 1
                + b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype
                + b"\x42\x87\x81\x04")                    # DocTypeVersion 4
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(children)]) + children + b"\x18\x53\x80\x67\x01" + bytes(16)


def _wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(400))
    return out.getvalue()


# MPEG-1 Layer III, 128 kbit/s, 44.1 kHz: frames of 144 * 128000 // 44100 = 417 bytes.
MP3_FRAME = b"\xff\xfb\x90\x00" + bytes(413)
MP3 = MP3_FRAME * 3

SAMPLES = {
    "png": _pillow("PNG"),
    "jpeg": _pillow("JPEG"),
    "webp": _pillow("WEBP"),
    "gif": _pillow("GIF"),
    "bmp": _pillow("BMP"),
    "tiff": _pillow("TIFF"),
    "mp4": _ftyp(b"isom"),
    "mov": _ftyp(b"qt  "),
    "webm": _ebml(b"webm"),
    "mkv": _ebml(b"matroska"),
    "wav": _wav(),
    "mp3": MP3,
    "flac": b"fLaC" + b"\x80\x00\x00\x22" + bytes(34),
    "ogg": b"OggS\x00\x02" + bytes(20) + b"\x01\x1e" + b"\x01vorbis" + bytes(23),
}
EXPECTED = {  # label -> (saved extension, media type)
    "png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp"),
    "gif": ("gif", "image/gif"), "bmp": ("bmp", "image/bmp"), "tiff": ("tiff", "image/tiff"),
    "mp4": ("mp4", "video/mp4"), "mov": ("mov", "video/quicktime"), "webm": ("webm", "video/webm"),
    "mkv": ("mkv", "video/x-matroska"), "wav": ("wav", "audio/wav"), "mp3": ("mp3", "audio/mpeg"),
    "flac": ("flac", "audio/flac"), "ogg": ("ogg", "audio/ogg"),
}
EXE = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(120)


# --------------------------------------------------------------------------- body builders

def file_part(name: str | None, content: bytes, filename: str | None = "upload.bin",
              content_type: str | None = "application/octet-stream", extra: str = "") -> bytes:
    disposition = "form-data"
    if name is not None:
        disposition += f'; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"Content-Disposition: {disposition}\r\n{extra}"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + content


def field_part(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def multipart(parts: list[bytes], boundary: str = BOUNDARY) -> bytes:
    b = boundary.encode()
    return b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


async def upload(store: UploadStore, chunks, content_type: str = CONTENT_TYPE) -> dict[str, str]:
    receiver = store.receiver(content_type)
    for chunk in chunks:
        await receiver.feed(chunk)
    return await receiver.finish()


def files_under(directory: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), directory)
                  for root, _, names in os.walk(directory) for f in names)


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads", 1024 * 1024)


# --------------------------------------------------------------------------- file types

@pytest.mark.parametrize("padding", [0, 3 * SNIFF_BYTES], ids=["small", "past-sniff-window"])
@pytest.mark.parametrize("label", sorted(SAMPLES))
async def test_each_accepted_type_is_recognised_by_content(store, label, padding):
    content = SAMPLES[label] + bytes(padding)
    # The client's name and type say nothing true: only the content decides.
    body = multipart([file_part("media", content, filename="whatever.bin", content_type="text/x-nonsense")])
    result = await upload(store, split(body, 1000))
    name = result["media"]
    ext, media_type = EXPECTED[label]
    assert name.endswith("." + ext) and SAVED.fullmatch(name)
    assert store.media_type(name) == media_type
    assert store.path(name).read_bytes() == content
    assert files_under(store.directory) == [name]


@pytest.mark.parametrize("data", [
    _ftyp(b"heic"),                        # HEIF still image, not a video
    _ftyp(b"avif"),
    _ebml(b"other"),                       # EBML, but neither webm nor matroska
    b"BM" + bytes(30),                     # "BM" without a plausible bitmap header
    b"\xff\xf1\x50\x80" + bytes(400),      # AAC in ADTS: frame sync, but not Layer III
    MP3_FRAME + b"not a second frame",     # one frame header followed by garbage
    b"\x89PNG\r\n\x1a\n" + bytes(8),       # PNG signature without IHDR
    b"RIFF\x00\x00\x00\x00AVI LIST",       # RIFF, but a video type not on the list
    b"%PDF-1.7\n",
    b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    b"",
], ids=["heic", "avif", "ebml-other", "bm-only", "adts", "mp3-one-frame", "png-no-ihdr", "avi", "pdf", "svg", "empty"])
def test_lookalikes_are_not_recognised(data):
    assert detect_kind(data, complete=False) is None
    assert detect_kind(data, complete=True) is None


def test_single_mp3_frame_is_accepted_only_as_a_whole_file():
    assert detect_kind(MP3_FRAME, complete=True).label == "mp3"
    assert detect_kind(b"ID3\x04\x00\x00\x00\x00\x01\x00" + MP3_FRAME).label == "mp3"
    assert detect_kind(MP3_FRAME[:100], complete=True) is None


async def test_wrong_content_with_an_image_extension_is_refused(store):
    body = multipart([file_part("photo", EXE, filename="cat.png", content_type="image/png")])
    with pytest.raises(UploadError) as err:
        await upload(store, [body])
    assert err.value.status == 400
    assert "part 'photo' (cat.png)" in str(err.value)
    assert "unsupported file type" in str(err.value) and "png, jpeg" in str(err.value)
    assert files_under(store.directory) == []


async def test_large_unsupported_part_is_refused_while_streaming(store):
    body = multipart([file_part("doc", b"%PDF-1.7\n" + bytes(200_000), filename="a.jpg")])
    receiver = store.receiver(CONTENT_TYPE)
    with pytest.raises(UploadError, match="unsupported file type"):
        # The type is decided after SNIFF_BYTES, long before the body ends.
        for chunk in split(body[:SNIFF_BYTES * 2], 512):
            await receiver.feed(chunk)
    assert files_under(store.directory) == []


# --------------------------------------------------------------------------- chunking

def _run(coro):
    return asyncio.run(coro)


async def _outcome(directory: Path, chunks: list[bytes], boundary: str):
    """What an upload produced: per identifier the extension and bytes, or the error."""
    store = UploadStore(directory, 1024 * 1024)
    try:
        result = await upload(store, chunks, f'multipart/form-data; boundary="{boundary}"')
    except UploadError as e:
        assert files_under(directory) == []
        return ("error", e.status, str(e))
    return ("ok", {ident: (name.rsplit(".", 1)[1], store.path(name).read_bytes())
                   for ident, name in result.items()})


BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_result_does_not_depend_on_chunking(data):
    boundary = data.draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70), label="boundary")
    parts, contents = [], []
    for i in range(data.draw(st.integers(1, 3), label="parts")):
        kind = data.draw(st.sampled_from(["png", "gif", "mp3", "wav", "garbage"]))
        payload = data.draw(st.binary(max_size=300))
        # Near-misses of the delimiter inside the content must come through unchanged.
        cut = data.draw(st.integers(0, len(boundary) - 1))
        near_miss = b"\r\n--" + boundary[:cut].encode() + b"\x00"
        content = (EXE if kind == "garbage" else SAMPLES[kind]) + payload + near_miss + payload
        contents.append(content)
        parts.append(file_part(f"id{i}", content))
        if data.draw(st.booleans()):
            parts.append(field_part(f"note{i}", payload))
    delimiter = b"\r\n--" + boundary.encode()
    assume(not any(delimiter in c for c in contents))
    body = multipart(parts, boundary)
    if data.draw(st.booleans(), label="one byte at a time"):
        chunks = split(body, 1)
    else:
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(body)), max_size=30), label="cuts")))
        edges = [0, *cuts, len(body)]
        chunks = [body[a:b] for a, b in zip(edges, edges[1:])]
    assert b"".join(chunks) == body
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
        expected = _run(_outcome(Path(one), [body], boundary))
        assert _run(_outcome(Path(many), chunks, boundary)) == expected
    if expected[0] == "ok":
        assert [content for _, content in expected[1].values()] == contents


async def test_every_split_point_inside_the_boundaries(tmp_path):
    body = multipart([file_part("a", SAMPLES["gif"]), field_part("x", b"y"), file_part("b", SAMPLES["png"])])
    reference = await _outcome(tmp_path / "ref", [body], BOUNDARY)
    assert reference[0] == "ok" and set(reference[1]) == {"a", "b"}
    for i in range(len(body) + 1):
        assert await _outcome(tmp_path / f"s{i}", [body[:i], body[i:]], BOUNDARY) == reference, i


# --------------------------------------------------------------------------- identifiers and names

async def test_several_parts_map_identifiers_to_unique_names(store):
    body = multipart([
        file_part("identifier_1", SAMPLES["png"], filename="a.png"),
        field_part("comment", b"plain fields are ignored"),
        file_part("identifier_2", SAMPLES["jpeg"], filename="b.jpg"),
        file_part("clip", SAMPLES["webm"], filename="c.webm"),
    ])
    result = await upload(store, split(body, 7))
    assert set(result) == {"identifier_1", "identifier_2", "clip"}
    assert len(set(result.values())) == 3
    assert all(SAVED.fullmatch(n) for n in result.values())
    assert store.path(result["identifier_2"]).read_bytes() == SAMPLES["jpeg"]
    assert sorted(n for n, _, _ in store.list()) == sorted(result.values())


@pytest.mark.parametrize("name", ["", None], ids=["empty-name", "no-name"])
async def test_identifier_defaults_to_file(store, name):
    result = await upload(store, [multipart([file_part(name, SAMPLES["png"])])])
    assert list(result) == ["file"]


async def test_same_file_twice_gets_two_names(store):
    body = multipart([file_part("x", SAMPLES["png"], filename="same.png")])
    first, second = await upload(store, [body]), await upload(store, [body])
    assert first["x"] != second["x"]


async def test_saved_name_ignores_the_client_path(store, tmp_path):
    body = multipart([file_part("x", SAMPLES["png"], filename="../../../etc/evil.sh")])
    name = (await upload(store, [body]))["x"]
    assert SAVED.fullmatch(name) and "evil" not in name
    assert files_under(tmp_path) == ["uploads/" + name]


async def test_duplicate_field_name_is_refused(store):
    body = multipart([file_part("img", SAMPLES["png"]), file_part("img", SAMPLES["gif"], filename="b.gif")])
    with pytest.raises(UploadError, match="field name 'img' used by more than one file") as err:
        await upload(store, [body])
    assert err.value.status == 400
    assert files_under(store.directory) == []


async def test_plain_fields_only_is_refused(store):
    with pytest.raises(UploadError, match="no file part"):
        await upload(store, [multipart([field_part("a", b"1"), field_part("b", b"2")])])


async def test_empty_browser_file_input_is_skipped(store):
    body = multipart([file_part("unused", b"", filename=""), file_part("used", SAMPLES["png"])])
    assert list(await upload(store, [body])) == ["used"]


async def test_empty_named_file_is_refused(store):
    with pytest.raises(UploadError, match=r"part 'x' \(empty\.png\): the file is empty"):
        await upload(store, [multipart([file_part("x", b"", filename="empty.png")])])


async def test_part_with_a_media_type_but_no_file_name_counts_as_a_file(store):
    body = multipart([file_part("raw", SAMPLES["png"], filename=None, content_type="image/png")])
    assert list(await upload(store, [body])) == ["raw"]


async def test_non_file_fields_with_a_data_type_are_ignored(store):
    json_field = b'Content-Disposition: form-data; name="meta"\r\nContent-Type: application/json\r\n\r\n{}'
    body = multipart([json_field, file_part("f", SAMPLES["png"])])
    assert list(await upload(store, [body])) == ["f"]


async def test_rfc5987_file_name_shows_in_messages(store):
    body = multipart([file_part("x", EXE, filename=None)
                      .replace(b'name="x"', b"name=\"x\"; filename*=UTF-8''%E2%82%AC.png")])
    with pytest.raises(UploadError, match="part 'x' \\(€.png\\)"):
        await upload(store, [body])


async def test_client_strings_in_messages_are_sanitised(store):
    nasty = "dir\\sub/" + "a\x1b[31m" + "x" * 300 + ".png"
    with pytest.raises(UploadError) as err:
        await upload(store, [multipart([file_part("p", EXE, filename=nasty)])])
    message = str(err.value)
    assert "\x1b" not in message and "dir" not in message and "sub/" not in message
    assert len(message) < 250 and "…" in message


# --------------------------------------------------------------------------- limits

async def test_exactly_the_limit_is_accepted_one_more_byte_is_413(tmp_path):
    limit = 10_000
    exact = SAMPLES["png"] + bytes(limit - len(SAMPLES["png"]))
    ok = UploadStore(tmp_path / "ok", limit)
    assert list(await upload(ok, split(multipart([file_part("f", exact)]), 999))) == ["f"]
    over = UploadStore(tmp_path / "over", limit)
    with pytest.raises(UploadError) as err:
        await upload(over, split(multipart([file_part("f", exact + b"!")]), 999))
    assert err.value.status == 413
    assert files_under(over.directory) == []


async def test_limit_counts_all_parts_and_removes_finished_ones(tmp_path):
    store = UploadStore(tmp_path / "u", 50_000)
    first = SAMPLES["png"] + bytes(30_000)
    second = SAMPLES["gif"] + bytes(30_000)
    body = multipart([file_part("a", first), file_part("b", second)])
    receiver = store.receiver(CONTENT_TYPE)
    fed = 0
    with pytest.raises(UploadError) as err:
        for chunk in split(body, 4096):
            await receiver.feed(chunk)
            fed += len(chunk)
            if fed > len(first) + 1000:
                # Part "a" is complete and on disk (still in .incoming) by now.
                assert files_under(store.directory) != []
    assert err.value.status == 413 and "part 'b'" in str(err.value)
    assert fed < len(body) - 4096           # refused while streaming, not at the end
    receiver.abort()
    assert files_under(store.directory) == []
    assert (store.directory / ".incoming").is_dir()


async def test_413_comes_as_soon_as_the_limit_is_passed(tmp_path):
    store = UploadStore(tmp_path / "u", 100_000)
    receiver = store.receiver(CONTENT_TYPE)
    head = multipart([file_part("big", b"")]).split(b"\r\n--" + BOUNDARY.encode() + b"--")[0]
    await receiver.feed(head + SAMPLES["png"])
    chunk = bytes(65536)
    await receiver.feed(chunk)               # about 64 KiB: under the limit
    with pytest.raises(UploadError) as err:
        await receiver.feed(chunk)           # about 128 KiB: over it
    assert err.value.status == 413
    assert str(err.value) == "upload too large: part 'big' (upload.bin) takes it over the limit of 100000 bytes in total"
    assert files_under(store.directory) == []


async def test_too_many_parts(tmp_path):
    store = UploadStore(tmp_path / "u", 1024 * 1024, max_parts=5)
    body = multipart([file_part(f"f{i}", SAMPLES["gif"]) for i in range(6)])
    with pytest.raises(UploadError, match="too many parts"):
        await upload(store, [body])
    assert files_under(store.directory) == []
    assert len(await upload(store, [multipart([file_part(f"f{i}", SAMPLES["gif"]) for i in range(5)])])) == 5


async def test_plain_field_is_bounded(store):
    body = multipart([field_part("essay", b"x" * (64 * 1024 + 1)), file_part("f", SAMPLES["png"])])
    with pytest.raises(UploadError, match="form field 'essay' is larger than 65536 bytes"):
        await upload(store, split(body, 4096))
    small = multipart([field_part("essay", b"x" * (64 * 1024)), file_part("f", SAMPLES["png"])])
    assert list(await upload(store, [small])) == ["f"]


async def test_header_block_is_bounded(store):
    huge = file_part("f", SAMPLES["png"], extra="X-Padding: " + "p" * 9000 + "\r\n")
    with pytest.raises(UploadError, match="header block larger than"):
        await upload(store, split(multipart([huge]), 100))
    # Without any blank line at all, the receiver gives up instead of buffering forever.
    receiver = store.receiver(CONTENT_TYPE)
    await receiver.feed(f"--{BOUNDARY}\r\n".encode())
    with pytest.raises(UploadError, match="header block larger than"):
        for _ in range(100):
            await receiver.feed(b"X-A: b\r\n" * 128)


async def test_memory_stays_bounded_for_a_large_part(tmp_path):
    size = 50 * 1024 * 1024
    filler = bytes(range(256)) * 256                      # 64 KiB, reused: the test holds no body
    store = UploadStore(tmp_path / "u", size + 4096)
    head = multipart([file_part("big", b"")]).split(b"\r\n--" + BOUNDARY.encode() + b"--")[0]
    receiver = store.receiver(CONTENT_TYPE)
    tracemalloc.start()
    try:
        await receiver.feed(head + SAMPLES["png"])
        for _ in range(size // len(filler)):
            await receiver.feed(filler)
        await receiver.feed(f"\r\n--{BOUNDARY}--\r\n".encode())
        result = await receiver.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, f"peak traced memory {peak} bytes"
    assert store.path(result["big"]).stat().st_size == len(SAMPLES["png"]) + size


# --------------------------------------------------------------------------- malformed bodies

def _truncations() -> list[tuple[str, bytes, str]]:
    body = multipart([file_part("a", SAMPLES["png"] + bytes(9000)), file_part("b", SAMPLES["gif"])])
    closing = f"\r\n--{BOUNDARY}--\r\n".encode()
    second = body.index(b'name="b"')
    return [
        ("in-part-body", body[:5000], "ended inside part 'a'"),
        ("in-headers", body[:second + 5], "inside the headers of part 2"),
        ("after-boundary-line", body[:second - len("Content-Disposition: form-data; ")], "headers of part 2"),
        ("no-closing-boundary", body[:-len(closing)], "ended inside part 'b'"),
        ("closing-boundary-half", body[:-len(closing) + 6], "ended inside part 'b'"),
        ("empty", b"", "boundary given in Content-Type never appears"),
    ]


@pytest.mark.parametrize("body,reason", [t[1:] for t in _truncations()], ids=[t[0] for t in _truncations()])
async def test_truncated_body_is_400_and_leaves_nothing(store, body, reason):
    with pytest.raises(UploadError) as err:
        await upload(store, split(body, 1024) if body else [])
    assert err.value.status == 400 and reason in str(err.value)
    assert files_under(store.directory) == []


@pytest.mark.parametrize("content_type,reason", [
    ("application/json", "expected Content-Type multipart/form-data, got 'application/json'"),
    ("", "got '(none)'"),
    ("multipart/form-data", "no boundary"),
    ("multipart/form-data; boundary=", "no boundary"),
    ('multipart/form-data; boundary="unterminated', "malformed Content-Type"),
    ("multipart/form-data; boundary=" + "b" * 71, "invalid multipart boundary"),
    ("multipart/form-data; boundary=a\x00b", "invalid multipart boundary"),
])
def test_bad_content_type(store, content_type, reason):
    with pytest.raises(UploadError) as err:
        store.receiver(content_type)
    assert err.value.status == 400 and reason in str(err.value)


def test_quoted_boundary_and_case_are_understood(store):
    store.receiver('Multipart/Form-Data; charset=utf-8; boundary="a b:c"')


@pytest.mark.parametrize("body,reason", [
    (f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--\r\n", "malformed header line 'no colon here'"),
    (f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\nx\r\n--{BOUNDARY}--\r\n", "missing Content-Disposition"),
    (f"--{BOUNDARY}\r\n\r\nx\r\n--{BOUNDARY}--\r\n", "missing Content-Disposition"),
    (f'--{BOUNDARY}\r\nContent-Disposition: attachment; name="f"\r\n\r\nx\r\n--{BOUNDARY}--\r\n',
     "must be form-data, got 'attachment'"),
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f\r\n\r\nx\r\n--{BOUNDARY}--\r\n',
     "malformed Content-Disposition"),
    (f'--{BOUNDARY}junk\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n--{BOUNDARY}--\r\n',
     "unexpected bytes after a boundary"),
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n'
     f"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--{BOUNDARY}--\r\n", "Content-Transfer-Encoding 'base64'"),
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{"n" * 129}"; filename="a"\r\n\r\nx\r\n--{BOUNDARY}--\r\n',
     "is not a usable identifier"),
    ("x" * 70_000, "no boundary within the first"),
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nGIF89a\r\n--{BOUNDARY}--'
     + "e" * 70_000, "after the closing boundary"),
], ids=["no-colon", "no-disposition", "no-headers", "not-form-data", "unterminated-quote",
        "junk-after-boundary", "base64", "long-identifier", "no-boundary-at-all", "long-epilogue"])
async def test_malformed_parts_are_400(store, body, reason):
    with pytest.raises(UploadError) as err:
        await upload(store, split(body.encode(), 333))
    assert err.value.status == 400 and reason in str(err.value)
    assert files_under(store.directory) == []


async def test_preamble_epilogue_and_padding_are_tolerated(store):
    body = (b"This is a preamble.\r\n" + multipart([file_part("f", SAMPLES["png"])])
            .replace(f"--{BOUNDARY}\r\n".encode(), f"--{BOUNDARY} \t\r\n".encode()) + b"epilogue text")
    assert list(await upload(store, split(body, 3))) == ["f"]


# --------------------------------------------------------------------------- abort and reuse

async def test_abort_is_idempotent_and_removes_partial_files(store):
    receiver = store.receiver(CONTENT_TYPE)
    body = multipart([file_part("a", SAMPLES["gif"]), file_part("b", SAMPLES["png"] + bytes(50_000))])
    await receiver.feed(body[:30_000])
    assert len(files_under(store.directory)) == 2          # one finished, one partial
    receiver.abort()
    receiver.abort()
    assert files_under(store.directory) == []
    with pytest.raises(UploadError, match="aborted"):
        await receiver.feed(body[30_000:])
    with pytest.raises(UploadError, match="aborted"):
        await receiver.finish()


async def test_abort_after_success_keeps_the_files(store):
    receiver = store.receiver(CONTENT_TYPE)
    await receiver.feed(multipart([file_part("a", SAMPLES["gif"])]))
    name = (await receiver.finish())["a"]
    receiver.abort()
    assert store.exists(name)


async def test_errors_repeat_after_failure(store):
    receiver = store.receiver(CONTENT_TYPE)
    with pytest.raises(UploadError) as first:
        await receiver.feed(multipart([file_part("a", EXE)]))
    with pytest.raises(UploadError) as again:
        await receiver.finish()
    assert str(again.value) == str(first.value)


# --------------------------------------------------------------------------- store lookups

async def test_lookups_refuse_names_the_store_did_not_issue(store, tmp_path):
    name = (await upload(store, [multipart([file_part("f", SAMPLES["png"])])]))["f"]
    (tmp_path / "secret.png").write_bytes(SAMPLES["png"])
    (store.directory / "planted.png").write_bytes(SAMPLES["png"])
    absent = "0" * 32 + ".png"
    bad = ["../secret.png", str(tmp_path / "secret.png"), "/etc/passwd", name + "\x00",
           name[:-4] + "\x00.png", "planted.png", name.upper(), name + "/", "./" + name,
           name[:-4] + ".exe", name + "\n", "", ".incoming", None, 42]
    for candidate in bad:
        assert store.exists(candidate) is False, candidate
        with pytest.raises(ValueError):
            store.path(candidate)
        with pytest.raises(ValueError):
            store.remove(candidate)
    assert store.exists(absent) is False
    with pytest.raises(ValueError):
        store.path(absent)
    store.remove(absent)                                  # well formed but gone: nothing to do
    assert store.exists(name) and store.path(name) == store.directory / name
    assert [entry[0] for entry in store.list()] == [name]
    store.remove(name)
    assert not store.exists(name) and store.list() == []
    assert (store.directory / "planted.png").exists()     # never touched


async def test_list_reports_mtime_and_size(store):
    before = time.time()
    name = (await upload(store, [multipart([file_part("f", SAMPLES["wav"])])]))["f"]
    [(listed, mtime, size)] = store.list()
    assert listed == name and size == len(SAMPLES["wav"]) and mtime >= before - 2


async def test_saved_files_are_not_world_readable(store):
    name = (await upload(store, [multipart([file_part("f", SAMPLES["png"])])]))["f"]
    assert store.path(name).stat().st_mode & 0o007 == 0


def test_stale_incoming_files_are_removed_at_start(tmp_path):
    UploadStore(tmp_path / "u", 100)
    stale = tmp_path / "u" / ".incoming" / "old.part"
    fresh = tmp_path / "u" / ".incoming" / "new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    UploadStore(tmp_path / "u", 100)
    assert not stale.exists() and fresh.exists()
