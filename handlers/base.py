"""What every endpoint shares: JSON error bodies, the API key, clientId parsing, CORS."""
from __future__ import annotations

import hmac
import logging
import math

import ujson
from tornado import web
from tornado.log import app_log, gen_log

from balancer.errors import Busy, FileNotUploaded, Refused, ResultsWaiting, TenantBusy, UnknownClient
from balancer.jobs import CLIENT_ID, DEFAULT_TENANT
from logs import one_line, request_summary, scrub

log = logging.getLogger("bridge.http")

MAX_JSON_BODY = 1024 * 1024
# Bytes tornado reads for a request whose handler does not raise its limit (only /upload does):
# enough for the JSON body, so an oversized one is refused from its Content-Length, not buffered.
SERVER_MAX_BODY = MAX_JSON_BODY + 64 * 1024
CHUNKED_DRAIN = 8 * MAX_JSON_BODY
CORS_MAX_AGE = "600"
NOT_RECOGNIZED = "The client ID has not been submitted to the server before. It is not recognized. / {}"


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


def http_error(exc: BaseException) -> ApiError | None:
    """The one mapping from the core's refusals to HTTP answers (None: not a refusal)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownClient):
        return ApiError(400, NOT_RECOGNIZED.format(exc.client_id))
    if isinstance(exc, ResultsWaiting):
        return ApiError(400, f"clientId '{exc.client_id}' has results waiting; fetch them with "
                             "GET /history first or use a new clientId")
    if isinstance(exc, FileNotUploaded):
        return ApiError(400, f"input '{exc.key}': file '{exc.shown}' was never uploaded; "
                             "upload it with POST /upload and pass the saved name")
    if isinstance(exc, Refused):
        return ApiError(400, str(exc))
    if isinstance(exc, TenantBusy):  # the bridge has room; this tenant has its share waiting
        return ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, Busy):
        return ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
    return None


def detail_body(detail: str) -> bytes:
    """Every error body of the bridge: `{"detail": ...}` as JSON."""
    return to_json_bytes({"detail": detail})


def write_detail(handler: web.RequestHandler, status: int, detail: str, headers: dict | None = None) -> None:
    """Answer with an error body (handlers; connections.py writes its own answers)."""
    handler.set_status(status)
    for name, value in (headers or {}).items():
        handler.set_header(name, value)
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.finish(detail_body(detail))


def tenant_of_key(settings, headers, query_token: str | None = None) -> str | None:
    """The tenant whose key the request offers (Bearer, X-API-Key or ?token=); DEFAULT_TENANT
    when no key is asked for; None for a missing or wrong key."""
    keys = settings.api_keys
    if not keys:
        return DEFAULT_TENANT
    offered = None
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        offered = auth[7:].strip()
    offered = offered or headers.get("X-API-Key") or query_token
    if offered is None:
        return None
    # Each comparison in constant time, and every key compared: no early exit tells which one matched.
    found = None
    for tenant, key in keys.items():
        if hmac.compare_digest(offered.encode(), key.encode()):
            found = tenant
    return found


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
    tenant = DEFAULT_TENANT  # whose request it is: the name of its API key (check_access)
    busy_refusal = False  # answered "retry later" (Busy): logged as a rate, not a line each

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
        return request_summary(self.request)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            what = f"query parameter '{one_line(name)}'" if name else "the URL path"
            raise ApiError(400, f"{what} is not valid UTF-8 (percent-encode UTF-8 bytes)") from None

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, Busy):
            return  # counted in the refusal rate line instead (logs.RefusalLog)
        if isinstance(value, Refused):
            log.info("%s: %s", self._request_summary(), scrub(one_line(str(value))))
        elif isinstance(value, web.HTTPError):
            message = value.get_message()
            if message:  # it may quote client text: one line, and no key in it
                gen_log.warning("%d %s: %s", value.status_code, self._request_summary(),
                                scrub(one_line(message)))
        else:
            # tornado's own line adds repr(request), whose uri is not scrubbed.
            app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))

    def check_access(self, query_token: str | None = None) -> None:
        if self.public:
            return
        tenant = tenant_of_key(self.config, self.request.headers, query_token)
        if tenant is None:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        self.tenant = tenant

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
            # The rest is read and dropped, then json_body() answers 413 on a connection that
            # stays usable (answering now, with the length unknown, would close it).
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
        error = http_error(exc) if exc is not None else None
        if error is not None:
            # A refusal from the core reaches tornado as an uncaught exception (status 500):
            # its own status is set here.
            self.busy_refusal = isinstance(exc, Busy)
            return write_detail(self, error.status_code, error.detail, error.headers)
        if isinstance(exc, web.HTTPError) and exc.log_message:
            detail = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            detail = "internal error; the bridge logged the details"
        else:
            detail = self._reason
        write_detail(self, status_code, detail)


class NotFoundHandler(JsonHandler):
    public = True

    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
