"""Everything about the bridge's logs: the process-wide set-up (LOGGING_LEVEL, one line per
record), the access line per request, and the scrubbing that keeps API keys out of every line."""
from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from urllib.parse import unquote_plus

from balancer.jobs import CLIENT_ID

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REFUSAL_LOG_INTERVAL = 10.0   # seconds between two lines counting refused requests
_access = logging.getLogger("bridge.access")

_QUERY_PAIR = re.compile(r"([?&;])([^=&;\s'\"]+)=([^&;\s'\"]*)")
_SECRET_NAMES = ("token", "key")
_SECRET_QUERY = re.compile(r"(?i)((?:token|api_key|apikey|key)=)[^&\s'\"]*")
_SECRET_HEADER = re.compile(r"(?i)(bearer\s+|x-api-key[\"']?\s*[:=,]\s*[\"']?)[^\s'\",)]+")


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


def request_summary(request) -> str:
    """tornado's summary of a request for its own log lines, without the key a query may hold."""
    return scrub(f"{request.method} {request.uri} ({request.remote_ip})")


def log_request(handler) -> None:
    """One access line per request (method, path, status, duration, clientId), and its metrics;
    a refusal to retry later (queue full) is counted in the rate line (`RefusalLog`) instead."""
    status = handler.get_status()
    metrics = handler.settings.get("metrics")
    refusals = handler.settings.get("refusals")
    if refusals is not None and getattr(handler, "busy_refusal", False):
        refusals.count(handler.request.method or "-", scrub(one_line(handler.request.path)), status)
        if metrics is not None:
            metrics.count_request(type(handler).__name__, handler.request.method or "-", status,
                                  handler.request.request_time())
        return
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    seconds = request.request_time()
    client = request.query_arguments.get("clientId", [b"-"])[-1].decode(errors="replace").strip()
    if client != "-" and not CLIENT_ID.fullmatch(client):
        client = "(invalid)"  # refused with a 400; quoting it could forge log lines
    _access.log(
        level, "%s %s %d %.1fms clientId=%s", request.method, scrub(one_line(request.path)), status,
        1000.0 * seconds, client)
    if metrics is not None:
        metrics.count_request(type(handler).__name__, request.method or "-", status, seconds)


class RefusalLog:
    """Requests refused with "retry later" (the queue is full), logged as a rate: the first of a
    burst at once, then one line per `interval` with the counts, and nothing once they stop.
    Under a flood one line per refusal would cost the loop more than the refusals themselves."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL):
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0

    def count(self, method: str, path: str, status: int) -> None:
        what = f"{method} {path} {status}"
        if self._timer is None:
            _access.warning("refusing requests: %s (retry later); further refusals are counted, one "
                            "line per %gs", what, self.interval)
            self._start()
        else:
            self._counts[what] += 1

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log the counts since the last line; go on counting while refusals come."""
        self._timer = None
        if self._write():
            self._start()
        # else the burst is over: the next refusal is logged at once again

    def _write(self) -> bool:
        if not self._counts:
            return False
        seconds = asyncio.get_running_loop().time() - self._since
        _access.warning("refused %d requests in %.1fs (retry later): %s", sum(self._counts.values()), seconds,
                        ", ".join(f"{what} x{n}" for what, n in self._counts.most_common()))
        self._counts.clear()
        return True

    def close(self) -> None:
        """At shutdown: the last counts are logged."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._write()


def log_job_event(event: str, job, backend, detail: dict) -> None:
    """One line per job transition (a `JobService` observer): who, which prompt, where, and
    the transition's own facts (queue place, duration, reason...)."""
    extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
    logging.getLogger("bridge.jobs").log(
        logging.WARNING if event == "requeued" else logging.INFO,
        "job %s clientId=%s job=%s workflow=%s prompt=%s backend=%s %s", event, job.client_id, job.id,
        job.alias, job.prompt_id or "-", backend.address if backend else "-", extra)


class SecretFilter(logging.Filter):
    """Last line of defence on the log handler: keys in any record's text become ***."""

    def __init__(self, api_key=None):
        """`api_key`: one key, or several (BRIDGE_API_KEYS); None or empty: none."""
        super().__init__()
        keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
        # Longest first: a key inside another must not leave the rest of the longer one behind.
        self.keys = sorted((k for k in keys if k), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        clean = scrub(text)
        for key in self.keys:
            clean = clean.replace(key, "***")
        if clean != text:
            record.msg, record.args = clean, None
        return True


def configure_logging(level: str, api_key=None) -> logging.Handler:
    """LOGGING_LEVEL for the whole process, one line per record on stderr, secrets scrubbed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "bridge_handler", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler()
    handler.bridge_handler = True
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(SecretFilter(api_key))
    root.addHandler(handler)
    root.setLevel(level)
    # Pillow logs every PNG chunk at DEBUG, drowning the bridge's own lines.
    logging.getLogger("PIL").setLevel(max(logging.INFO, root.level))
    return handler
