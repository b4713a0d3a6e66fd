#!/usr/bin/env python3
"""Run one workflow on the bridge with plain HTTP: poll GET /execution-info for progress.

    .venv/bin/python clients/rest_example.py --workflow invert --file 1/image=workflows/example.png
    .venv/bin/python clients/rest_example.py --workflow slow-progress --file 1/image=photo.png --input 2/steps=50

Steps: upload the --file inputs (POST /upload), queue the job (POST /generate-based-workflow),
ask GET /execution-info every half second and draw the progress, then on "closed" fetch
GET /history and save each returned file in --out. Ctrl-C sends POST /interrupt so the bridge
drops the job. Exit status: 0 done, 1 failed, 2 bad options, 130 Ctrl-C.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_client import (Bridge, ClientError, ProgressBar, detail, parse_args,  # noqa: E402
                           percent_of, prepare_job, report_saved)

POLL_INTERVAL = 0.5  # seconds between two GET /execution-info


async def run(args, queued: list) -> int:
    bridge = Bridge(args.server, args.api_key)
    try:
        payload = await prepare_job(bridge, args)
        if payload is None:
            return 2
        print(f"clientId {args.client_id}")
        print(await bridge.generate(args.client_id, payload))
        queued.append(args.client_id)

        bar = ProgressBar()
        last = None
        while True:
            info = await bridge.execution_info(args.client_id)
            status, text = info.get("status"), detail(info)
            if status == "progress":
                value = percent_of(text)
                if value is not None:
                    bar.update(value)
            elif status == "connected":
                if text != last:
                    bar.message(f"waiting: {text}")  # e.g. "queued / 3"
            elif status == "closed":
                bar.update(100.0)
                bar.end()
                report_saved(await bridge.save_history(args.client_id, args.out))
                return 0
            elif status == "error":
                bar.end()
                raise ClientError(f"the job failed: {text}")
            last = text
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        bridge.close()


async def cancel(args) -> None:
    bridge = Bridge(args.server, args.api_key)
    try:
        print(await bridge.interrupt(args.client_id), file=sys.stderr)
    except ClientError as exc:
        print(f"could not cancel: {exc}", file=sys.stderr)
    finally:
        bridge.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args("Run a workflow on the bridge, polling /execution-info for progress.", argv)
    queued: list[str] = []
    try:
        return asyncio.run(run(args, queued))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelling", file=sys.stderr)
        if queued:  # nothing polls this job any more: tell the bridge to drop it
            asyncio.run(cancel(args))
        return 130


if __name__ == "__main__":
    sys.exit(main())
