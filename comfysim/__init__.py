"""comfysim - an in-process ComfyUI simulator that speaks ComfyUI's real protocol.

It imitates ComfyUI 0.3.64 as captured in comfy-protocol/captures (HTTP routes with
their status codes and bodies, websocket messages and their order, queue, history,
"classic" caching, the reconnect quirks), with real Pillow image work for a small node
set: LoadImage, ImageInvert, SaveImage, PreviewImage, EmptyImage, ImageScale, ImageBlur,
GetImageSize, SaveImageWebsocket, and the simulator-only SimSlowProgress (pass-through
that reports `steps` progress ticks, one per `tick_seconds`, and honours interrupts
between ticks). It runs on the caller's IOLoop; image and file work goes to a thread pool.

Usage::

    sim = SimulatedComfy(name="sim-a", tick_seconds=0.05, data_dir=None)
    port = await sim.start(port=0)          # 0 = a free port; sim.address == "127.0.0.1:PORT"
    ...
    await sim.stop()

Standalone: ``python -m comfysim --port 8188 --name X --tick-seconds 0.05``.

Constructor: name, tick_seconds, data_dir (None = a temp dir removed by stop()),
startup_delay (seconds during which the port refuses connections after start()),
speed (divides tick durations), max_upload_size, legacy (behave like a ComfyUI from before
mid-2024: no execution_success / progress_state, client-chosen prompt ids ignored, and a
/interrupt whose body is ignored, i.e. always global).

Knobs for tests:
  await sim.crash()        die mid-job: stop listening, drop every websocket without a close
                           frame, lose queue, history, caches and input files.
  await sim.restart()      listen again on the same port with fresh state.
  sim.hang(True/False)     accept connections but answer no HTTP request (they wait until
                           un-hung), send no websocket frame and pause execution.
  sim.fail_next_oom(n=1)   the next n prompts that execute a node fail at their first
                           non-cached node with execution_error torch.OutOfMemoryError.
  sim.tick_seconds, sim.speed   may be changed at run time.
  sim.interrupt()          set the global interrupt flag (as POST /interrupt does).
Observations (kept across crash/restart):
  sim.executed_prompts     prompt_ids that ran to execution_success, in order.
  sim.requests_log         (method, uri incl. query, parsed JSON body or None) per HTTP request.
  sim.interrupt_calls      one entry per POST /interrupt: None = global, else the prompt_id sent.
  sim.prompt_times         (prompt_id, started, ended, success) per prompt the worker ran, time.time()
                           seconds (float, unlike the protocol's millisecond timestamps); the
                           standalone server writes them to `--timeline FILE` when it stops.
  sim.queue_remaining, sim.websocket_count, sim.registered_client_ids.
Saved PNGs carry a text chunk `comfysim` = name; /system_stats shows the name in
`system.argv` (`--name NAME`) and in `devices[0].name`.
"""
from .server import SimulatedComfy

__all__ = ["SimulatedComfy"]
