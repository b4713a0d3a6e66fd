"""The route table: every ComfyUI route the simulator's profile serves, also under /api."""
from __future__ import annotations

import logging

import tornado.web

from .file_handlers import UploadImageHandler, ViewHandler
from .handlers import (EmbeddingsHandler, FeaturesHandler, FreeHandler, HistoryHandler, InterruptHandler,
                       ModelsHandler, NotFoundHandler, ObjectInfoHandler, PromptHandler, QueueHandler,
                       SystemStatsHandler, WebSocketHandler)
from .job_handlers import JobCancelHandler, JobHandler, JobsHandler

log = logging.getLogger("comfysim")


def make_app(sim) -> tornado.web.Application:
    kw = {"sim": sim}
    spec = sim.spec
    routes = [
        (r"/prompt", PromptHandler), (r"/queue", QueueHandler),
        (r"/history", HistoryHandler), (r"/history/(.+)", HistoryHandler),
        (r"/interrupt", InterruptHandler), (r"/free", FreeHandler),
        (r"/object_info", ObjectInfoHandler), (r"/object_info/(.+)", ObjectInfoHandler),
        (r"/system_stats", SystemStatsHandler),
        (r"/models", ModelsHandler), (r"/models/(.+)", ModelsHandler), (r"/embeddings", EmbeddingsHandler),
        (r"/upload/image", UploadImageHandler), (r"/view", ViewHandler), (r"/ws", WebSocketHandler),
    ]
    if spec.feature_flags:
        routes.append((r"/features", FeaturesHandler))
    if spec.jobs_api:
        # declared as /api/jobs... in ComfyUI, so the /api copy of them is /api/api/jobs...
        routes += [(r"/api/jobs", JobsHandler), (r"/api/jobs/([^/]+)", JobHandler),
                   (r"/api/jobs/([^/]+)/cancel", JobCancelHandler)]
    rules = [(rf"(?:/api)?{path}", handler, kw) for path, handler in routes]
    return tornado.web.Application(
        rules, default_handler_class=NotFoundHandler, default_handler_args=kw,
        websocket_max_message_size=4 * 1024 * 1024, log_function=_log_request)


def _log_request(handler) -> None:
    log.debug("%d %s %.1fms", handler.get_status(), handler._request_summary(),
              1000.0 * handler.request.request_time())
