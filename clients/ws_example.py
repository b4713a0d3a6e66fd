#!/usr/bin/env python3
"""Run one workflow on the bridge and follow it over the websocket.

    .venv/bin/python clients/ws_example.py --workflow invert --file 1/image=workflows/example.png
    .venv/bin/python clients/ws_example.py --workflow blank-image --input 1/width=640 --input 1/color=16711680

Steps: upload the --file inputs (POST /upload), open WS /ws?clientId=, queue the job
(POST /generate-based-workflow), draw the progress messages, and on "closed" fetch
GET /history at once and save each returned file in --out. Ctrl-C closes the websocket,
which cancels the job on the bridge. Exit status: 0 done, 1 failed, 2 bad options, 130 Ctrl-C.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import quote

import ujson
from tornado import httpclient, websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_client import (Bridge, ClientError, ProgressBar, detail, parse_args,  # noqa: E402
                           percent_of, prepare_job, report_saved)


async def open_socket(bridge: Bridge, client_id: str) -> websocket.WebSocketClientConnection:
    request = httpclient.HTTPRequest(f"{bridge.ws_base}/ws?clientId={quote(client_id)}",
                                     headers=bridge.headers(), connect_timeout=30, request_timeout=30)
    try:
        # Pings notice a bridge that vanished without closing the connection.
        return await websocket.websocket_connect(request, ping_interval=20, ping_timeout=20)
    except httpclient.HTTPClientError as exc:
        body = exc.response.body if exc.response is not None else b""
        try:
            reason = ujson.loads(body)["detail"]
        except (ValueError, KeyError, TypeError):
            reason = exc.message
        raise ClientError(f"the bridge refused the websocket ({exc.code}): {reason}") from None
    except OSError as exc:
        raise ClientError(f"cannot open the websocket at {bridge.ws_base}: {exc}") from None


async def run(args) -> int:
    bridge = Bridge(args.server, args.api_key)
    socket = None
    try:
        payload = await prepare_job(bridge, args)
        if payload is None:
            return 2
        # The socket first, so no status message of this job is missed.
        socket = await open_socket(bridge, args.client_id)
        print(f"clientId {args.client_id}")
        print(await bridge.generate(args.client_id, payload))

        bar = ProgressBar()
        while True:
            raw = await socket.read_message()
            if raw is None:
                bar.end()
                raise ClientError("the bridge closed the websocket before the job ended "
                                  f"(check: GET /execution-info?clientId={args.client_id})")
            message = ujson.loads(raw)
            status, text = message.get("status"), detail(message)
            if status == "progress":
                value = percent_of(text)
                if value is not None:
                    bar.update(value)
            elif status == "closed" and text == "replaced by a new connection":
                bar.end()
                raise ClientError("another client opened a websocket with this clientId")
            elif status == "closed":
                bar.update(100.0)
                bar.end()
                # Results are stored before "closed" is sent: fetch them right away.
                report_saved(await bridge.save_history(args.client_id, args.out))
                return 0
            elif status == "error":
                bar.end()
                raise ClientError(f"the job failed: {text}")
            # "connected" and "listening" only say the socket is alive.
    finally:
        if socket is not None:
            socket.close()
        bridge.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args("Run a workflow on the bridge, following it over the websocket.", argv)
    try:
        return asyncio.run(run(args))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled (the closed websocket cancels the job)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
