"""HTTP and websocket handlers: ComfyUI's routes with its status codes, bodies and content types.

Every route is also served under /api. Quirks kept on purpose (see REFERENCE.md §1-3):
empty 200 bodies without a content type, 400/403/404 with empty bodies, a text 500 for
bodies ComfyUI fails to parse, `GET /history/{id}` = `{}` while unknown, and the
websocket registry that lets a closing old socket deregister its replacement.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import urllib.parse
import uuid

import tornado.web
import tornado.websocket

from . import faults, nodes, protocol
from .profiles import SENSITIVE_EXTRA_DATA_KEYS
from .state import deliver
from .validation import PromptError, validate_prompt

log = logging.getLogger("comfysim")

TEXT_500 = faults.TEXT_500
JSON_TYPE = "application/json; charset=utf-8"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_mismatch(headers) -> bool:
    """ComfyUI's origin_only_middleware: loopback Host with a different Origin host -> 403."""
    host, origin = headers.get("Host"), headers.get("Origin")
    if host is None or origin is None:
        return False
    host_domain = host.lower()
    parsed = urllib.parse.urlparse(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urllib.parse.urlsplit("//" + host_domain)
    try:
        if parsed.port is None:
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
    except ValueError:
        return False
    return bool(_is_loopback(host_parsed.hostname) and host_domain and origin_domain
                and host_domain != origin_domain)


class SimMixin:
    """Shared by HTTP and websocket handlers: logging, hang, origin check."""

    def initialize(self, sim):
        self.sim = sim
        self.rt = sim._rt

    async def _gate_request(self) -> None:
        req = self.request
        body = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = None
        self.sim.requests_log.append((req.method, req.uri, body))
        if self.rt is None:
            raise tornado.web.Finish()
        if self.sim.hung:
            # Hung: the request waits until un-hung, or until this process dies.
            unhung = self.sim._unhung.wait()
            dead = self.rt.dead.wait()
            await _first_of(unhung, dead)
            if self.rt.dead.is_set():
                self.request.connection.close()
                raise tornado.web.Finish()
        if origin_mismatch(req.headers):
            log.warning("comfysim %s: request with non matching host and origin, returning 403", self.sim.name)
            self.set_status(403)
            self.clear_header("Content-Type")
            self.finish()
            raise tornado.web.Finish()
        if await faults.apply(self, self.rt):
            raise tornado.web.Finish()

    @property
    def spec(self):
        return self.sim.spec


async def _first_of(*coros) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()


class BaseHandler(SimMixin, tornado.web.RequestHandler):
    def set_default_headers(self):
        self.clear_header("Content-Type")  # aiohttp sends none on empty bodies

    async def prepare(self):
        await self._gate_request()

    def options(self, *args):
        self.empty(200)  # ComfyUI's middleware answers every OPTIONS itself

    def compute_etag(self):
        return None  # only /view sets one, as aiohttp's FileResponse does

    # -- response helpers ----------------------------------------------------------------
    def empty(self, status: int = 200):
        self.set_status(status)
        self.clear_header("Content-Type")
        if not self._finished:
            self.finish()

    def send_json(self, obj, status: int = 200):
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        self.finish(protocol.dumps(obj))

    def json_body(self):
        """Parsed body; ComfyUI's `await request.json()` turns bad JSON into a 500."""
        try:
            return json.loads(self.request.body or b"")
        except ValueError:
            raise tornado.web.HTTPError(500, "invalid JSON body")

    def write_error(self, status_code, **kwargs):
        self.clear_header("Content-Type")
        if status_code == 405:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("405: Method Not Allowed")
        elif status_code >= 500:
            self.set_status(500)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(TEXT_500)
        else:
            self.finish()

    @property
    def queue(self):
        return self.rt.queue


class NotFoundHandler(BaseHandler):
    """Unknown path: aiohttp's static route answers 404 with an empty octet-stream."""

    async def prepare(self):
        await self._gate_request()
        if self.request.method == "OPTIONS":
            self.empty(200)
            raise tornado.web.Finish()
        self.set_status(404)
        self.set_header("Content-Type", "application/octet-stream")
        self.finish()


class PromptHandler(BaseHandler):
    def get(self):
        self.send_json({"exec_info": {"queue_remaining": self.queue.remaining()}})

    def post(self):
        data = self.json_body()
        if not isinstance(data, dict):
            if isinstance(data, (list, str)):
                return self.send_json({"error": _no_prompt(), "node_errors": {}}, 400)
            raise tornado.web.HTTPError(500, "body is not an object")
        queue = self.queue
        if "number" in data:
            try:
                number = float(data["number"])
            except (TypeError, ValueError):
                raise tornado.web.HTTPError(500, "bad number")
        else:
            number = queue.number
            if data.get("front"):
                number = -number
            queue.number += 1  # counts every POST without "number", valid or not
        if "prompt" not in data:
            return self.send_json({"error": _no_prompt(), "node_errors": {}}, 400)
        prompt = data["prompt"]
        prompt_id = self._prompt_id(data)
        if prompt_id is None:
            return self.send_json({"error": _invalid_prompt_id(), "node_errors": {}}, 400)
        try:
            ok, error, outputs, node_errors = validate_prompt(
                prompt, data.get("partial_execution_targets"), self.sim.folders, self.spec.node_type_errors)
        except PromptError as ex:
            raise tornado.web.HTTPError(500, str(ex))
        extra_data = data.get("extra_data", {})
        if "client_id" in data or self.spec.create_time:
            if not isinstance(extra_data, dict):
                raise tornado.web.HTTPError(500, "extra_data is not an object")
        if "client_id" in data:
            extra_data["client_id"] = data["client_id"]
        if self.spec.create_time and "comfy_usage_source" not in extra_data:
            source = self.request.headers.get("Comfy-Usage-Source")
            if source:
                extra_data["comfy_usage_source"] = source
        if not ok:
            log.info("comfysim %s: invalid prompt: %s", self.sim.name, error)
            return self.send_json({"error": error, "node_errors": node_errors}, 400)
        sensitive = {}
        if self.spec.sensitive == "split":
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                if key in extra_data:
                    sensitive[key] = extra_data.pop(key)
        if self.spec.create_time:
            extra_data["create_time"] = protocol.now_ms()
        queue.put([number, prompt_id, prompt, extra_data, outputs, sensitive])
        self.send_json({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _prompt_id(self, data: dict) -> str | None:
        """The id this prompt gets, or None if the profile refuses the client's."""
        mode = self.spec.prompt_ids
        if mode == "ignored":  # servers before 2025-07 always chose their own
            return str(uuid.uuid4())
        if mode == "any":  # 2025-07 .. 0.3.64: whatever was sent, as a string
            return str(data["prompt_id"]) if "prompt_id" in data else str(uuid.uuid4())
        client = data.get("prompt_id")  # today: absent/null -> minted, else canonical UUIDs only
        if client is None:
            return str(uuid.uuid4())
        return client if is_canonical_uuid(client) else None


def _no_prompt():
    return {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}


def _invalid_prompt_id():
    return {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
            "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                       "omit it to let the server generate one",
            "extra_info": {}}


def is_canonical_uuid(value) -> bool:
    """What today's ComfyUI accepts as a job id: a str equal to str(uuid.UUID(it))."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class QueueHandler(BaseHandler):
    def get(self):
        running, pending = self.queue.current()
        self.send_json({"queue_running": running, "queue_pending": pending})

    def post(self):
        data = self.json_body()
        if "clear" in data and data["clear"]:
            self.queue.wipe()
        if "delete" in data:
            for prompt_id in data["delete"]:
                self.queue.delete_pending(prompt_id)  # a running prompt is not touched
        self.empty(200)


class HistoryHandler(BaseHandler):
    def get(self, prompt_id=None):
        if prompt_id is not None:
            return self.send_json(self.queue.get_history(prompt_id))
        max_items = self.get_query_argument("max_items", None)
        offset = self.get_query_argument("offset", None)
        try:
            max_items = int(max_items) if max_items is not None else None
            offset = int(offset) if offset is not None else -1
        except ValueError:
            raise tornado.web.HTTPError(500, "bad max_items/offset")
        self.send_json(self.queue.get_history(max_items=max_items, offset=offset))

    def post(self, prompt_id=None):
        if prompt_id is not None:
            raise tornado.web.HTTPError(405)
        data = self.json_body()
        if "clear" in data and data["clear"]:
            self.queue.wipe_history()
        if "delete" in data:
            for prompt_id in data["delete"]:
                self.queue.delete_history(prompt_id)
        self.empty(200)


class InterruptHandler(BaseHandler):
    def post(self):
        try:
            data = json.loads(self.request.body or b"")
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(500, "body is not an object")  # ComfyUI calls .get() on it
        prompt_id = data.get("prompt_id")
        if prompt_id:
            self.sim.interrupt_calls.append(prompt_id)
            if not self.spec.targeted_interrupt:  # before 2025-09 the body was ignored: global
                self.sim.interrupt()
            elif self.queue.is_running(prompt_id):
                self.sim.interrupt()
            else:
                log.info("comfysim %s: prompt %s is not running, interrupt ignored", self.sim.name, prompt_id)
        else:
            self.sim.interrupt_calls.append(None)
            self.sim.interrupt()
        self.empty(200)


class FreeHandler(BaseHandler):
    def post(self):
        data = self.json_body()
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(500, "body is not an object")
        unload = data.get("unload_models", False)
        free = data.get("free_memory", False)
        if unload:
            self.queue.set_flag("unload_models", unload)
        if free:
            self.queue.set_flag("free_memory", free)
        self.empty(200)


class ObjectInfoHandler(BaseHandler):
    def get(self, class_name=None):
        self.send_json(nodes.object_info(self.sim.folders, class_name))


class SystemStatsHandler(BaseHandler):
    def get(self):
        self.send_json(self.sim.system_stats())


class FeaturesHandler(BaseHandler):
    def get(self):
        self.send_json(_server_features(self.sim))


def _server_features(sim) -> dict:
    return sim.spec.server_features(sim.max_upload_size)


MODEL_FOLDERS = ["checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
                 "upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
                 "model_patches", "audio_encoders"]


class ModelsHandler(BaseHandler):
    def get(self, folder=None):
        if folder is None:
            return self.send_json(MODEL_FOLDERS)
        if folder not in MODEL_FOLDERS:
            return self.empty(404)
        self.send_json(self.sim.folders.list_models(folder))  # the simulator's fake model files


class EmbeddingsHandler(BaseHandler):
    def get(self):
        self.send_json([])


class WebSocketHandler(SimMixin, tornado.websocket.WebSocketHandler):
    """GET /ws?clientId=X with ComfyUI's registry semantics (REFERENCE §3)."""

    sid: str | None = None

    def check_origin(self, origin):
        return True  # ComfyUI's own host/origin rule runs in prepare()

    async def prepare(self):
        await self._gate_request()

    def open(self):
        # ComfyUI's aiohttp (asyncio) sets TCP_NODELAY on every socket: without it, events
        # would wait for the bridge's delayed ACK, which real servers never make it do.
        self.set_nodelay(True)
        hub = self.rt.hub
        sid = self.get_query_argument("clientId", "", strip=False)
        if sid:
            hub.sockets.pop(sid, None)  # the old socket stays open but is forgotten
        else:
            sid = uuid.uuid4().hex
        self.sid, self.first_message = sid, True
        hub.sockets[sid] = self
        hub.metadata[sid] = {"feature_flags": {}}
        hub.open_handlers.add(self)
        # Written right away, not through the outbox, so `status` is always the first frame.
        self._write_now(protocol.text_frame("status", {"status": self.rt.queue.queue_info(), "sid": sid}))
        if hub.client_id == sid and hub.last_node_id is not None:
            # Reconnect during this client's prompt: re-announce the node (no prompt_id).
            self._write_now(protocol.text_frame("executing", {"node": hub.last_node_id}))

    def _write_now(self, message: str) -> None:
        try:
            future = self.write_message(message)
        except tornado.websocket.WebSocketClosedError:
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def on_message(self, message):
        if not self.first_message or isinstance(message, bytes):
            return
        try:
            data = json.loads(message)
        except ValueError:
            return  # an unparsable first message does not use up the negotiation
        self.first_message = False
        if not self.sim.spec.feature_flags:
            return  # older servers read nothing from their clients
        if isinstance(data, dict) and data.get("type") == "feature_flags":
            hub = self.rt.hub
            meta = hub.metadata.get(self.sid)
            if meta is None:
                return
            meta["feature_flags"] = data.get("data", {})
            target = hub.sockets.get(self.sid)
            if target is not None:
                await deliver(target, protocol.text_frame("feature_flags", _server_features(self.sim)))

    def on_close(self):
        if self.rt is None or self.sid is None:
            return
        hub = self.rt.hub
        hub.open_handlers.discard(self)
        # Pops whatever is registered under this id - possibly a newer socket (capture 13).
        hub.sockets.pop(self.sid, None)
        hub.metadata.pop(self.sid, None)

    def get_compression_options(self):
        return {}  # permessage-deflate accepted, like aiohttp
