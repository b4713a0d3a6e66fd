#!/usr/bin/env python3
"""A 500 MB upload through POST /upload: the bridge's peak RSS growth and the throughput.

The file is an MP4 by content (an `ftyp` box with brand `isom`, then zeros), so the upload
store's content sniffing accepts it; it is sent as one multipart/form-data part over a plain
socket (sendall of 1 MiB slices of one zero buffer: the client costs next to nothing).
UPLOAD_MAX_SIZE=600.

Figures per run:
  peak RSS growth  max bridge RSS during the upload - RSS just before it; the peak is the
                   kernel's VmHWM (reset through /proc/PID/clear_refs before the upload) and,
                   as a check, VmRSS sampled every 2 ms by a thread of this process.
  throughput       file bytes / (response received - first byte sent), in MB/s (10^6 bytes).
For scale: a bare Python receiver (recv() 64 KiB at a time from a loopback socket, write() to a
file on the same disk, no HTTP) moves the same bytes; bridge / bare receiver is a ratio that
depends little on the machine.

    .venv/bin/python bench/upload.py                  # 5 runs x 500 MiB
    .venv/bin/python bench/upload.py --runs 1 --profile /tmp/upload.pyspy
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

GOAL_RSS_MB = 32.0
GOAL_MBPS = 300.0
MIB = 1024 * 1024
MP4_HEAD = (0x18).to_bytes(4, "big") + b"ftypisom" + (0x200).to_bytes(4, "big") + b"isomiso2"


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.002):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak_kb = max(self.peak_kb, c.rss_kb(self.pid))
            except (OSError, KeyError):
                return
            time.sleep(self.interval)


def send_upload(port: int, size: int) -> tuple[float, int, bytes]:
    boundary = os.urandom(16).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + MP4_HEAD
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + (size - len(MP4_HEAD)) + len(tail)
    request = (f"POST /upload HTTP/1.1\r\nHost: {c.LOOPBACK}:{port}\r\nContent-Length: {length}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    zeros = memoryview(bytes(MIB))
    sock = socket.create_connection((c.LOOPBACK, port))
    try:
        t0 = time.perf_counter()
        sock.sendall(request + head)
        left = size - len(MP4_HEAD)
        while left > 0:
            n = min(left, MIB)
            sock.sendall(zeros[:n])
            left -= n
        sock.sendall(tail)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        header, _, body = response.partition(b"\r\n\r\n")
        want = int([line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
        while len(body) < want:
            body += sock.recv(65536)
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    return elapsed, int(header.split(b" ")[1]), body


def receiver_reference(directory: Path, size: int) -> float:
    """MB/s of a minimal Python receiver doing the bridge's bare job: recv() 64 KiB at a time
    from a loopback socket and write it to a new file in `directory` (no HTTP, no parsing)."""
    path = directory / "receiver-reference.bin"
    listener = socket.create_server((c.LOOPBACK, 0))
    port = listener.getsockname()[1]
    received = []

    def receive() -> None:
        conn, _ = listener.accept()
        buf = bytearray(64 * 1024)
        view = memoryview(buf)
        total = 0
        with conn, open(path, "wb") as out:
            while total < size:
                n = conn.recv_into(view)
                if not n:
                    break
                out.write(view[:n])
                total += n
        received.append(time.perf_counter())

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    zeros = memoryview(bytes(MIB))
    t0 = time.perf_counter()
    with socket.create_connection((c.LOOPBACK, port)) as sock:
        left = size
        while left > 0:
            n = min(left, MIB)
            sock.sendall(zeros[:n])
            left -= n
        thread.join()
    listener.close()
    path.unlink()
    return size / (received[0] - t0) / 1e6


def one_run(args, profile: Path | None) -> dict:
    size = args.mib * MIB
    settings = {"UPLOAD_MAX_SIZE": str(args.mib + 100), **c.extra_settings(args)}
    with c.Stack(args, "upload") as stack:
        stack.sim("sim-up")
        bridge = stack.start_bridge(settings, profile)
        pid = bridge.python_pid
        time.sleep(1.0)
        before = c.rss_kb(pid)
        hwm_reset = c.reset_peak_rss(pid)
        sampler = RssSampler(pid)
        sampler.start()
        elapsed, status, body = send_upload(bridge.port, size)
        sampler.running = False
        sampler.join()
        hwm = c.rss_kb(pid, "VmHWM")
        after = c.rss_kb(pid)
        if status != 200:
            raise RuntimeError(f"upload refused: {status} {body[:300]!r}")
        saved = json.loads(body)["file"]
        stored = stack.dir / "bridge-data" / "uploads" / saved
        stored_size = stored.stat().st_size if stored.exists() else -1
        if stored_size != size:
            raise RuntimeError(f"stored {stored_size} bytes, sent {size}")
        stored.unlink()
        disk = receiver_reference(stack.dir, size)
    peak = max(hwm if hwm_reset else 0, sampler.peak_kb)
    return {"seconds": elapsed, "mbps": size / elapsed / 1e6, "mibps": size / elapsed / MIB,
            "rss_before_mb": before / 1024, "peak_growth_mb": (peak - before) / 1024, "peak_kb": peak, "before_kb": before,
            "sampled_growth_mb": (sampler.peak_kb - before) / 1024, "hwm_reset": hwm_reset,
            "rss_after_mb": after / 1024, "disk_mbps": disk}


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0], runs=5)
    p.add_argument("--mib", type=int, default=500, help="upload size in MiB (default 500)")
    args = p.parse_args()
    runs = []
    for r in range(args.runs):
        res = c.quiet_run(lambda: one_run(args, c.profile_path(args) if r == args.runs - 1 else None))
        runs.append(res)
        print(f"run {r + 1}/{args.runs}: {res['mbps']:.0f} MB/s ({res['seconds']:.2f} s), peak RSS growth "
              f"{res['peak_growth_mb']:.1f} MB (sampled {res['sampled_growth_mb']:.1f} MB; RSS before "
              f"{res['rss_before_mb']:.0f} MB, after {res['rss_after_mb']:.0f} MB); bare receiver "
              f"{res['disk_mbps']:.0f} MB/s", file=sys.stderr, flush=True)
    growth = c.spread([r["peak_growth_mb"] for r in runs])
    mbps = c.spread([r["mbps"] for r in runs])
    ratio = c.median([r["mbps"] / r["disk_mbps"] for r in runs])
    rows = [
        {"figure": f"{args.mib} MiB upload: peak RSS growth", "goal": f"<= {GOAL_RSS_MB:g} MB",
         "value": c.fmt_spread(growth, " MB", 1), "met": growth["median"] <= GOAL_RSS_MB, "number": growth["median"], "data": growth},
        {"figure": f"{args.mib} MiB upload: throughput", "goal": f">= {GOAL_MBPS:g} MB/s",
         "value": (f"{c.fmt_spread(mbps, ' MB/s', 0)}; = {ratio:.2f} x a bare Python socket-to-file receiver "
                   f"({c.median([r['disk_mbps'] for r in runs]):.0f} MB/s)"),
         "met": mbps["median"] >= GOAL_MBPS, "number": mbps["median"], "data": mbps},
    ]
    notes = [f"RSS before the upload {c.median([r['rss_before_mb'] for r in runs]):.0f} MB; peak = max(VmHWM after a "
             f"clear_refs reset{'' if all(r['hwm_reset'] for r in runs) else ' (reset refused: sampled only)'}, "
             "VmRSS sampled every 2 ms); MB = 10^6 bytes, MiB = 2^20",
             f"UPLOAD_MAX_SIZE={args.mib + 100}; one simulator (the upload does not reach it); bridge at "
             f"LOGGING_LEVEL={c.extra_settings(args).get('LOGGING_LEVEL', 'INFO')}"]
    c.report(f"{args.mib} MiB upload", args, rows, notes, extra={"client": "raw socket"})
    if args.profile:
        print(c.summarize_profile(Path(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
