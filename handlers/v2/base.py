"""What every /api/v2 route shares: the contract's error envelope, Bearer auth with the
bridge's key, the V2_API switch (off: the bridge's own 404), the request's origin for links."""
from __future__ import annotations

from tornado import web

from balancer.errors import Busy, Refused
from balancer.v2.errors import V2Refused

from ..base import ApiError, JsonHandler, tenant_of_key, to_json_bytes

API = "/api/v2"
# The one table from the contract's codes to HTTP statuses.
STATUS = {
    "invalid_request": 400, "invalid_cursor": 400, "invalid_metadata_filter": 400,
    "unauthorized": 401, "forbidden": 403, "not_found": 404, "blob_not_found": 404,
    "method_not_allowed": 405, "hash_mismatch": 409, "idempotency_conflict": 409,
    "payload_too_large": 413, "range_not_satisfiable": 416,
    "invalid_workflow": 422, "workflow_format_ui": 422, "missing_asset": 422, "idempotency_key_reuse": 422,
    "metadata_invalid": 422, "unsupported_field": 422,
    "queue_full": 429, "internal_error": 500, "unavailable": 503,
}
_CODE_BY_STATUS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 503: "unavailable"}


def envelope(code: str, message: str, details: dict | None = None) -> bytes:
    return to_json_bytes({"error": {"code": code, "message": message, "details": details}})


class V2Handler(JsonHandler):
    @property
    def v2(self):
        """The bridge's `balancer.v2.surface.V2Surface`."""
        return self.application.settings["v2"]

    @property
    def origin(self) -> str:
        """Absolute links are built from the request's own Host: the SDK sends its key only there."""
        return f"{self.request.protocol}://{self.request.host}"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        if self.config.cors_origins and origin and origin.rstrip("/") in self.config.cors_origins:
            self.set_header("Access-Control-Allow-Headers",
                            "Authorization, Content-Type, X-API-Key, Idempotency-Key, Range")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, HEAD, OPTIONS")
            self.set_header("Access-Control-Expose-Headers",
                            "Retry-After, Idempotency-Replayed, Content-Range, Accept-Ranges")

    def prepare(self) -> None:
        if not self.config.v2_api:
            raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
        super().prepare()

    def check_access(self, query_token: str | None = None) -> None:
        tenant = tenant_of_key(self.config, self.request.headers)
        if tenant is None:
            raise V2Refused("unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
        self.tenant = tenant

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not self.config.v2_api:
            return super().write_error(status_code, **kwargs)
        headers = {}
        if isinstance(exc, V2Refused):
            code, message, details = exc.code, str(exc), exc.details
            status = STATUS.get(code, 400)
            self.busy_refusal = code == "queue_full"   # a rate line, as for the original API's 503
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
            if code == "unauthorized":
                headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(exc, Busy):
            self.busy_refusal = True
            code, message, details, status = "queue_full", str(exc), None, 429
            headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, Refused):
            code, message, details, status = "invalid_request", str(exc), None, 422
        elif isinstance(exc, ApiError):
            status, message, details = exc.status_code, exc.detail, None
            code = _CODE_BY_STATUS.get(status, "error")
            headers.update(exc.headers)
        elif isinstance(exc, web.HTTPError):
            status, details = exc.status_code, None
            message = exc.log_message % exc.args if exc.log_message and exc.args else (exc.log_message or self._reason)
            code = _CODE_BY_STATUS.get(status, "error")
        else:
            code, message, details, status = "internal_error", "internal error; the bridge logged the details", None, 500
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        if self.request.method == "HEAD":
            return self.finish()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(envelope(code, message, details))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, V2Refused):
            return  # a refusal the client is told about; the access line has its status
        super().log_exception(typ, value, tb)


__all__ = ["V2Handler", "envelope", "API"]
