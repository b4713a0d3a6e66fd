"""What every endpoint shares: JSON error bodies, the API key, clientId parsing, CORS."""
from __future__ import annotations

import hmac
import logging
import re

import ujson
from tornado import web

from balancer.service import RequestError

log = logging.getLogger("bridge.http")

CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_JSON_BODY = 1024 * 1024


def to_json(data) -> str:
    """JSON as clients expect it: UTF-8 text, and '/' not escaped ("queued / 1")."""
    return ujson.dumps(data, ensure_ascii=False, escape_forward_slashes=False)


class ApiError(web.HTTPError):
    """An error whose `detail` is shown to the client as `{"detail": ...}`."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(status, log_message=detail.replace("%", "%%"))
        self.detail = detail
        self.headers = headers or {}


def api_key_matches(settings, headers, query_token: str | None = None) -> bool:
    key = settings.bridge_api_key
    if not key:
        return True
    offered = None
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        offered = auth[7:].strip()
    offered = offered or headers.get("X-API-Key") or query_token
    return offered is not None and hmac.compare_digest(offered.encode(), key.encode())


def parse_client_id(value: str | None, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise ApiError(400, "query parameter 'clientId' is required (a uuid4 is recommended)")
        return None
    if not CLIENT_ID.match(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise ApiError(400, f"query parameter 'clientId' is invalid: {shown!r}; "
                            "use 1 to 128 of A-Z a-z 0-9 . _ -")
    return value


class AccessMixin:
    """Auth and CORS, shared by the JSON handlers and the websocket handler."""

    public = False  # True for /healthz and the static page

    @property
    def config(self):
        return self.application.settings["config"]

    @property
    def service(self):
        return self.application.settings["service"]

    @property
    def catalog(self):
        return self.application.settings["catalog"]

    @property
    def uploads(self):
        return self.application.settings["uploads"]

    @property
    def hub(self):
        return self.application.settings["hub"]

    def check_access(self, query_token: str | None = None) -> None:
        if not self.public and not api_key_matches(self.config, self.request.headers, query_token):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def client_id(self, required: bool = True) -> str | None:
        return parse_client_id(self.get_query_argument("clientId", None), required)


class JsonHandler(AccessMixin, web.RequestHandler):
    def set_default_headers(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and origin.rstrip("/") in self.config.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-API-Key")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.set_header("Access-Control-Expose-Headers", "X-Bridge-Detail")
            self.set_header("Vary", "Origin")

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            self.check_access()

    def options(self, *args) -> None:
        self.set_status(204)

    def write_json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(to_json(data))

    def json_body(self) -> dict:
        body = self.request.body
        if len(body) > MAX_JSON_BODY:
            raise ApiError(413, f"request body is {len(body)} bytes; the limit is {MAX_JSON_BODY}")
        if not body.strip():
            raise ApiError(400, "request body is empty; send a JSON object")
        try:
            data = ujson.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, (ApiError, RequestError)):
            detail = exc.detail if isinstance(exc, ApiError) else str(exc)
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            detail = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            detail = "internal error; the bridge logged the details"
        else:
            detail = self._reason
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(to_json({"detail": detail}))

    def _handle_request_exception(self, e: BaseException) -> None:
        # RequestError from the core is a client error, not a bug: answer with its status.
        if isinstance(e, RequestError) and not self._finished:
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, RequestError):
            log.info("%d %s: %s", value.status, self.request.path, value)
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(JsonHandler):
    public = True

    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
