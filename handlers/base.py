"""What every endpoint shares: JSON error bodies, the API key, clientId parsing, CORS."""
from __future__ import annotations

import hmac
import logging
import math
import re
from urllib.parse import unquote_plus

import ujson
from tornado import web
from tornado.log import app_log, gen_log

from balancer.service import RequestError

log = logging.getLogger("bridge.http")

CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # fullmatch: "$" would let a trailing newline in
MAX_JSON_BODY = 1024 * 1024
# Bytes tornado reads for a request whose handler does not raise its limit (only /upload does):
# enough for the JSON body, so an oversized one is refused from its Content-Length, not buffered.
SERVER_MAX_BODY = MAX_JSON_BODY + 64 * 1024
CHUNKED_DRAIN = 8 * MAX_JSON_BODY
CORS_MAX_AGE = "600"
_SECRET_QUERY = re.compile(r"(?i)((?:token|api_key|apikey|key)=)[^&\s'\"]*")
_SECRET_HEADER = re.compile(r"(?i)(bearer\s+|x-api-key[\"']?\s*[:=,]\s*[\"']?)[^\s'\",)]+")


_QUERY_PAIR = re.compile(r"([?&;])([^=&;\s'\"]+)=([^&;\s'\"]*)")
_SECRET_NAMES = ("token", "key")


def _scrub_pair(match: re.Match) -> str:
    # tornado decodes parameter names: "%74oken=" is "token=" to it, so it must be to us too.
    name = unquote_plus(match.group(2)).strip().lower()
    if name.endswith(_SECRET_NAMES):
        return f"{match.group(1)}{match.group(2)}=***"
    return match.group(0)


def scrub(text: str) -> str:
    """Keys never reach the logs: `token=`/`key=` query values and bearer tokens become ***."""
    text = _QUERY_PAIR.sub(_scrub_pair, text)
    return _SECRET_HEADER.sub(r"\1***", _SECRET_QUERY.sub(r"\1***", text))


def one_line(text: str) -> str:
    """Client text quoted in a log line: control characters escaped, so it cannot forge lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def to_json(data) -> str:
    """JSON as clients expect it: UTF-8 text, and '/' not escaped ("queued / 1")."""
    return ujson.dumps(data, ensure_ascii=False, escape_forward_slashes=False)


def to_json_bytes(data) -> bytes:
    """`to_json` encoded; a lone surrogate (not UTF-8) becomes '?' instead of failing the reply."""
    return to_json(data).encode("utf-8", "replace")


def check_json_values(data) -> None:
    """ApiError(400) for what ujson accepts but JSON does not: NaN and Infinity (also what a
    too large number like 1e400 turns into), and strings with unpaired surrogates (not UTF-8)."""
    stack = [data]
    while stack:  # iterative: nesting may be as deep as ujson allows (1024)
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ApiError(400, "request body has NaN, Infinity or a number too large for a "
                                    "float; JSON numbers must be finite")
        elif isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                _check_text(key)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body has a string with an unpaired surrogate escape "
                            "(\\ud800-\\udfff); send valid Unicode") from None


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
    if not CLIENT_ID.fullmatch(value):
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

    @property
    def metrics(self):
        """The bridge's `BridgeMetrics`, or None in an application built without one."""
        return self.application.settings.get("metrics")

    def _request_summary(self) -> str:
        # tornado logs this for every HTTPError and uncaught exception: the query may hold ?token=.
        return scrub(f"{self.request.method} {self.request.uri} ({self.request.remote_ip})")

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            what = f"query parameter '{one_line(name)}'" if name else "the URL path"
            raise ApiError(400, f"{what} is not valid UTF-8 (percent-encode UTF-8 bytes)") from None

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, web.HTTPError):
            message = value.get_message()
            if message:  # it may quote client text: one line, and no key in it
                gen_log.warning("%d %s: %s", value.status_code, self._request_summary(),
                                scrub(one_line(message)))
        else:
            # tornado's own line adds repr(request), whose uri is not scrubbed.
            app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))

    def check_access(self, query_token: str | None = None) -> None:
        if not self.public and not api_key_matches(self.config, self.request.headers, query_token):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def client_id(self, required: bool = True) -> str | None:
        return parse_client_id(self.get_query_argument("clientId", None), required)


@web.stream_request_body
class JsonHandler(AccessMixin, web.RequestHandler):
    """The body is received here, not by tornado, so that its limit holds before it is read."""

    buffers_body = True   # False for a handler that streams its body itself (/upload)
    _body: bytearray | None = None
    _body_too_large = False

    def set_default_headers(self) -> None:
        if not self.config.cors_origins:
            return
        self.set_header("Vary", "Origin")  # the answer depends on it: caches must not mix them
        origin = self.request.headers.get("Origin")
        if origin and origin.rstrip("/") in self.config.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-API-Key")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.set_header("Access-Control-Expose-Headers", "X-Bridge-Detail, Retry-After")
            self.set_header("Access-Control-Max-Age", CORS_MAX_AGE)

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            self.check_access()
        if self.buffers_body:
            self._limit_body()

    def _limit_body(self) -> None:
        declared = self.request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            self.request.connection.set_max_body_size(SERVER_MAX_BODY)
            raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {MAX_JSON_BODY}")
        # A chunked body (no Content-Length) over the limit is drained, not kept, up to this much;
        # past it tornado gives up on the connection.
        self.request.connection.set_max_body_size(SERVER_MAX_BODY if declared else CHUNKED_DRAIN)
        self._body = bytearray()

    def data_received(self, chunk: bytes) -> None:
        if self._body is None:
            return
        if len(self._body) + len(chunk) > MAX_JSON_BODY:
            # The rest is read and dropped, then json_body() answers 413: answering now would
            # close the connection under a client still sending, which then never sees the reply.
            self._body, self._body_too_large = None, True
            return
        self._body += chunk

    def options(self, *args) -> None:
        self.set_status(204)

    def write_json(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(to_json_bytes(data))

    def json_body(self) -> dict:
        if self._body_too_large:
            raise ApiError(413, f"request body is over the limit of {MAX_JSON_BODY} bytes")
        body = bytes(self._body or b"")
        if not body.strip():
            raise ApiError(400, "request body is empty; send a JSON object")
        try:
            data = ujson.loads(body)
        except ujson.JSONDecodeError as exc:
            if "depth" in str(exc):
                raise ApiError(400, "request body is nested too deeply to be a request") from None
            raise ApiError(400, "request body is not valid JSON") from None
        except ValueError:  # includes invalid UTF-8 and integers of thousands of digits
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        check_json_values(data)
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
        self.finish(to_json_bytes({"detail": detail}))

    def _handle_request_exception(self, e: BaseException) -> None:
        # RequestError from the core is a client error, not a bug: answer with its status.
        if isinstance(e, RequestError) and not self._finished:
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, RequestError):
            log.info("%d %s: %s", value.status, self.request.path, scrub(one_line(str(value))))
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(JsonHandler):
    public = True

    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
