"""The bridge's only use of a private tornado API, in one named place (tornado is pinned).

`write_text_frame_nowait` sends a websocket text frame without the Task that tornado's
`write_message` wraps around every frame: with thousands of sockets those Tasks are most of
a heartbeat's cost, and the ones still pending when the garbage collector runs get promoted
and trigger full collections (hundreds of ms with 10,000 sockets). tests/test_core_units.py
checks that it still works with the pinned tornado.
"""
from __future__ import annotations

from tornado.iostream import StreamClosedError


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
