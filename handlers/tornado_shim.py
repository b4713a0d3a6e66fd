"""The bridge's only uses of tornado's private behaviour, each in one named place (tornado is
pinned); tests/test_core_units.py checks each still works with the pinned tornado.

`write_text_frame_nowait` sends a websocket text frame without the Task that tornado's
`write_message` wraps around every frame: with thousands of sockets those Tasks are most of
a heartbeat's cost, and the ones still pending when the garbage collector runs get promoted
and trigger full collections (hundreds of ms with 10,000 sockets).

`on_read_limit` lets the bridge answer a header block over `max_header_size` (431), where
tornado closes the connection without a word.
"""
from __future__ import annotations

from typing import Callable

from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError


def write_text_frame_nowait(handler, payload: bytes) -> bool:
    """Write `payload` as one text frame; False when this tornado (or a compressing
    connection) does not allow it, and the caller must use `write_message`."""
    conn = handler.ws_connection
    write_frame = getattr(conn, "_write_frame", None)
    if write_frame is None or getattr(conn, "_compressor", None) is not None:
        return False
    if conn.is_closing():
        return True
    try:
        write_frame(True, 0x1, payload)
    except StreamClosedError:
        pass  # on_close follows
    return True


def on_read_limit(stream: IOStream, callback: Callable[[], None]) -> None:
    """Call `callback` when tornado gives up on `stream` because a read went past its
    `max_bytes` (a header block over `max_header_size`, a chunk-size line too long).

    tornado then closes the stream at once, passing the `UnsatisfiableReadError` to
    `stream.close`; `callback` runs just before, while `stream.socket` is still open (it may
    take a `dup()` of it to answer on)."""
    close = stream.close

    def closing(exc_info=False) -> None:
        try:
            if isinstance(exc_info, UnsatisfiableReadError) and not stream.closed():
                callback()
        finally:
            close(exc_info)

    stream.close = closing  # type: ignore[method-assign]
