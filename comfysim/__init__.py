"""comfysim - an in-process ComfyUI simulator that speaks ComfyUI's real protocol.

It imitates a ComfyUI server (HTTP routes with their status codes and bodies, websocket
messages and their order, queue, history, caching, the reconnect quirks), with real Pillow
image work for a small node set: LoadImage, ImageInvert, SaveImage, PreviewImage,
EmptyImage, ImageScale, ImageBlur, GetImageSize, SaveImageWebsocket, and the
simulator-only SimSlowProgress (pass-through that reports `steps` progress ticks, one per
`tick_seconds`, and honours interrupts between ticks). It runs on the caller's IOLoop;
image and file work goes to a thread pool.

Text to image without weights: the loaders CheckpointLoaderSimple, LoraLoader,
LoraLoaderModelOnly, VAELoader, UNETLoader, CLIPLoader, DualCLIPLoader, ControlNetLoader and
UpscaleModelLoader (inputs, outputs and model folders as ComfyUI's), CLIPTextEncode,
EmptyLatentImage, KSampler (`steps` ticks, one progress message per step, as SimSlowProgress),
VAEDecode (a picture of the latent's size that depends only on the seed and what was sampled),
ImageUpscaleWithModel (resizes by the factor in the model's name) and ControlNetApplyAdvanced.
The model folders list fake files (`models.DEFAULT_MODEL_FILES`, or `model_files=`): object_info
and GET /models/{folder} show them and validation refuses any other name (value_not_in_list).

GPU memory (models.py): each server holds the last `models_kept` model files it loaded (LRU).
A loader node whose file is not held waits `model_load_seconds` (not divided by speed) and
counts a load; a held file costs nothing and becomes the most recent. A cached loader output
is reused only while its files are held (else the loader runs again and pays); POST /free
with unload_models (or free_memory, as ComfyUI reads them) empties the GPU; a crash does too.

Usage::

    sim = SimulatedComfy(name="sim-a", tick_seconds=0.05, data_dir=None, profile="current")
    port = await sim.start(port=0)          # 0 = a free port; sim.address == "127.0.0.1:PORT"
    ...
    await sim.stop()

Standalone: ``python -m comfysim --port 8188 --name X --tick-seconds 0.05 --profile 0.3.64``
(GPU memory: ``--models-kept 3 --model-load-seconds 0.5 --model-files models.json``).
Many in one process (a farm for benchmarks): ``python -m comfysim --count 300 --port 0
--ports-file ports.json`` runs servers X-0 .. X-299, each with its own port, queue and history.

Profiles (`profile=`, `sim.profile`; `legacy=True` is the old spelling of profile="legacy"):

  "current" (the default) - ComfyUI as its source reads in 2026 (server.py, execution.py,
      comfy_execution/jobs.py; /system_stats says 0.38.1):
      * POST /prompt: a client "prompt_id" must be a canonical lowercase hyphenated UUID
        (str(uuid.UUID(x)) == x), else 400 {"error": {"type": "invalid_prompt_id", "message":
        "prompt_id must be a valid UUID", "details": "prompt_id must be a UUID string in
        canonical lowercase hyphenated form; omit it to let the server generate one",
        "extra_info": {}}, "node_errors": {}} (checked before validation; the prompt counter
        has already moved); absent or null -> str(uuid4()).
      * extra_data gains "create_time" (ms) and "comfy_usage_source" (the Comfy-Usage-Source
        header); the sensitive keys auth_token_comfy_org / api_key_comfy_org are split off
        at submission: the nodes get them, /queue, /history and the jobs routes never show
        them (queue items and history "prompt" stay 5-element lists).
      * jobs routes, declared with their /api prefix (so at /api/jobs and /api/api/jobs;
        /jobs is a 404): GET /api/jobs?status=&workflow_id=&sort_by=&sort_order=&limit=&offset=
        -> {"jobs": [...], "pagination": {offset, limit, total, has_more}}, bad values 400
        {"error": "..."}; GET /api/jobs/{id} -> the job with outputs, execution_status and
        workflow, or 404 {"error": "Job not found"}; POST /api/jobs/{id}/cancel -> {"cancelled":
        bool}: pending = dequeued, running = interrupted only while it is still the one
        running, finished/unknown = false; POST /api/jobs/cancel {"job_ids": [...]} (400 for a
        non-list or non-UUID ids, listed in "invalid_ids"). `sim.cancel_calls` records
        (job_id, "interrupted" | "dequeued" | "terminal" | "unknown") per id cancelled.
      * GET /features and the feature_flags answer carry today's flags
        (supports_model_type_tags, extension, node_replacements, assets: false - the
        simulator runs as with --disable-assets, so uploads carry no "asset").
      * a node without class_type, or of an unknown class: 400 "missing_node_type" (its
        message names the node title) instead of "invalid_prompt".
      * caching: the RAM-pressure cache (today's default) keeps outputs of earlier prompts,
        not only the previous prompt's (bounded here at profiles.RAM_CACHE_ENTRIES).
      * /system_stats: os = sys.platform, plus comfy_package_versions.
  "0.3.64" - the version the captures in comfy-protocol/captures were taken on (the
      conformance replay runs against it): any client prompt_id is kept as str(value);
      progress_state, execution_success, /features, the websocket feature_flags handshake
      (answered only if it is the client's first message) and preview frames type 4 exist;
      POST /interrupt {"prompt_id"} interrupts only that prompt; no jobs routes (404); the
      classic cache; history strips the sensitive extra_data keys, /queue shows them.
  "legacy" - a ComfyUI from before mid-2024: server-minted prompt ids whatever the client
      sends, no execution_success, no progress_state, no /features and no feature_flags
      answer (so never type 4 previews), and POST /interrupt ignores its body (always
      global). Everything else (its /system_stats included) is 0.3.64's.
  What is not modelled in any profile: subgraph expansion, lazy inputs, async nodes, the
  asset database, validation-time dependency-cycle errors of today's server.

Constructor: name, tick_seconds, data_dir (None = a temp dir removed by stop()),
startup_delay (seconds during which the port refuses connections after start()),
speed (divides tick durations), max_upload_size, profile, legacy, models_kept (3),
model_load_seconds (0.5), model_files ({folder: [names]}).

Knobs for tests:
  await sim.crash()        die mid-job: stop listening, drop every websocket without a close
                           frame, lose queue, history, caches and input files.
  await sim.restart()      listen again on the same port with fresh state.
  sim.hang(True/False)     accept connections but answer no HTTP request (they wait until
                           un-hung), send no websocket frame and pause execution.
  sim.fail_next_oom(n=1)   the next n prompts that execute a node fail at their first
                           non-cached node with execution_error torch.OutOfMemoryError.
  sim.tick_seconds, sim.speed   may be changed at run time.
  sim.models_kept, sim.model_load_seconds, sim.model_files   too (lowering models_kept evicts
                           at once); sim.loaded_models = the files held, least recently used first.
  sim.interrupt()          set the global interrupt flag (as POST /interrupt does).
Fault knobs (details in SimulatedComfy's docstring; sim.clear_faults() switches them off):
  sim.fail_prompts_containing = "POISON"   POST /prompt bodies containing it -> 500, not queued.
  sim.fail_every = {"history": 3, "view": 2}   every N-th request of a route -> 500.
  sim.stall_next("history", seconds=5, count=1)   the next requests of a route wait first;
                           sim.release_stalls() ends the stalls under way.
  sim.drop_events = {"executed"}   websocket events of those types are not sent.
  sim.fault_log, sim.fault_counts, sim.stalling   what the knobs did / are doing.
Observations (kept across crash/restart):
  sim.executed_prompts     prompt_ids that ran to execution_success, in order.
  sim.executions           prompt_ids, one per run that actually executed a node (fully cached
                           runs and never-started prompts excluded), in order of their first
                           node; sim.execution_records has the graphs and node ids, and
                           sim.executions_containing(marker) filters by graph content.
  sim.requests_log         (method, uri incl. query, parsed JSON body or None) per HTTP request.
  sim.interrupt_calls      one entry per POST /interrupt: None = global, else the prompt_id sent.
  sim.prompt_times         (prompt_id, started, ended, success) per prompt the worker ran, time.time()
                           seconds (float, unlike the protocol's millisecond timestamps), each with
                           `.models_loaded` (the model files that run loaded, in order); the
                           standalone server writes them to `--timeline FILE` when it stops
                           (keys server, prompt_id, started, ended, success, models_loaded).
  sim.model_loads          model files loaded so far (every server's own count).
  sim.queue_remaining, sim.websocket_count, sim.registered_client_ids.
Saved PNGs carry a text chunk `comfysim` = name; /system_stats shows the name in
`system.argv` (`--name NAME`) and in `devices[0].name`.
"""
from .profiles import DEFAULT_PROFILE, PROFILES
from .server import SimulatedComfy

__all__ = ["SimulatedComfy", "PROFILES", "DEFAULT_PROFILE"]
