"""Run simulated ComfyUI servers: python -m comfysim --port 8188 --name X --tick-seconds 0.05

With --count N, one process runs N servers (NAME-0 .. NAME-N-1), each on its own port with its
own queue, history and folders, sharing one event loop: a farm of hundreds of backends on a
small machine (bench/scale.py). Ports are PORT, PORT+1, ... (or free ones with --port 0);
--ports-file gets their addresses (a JSON list) once every one of them listens.

Each server has fake model files for its loader nodes and a GPU that holds the last
--models-kept files it loaded; a loader whose file is not held waits --model-load-seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from . import SimulatedComfy
from .models import checked_model_files
from .profiles import DEFAULT_PROFILE, PROFILES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m comfysim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188, help="0 picks a free port (printed on start)")
    p.add_argument("--count", type=int, default=1, help="servers in this process (default 1)")
    p.add_argument("--ports-file", default=None, metavar="FILE",
                   help="once all listen, write their addresses here (JSON list), atomically")
    p.add_argument("--name", default="sim")
    p.add_argument("--tick-seconds", type=float, default=0.05, help="duration of one SimSlowProgress tick or KSampler step")
    p.add_argument("--speed", type=float, default=1.0, help="divides tick durations")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before the port accepts connections")
    p.add_argument("--data-dir", default=None,
                   help="input/output/temp live here (default: a temp dir); with --count, one sub-folder per server")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES),
                   help=f"which ComfyUI to imitate (default: {DEFAULT_PROFILE})")
    p.add_argument("--models-kept", type=int, default=3, metavar="K",
                   help="model files the simulated GPU holds: the last K loaded, LRU (default 3)")
    p.add_argument("--model-load-seconds", type=float, default=0.5, metavar="S",
                   help="what a loader node waits for a model file the GPU does not hold (default 0.5; "
                        "not divided by --speed)")
    p.add_argument("--model-files", default=None, metavar="FILE",
                   help="JSON object {folder: [file names]} replacing the default fake model files "
                        "(folders as ComfyUI names them: checkpoints, loras, vae, ...)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--timeline", default=None, metavar="FILE",
                   help="on exit, write each executed prompt's start and end time and the model "
                        "files it loaded (JSON) here")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.models_kept < 0:
        p.error("--models-kept must be at least 0")
    if args.model_load_seconds < 0:
        p.error("--model-load-seconds must be at least 0")
    args.model_files = _read_model_files(p, args.model_files)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


def _read_model_files(p, path):
    if path is None:
        return None
    try:
        return checked_model_files(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as ex:
        p.error(f"--model-files {path}: {ex}")


def _names(args) -> list[str]:
    return [args.name] if args.count == 1 else [f"{args.name}-{i}" for i in range(args.count)]


async def _serve(args, stop: asyncio.Event | None = None) -> None:
    """Until SIGINT/SIGTERM, or until `stop` is set when one is given (tests)."""
    sims = []
    for i, name in enumerate(_names(args)):
        data_dir = args.data_dir if args.count == 1 or args.data_dir is None else str(Path(args.data_dir) / name)
        sims.append(SimulatedComfy(name=name, tick_seconds=args.tick_seconds, data_dir=data_dir,
                                   startup_delay=args.startup_delay, speed=args.speed, profile=args.profile,
                                   models_kept=args.models_kept, model_load_seconds=args.model_load_seconds,
                                   model_files=args.model_files))
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    for i, sim in enumerate(sims):
        port = await sim.start(port=args.port + i if args.port else 0, host=args.host)
        print(f"comfysim {sim.name} ({sim.profile}) listening on {args.host}:{port}", flush=True)
    if args.ports_file:
        tmp = f"{args.ports_file}.tmp"
        with open(tmp, "w") as out:
            json.dump([sim.address for sim in sims], out)
        os.replace(tmp, args.ports_file)
    await stop.wait()
    for sim in sims:
        await sim.stop()
    if args.timeline:
        with open(args.timeline, "w") as out:
            json.dump([{"server": sim.name, "prompt_id": t.prompt_id, "started": t.started, "ended": t.ended,
                        "success": t.success, "models_loaded": list(t.models_loaded)}
                       for sim in sims for t in sim.prompt_times], out)


if __name__ == "__main__":
    main()
