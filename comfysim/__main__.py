"""Run one simulated ComfyUI server: python -m comfysim --port 8188 --name X --tick-seconds 0.05"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

from . import SimulatedComfy
from .profiles import DEFAULT_PROFILE, PROFILES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m comfysim", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188, help="0 picks a free port (printed on start)")
    p.add_argument("--name", default="sim")
    p.add_argument("--tick-seconds", type=float, default=0.05, help="duration of one SimSlowProgress tick")
    p.add_argument("--speed", type=float, default=1.0, help="divides tick durations")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before the port accepts connections")
    p.add_argument("--data-dir", default=None, help="input/output/temp live here (default: a temp dir)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES),
                   help=f"which ComfyUI to imitate (default: {DEFAULT_PROFILE})")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--timeline", default=None, metavar="FILE",
                   help="on exit, write each executed prompt's start and end time (JSON) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


async def _serve(args) -> None:
    sim = SimulatedComfy(name=args.name, tick_seconds=args.tick_seconds, data_dir=args.data_dir,
                         startup_delay=args.startup_delay, speed=args.speed, profile=args.profile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await sim.start(port=args.port, host=args.host)
    print(f"comfysim {args.name} ({sim.profile}) listening on {args.host}:{port}", flush=True)
    await stop.wait()
    await sim.stop()
    if args.timeline:
        with open(args.timeline, "w") as out:
            json.dump([{"prompt_id": p, "started": s, "ended": e, "success": ok}
                       for p, s, e, ok in sim.prompt_times], out)


if __name__ == "__main__":
    main()
