"""The bridge's settings: one frozen object built from defaults, `.env`, the environment and
the command line (each overriding the one before). A bad value stops start-up with one line
naming the key and the value.

Each option is an entry of OPTIONS (key, default, parser, help: what `--help` shows) and a
field of `Settings` of the same name in lower case; tests/test_settings.py checks that the
two lists match and that `.env.example` names every key.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping

from dotenv import dotenv_values


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the value."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be 0 or a positive number")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


_HOST_PORT = re.compile(r"^(?:https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?$")


def _servers(raw: str) -> tuple[str, ...]:
    """Comma-separated `host:port` list; an `http://` prefix is tolerated and dropped."""
    servers = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        match = _HOST_PORT.match(item)
        if not match or not 0 < int(match.group(2)) <= 65535:
            raise ValueError(f"'{item}' is not host:port")
        address = f"{match.group(1)}:{int(match.group(2))}"
        if address in servers:
            raise ValueError(f"'{item}' is listed twice")
        servers.append(address)
    return tuple(servers)


def _level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    return tuple(part.strip().rstrip("/") for part in raw.split(",") if part.strip())


def _text(raw: str) -> str:
    return raw.strip()


def _host_patterns(raw: str) -> tuple[str, ...]:
    """Comma-separated host patterns (balancer/egress.py): `*.example.com`, `10.0.0.5`, `h:8443`."""
    from balancer.egress import parse_patterns
    patterns = parse_patterns(raw)
    for pattern in patterns:
        if "/" in pattern or " " in pattern:
            raise ValueError(f"'{pattern}' is not a host pattern (a host, optionally :port; * and ? match)")
    return patterns


def _webhook_url(raw: str) -> str:
    from urllib.parse import urlsplit
    url = raw.strip()
    if url and (urlsplit(url).scheme.lower() not in ("http", "https") or not urlsplit(url).hostname):
        raise ValueError("must be an http:// or https:// URL")
    return url


# Options whose values are never shown, in errors or anywhere else.
SECRET_OPTIONS = frozenset({"BRIDGE_API_KEY", "BRIDGE_API_KEYS", "WEBHOOK_SECRET"})


def _webhook_secret(raw: str) -> str:
    from balancer.webhooks import secret_key
    secret = raw.strip()
    if secret:
        secret_key(secret)  # ValueError says what is wrong
    return secret


def _api_keys(raw: str) -> tuple[tuple[str, str], ...]:
    """BRIDGE_API_KEYS: (tenant, key) pairs from `name:key` entries, one a line in a file (blank
    lines and # comments allowed) or comma-separated inline. Its errors never show a key."""
    text = raw.strip()
    if not text:
        return ()
    path = Path(text).expanduser()
    if ":" in text and not path.is_file():
        entries = [(f"entry {n}", part) for n, part in enumerate(text.split(","), 1)]
    else:
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            # The value is not shown: it might be a key given without its name.
            raise SettingsError(f"BRIDGE_API_KEYS: not a readable file ({why}) and not a list of name:key") from None
        entries = [(f"line {n} of {text}", line) for n, line in enumerate(content.splitlines(), 1)]
    from balancer.jobs import TENANT_NAME
    pairs: list[tuple[str, str]] = []
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for where, entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, colon, key = (part.strip() for part in entry.partition(":"))
        if not colon:
            raise SettingsError(f"BRIDGE_API_KEYS: {where} is not name:key")
        if not TENANT_NAME.fullmatch(name):
            raise SettingsError(f"BRIDGE_API_KEYS: {where}: tenant name {name[:64]!r} is invalid "
                                "(use 1 to 64 of A-Z a-z 0-9 . _ -)")
        if not key:
            raise SettingsError(f"BRIDGE_API_KEYS: {where}: tenant '{name}' has no key (name:key)")
        if name in names:
            raise SettingsError(f"BRIDGE_API_KEYS: {where}: tenant '{name}' is listed twice ({names[name]})")
        if key in keys:
            raise SettingsError(f"BRIDGE_API_KEYS: {where}: tenant '{name}' has the same key as {keys[key]}; "
                                "each tenant needs its own")
        names[name], keys[key] = where, f"{where} (tenant '{name}')"
        pairs.append((name, key))
    return tuple(pairs)


def _switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be on or off (true/false, 1/0)")


def _names(raw: str) -> frozenset[str]:
    """Comma-separated node class names (ComfyUI's `class_type`); empty: no restriction."""
    names = frozenset(part.strip() for part in raw.split(",") if part.strip())
    for name in names:
        if not name.isprintable() or len(name) > 200:
            raise ValueError(f"'{name[:40]}' is not a node class name")
    return names


@dataclass(frozen=True)
class Option:
    key: str
    default: str
    parse: Callable[[str], object]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("HOST", "0.0.0.0", _text, "address the bridge listens on"),
    Option("PORT", "8000", _port, "port the bridge listens on"),
    Option("COMFYUI_SERVERS", "127.0.0.1:8188", _servers,
           "comma-separated ComfyUI backends, host:port each"),
    Option("LOGGING_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING or ERROR"),
    Option("WORKFLOW_DIR", "workflows", Path, "folder of API-format workflow files"),
    Option("WORKFLOW_ALIAS", "workflows/aliases.json", Path,
           "JSON file mapping aliases to workflow files"),
    Option("DATA_DIR", "data", Path, "where uploads, results and state are kept"),
    Option("CURRENT_STATE", "", Path,
           "state file with the generation count (default DATA_DIR/current_state.json)"),
    Option("UPLOAD_MAX_SIZE", "100", _positive_int, "largest upload request, in MB"),
    Option("EXECUTION_TIMEOUT", "300", _positive_float, "seconds a job may run on a backend, from its prompt's execution_start"),
    Option("HEARTBEAT_INTERVAL", "1", _positive_float,
           "seconds of websocket silence before a 'listening' message"),
    Option("RESULT_TTL", "3600", _positive_float, "seconds results wait for GET /history"),
    Option("UPLOAD_TTL", "86400", _positive_float,
           "seconds an upload no active job uses is kept"),
    Option("MAX_INFLIGHT_PER_SERVER", "2", _positive_int,
           "prompts sent to one backend at a time: one runs, the others wait in its queue (1: no pipelining)"),
    Option("MODELS_KEPT_PER_SERVER", "2", _positive_int,
           "model files a backend is taken to keep loaded (the last ones its jobs used)"),
    Option("MAX_RETRIES", "2", _non_negative_int,
           "times a job is requeued after its backend was lost"),
    Option("MAX_QUEUE", "1000", _positive_int, "jobs the bridge's queue holds before 503"),
    Option("QUEUE_TIMEOUT", "600", _non_negative_float,
           "seconds a queued job waits while no backend that can run it is up, then fails (0 = forever)"),
    Option("FREE_AFTER_N_GENERATIONS", "0", _non_negative_int,
           "send /free to a backend after this many jobs (0 = never)"),
    Option("BACKEND_TIMEOUT", "30", _positive_float,
           "seconds one HTTP call to a backend may take"),
    Option("HEALTH_CHECK_INTERVAL", "5", _positive_float,
           "seconds between health probes of a backend (also the probe's timeout)"),
    Option("HEADER_TIMEOUT", "60", _positive_float,
           "seconds a client may take to send a request's headers (also the keep-alive idle limit)"),
    Option("BODY_TIMEOUT", "60", _positive_float,
           "seconds a client may be silent in the middle of a request's body (an upload "
           "included) before it is dropped; no limit on the body's total time"),
    Option("BRIDGE_API_KEY", "", _text, "when set, clients must send this key (or one of BRIDGE_API_KEYS); "
           "its clients are the tenant 'default'"),
    Option("BRIDGE_API_KEYS", "", _api_keys,
           "tenants: a file of name:key lines, or an inline comma-separated name:key list; each key's "
           "clients are that tenant, and free slots go round-robin between tenants with waiting jobs"),
    Option("TENANT_MAX_RUNNING", "0", _non_negative_int,
           "jobs one tenant may run at once; its other jobs wait while others' run (0 = no limit)"),
    Option("TENANT_MAX_QUEUED", "0", _non_negative_int,
           "jobs one tenant may have waiting; past it generate answers 429 (0 = no limit)"),
    Option("CORS_ORIGINS", "", _origins, "comma-separated browser origins allowed (CORS)"),
    Option("INPUT_URL_ALLOWED_HOSTS", "", _host_patterns,
           "comma-separated host patterns (fnmatch; host:port to match the port) file inputs given by "
           "URL may be fetched from; empty: any public host, never loopback, private, link-local or metadata"),
    Option("WEBHOOK_SECRET", "", _webhook_secret,
           "Standard Webhooks secret (whsec_ + base64) signing every webhook; webhooks are off without it"),
    Option("WEBHOOK_URL", "", _webhook_url,
           "URL every job's end is posted to when its generate names no 'webhook' (empty = none)"),
    Option("WEBHOOK_ALLOWED_HOSTS", "", _host_patterns,
           "comma-separated host patterns webhooks may go to (*.example.com, 10.0.0.5, h:8443); "
           "empty = any public host, internal addresses refused"),
    Option("WEBHOOK_INLINE_MAX", "10", _non_negative_int,
           "outputs totalling at most this many MB travel base64-encoded in the done event (0 = never)"),
    Option("WEBHOOK_RETRY_FOR", "3600", _positive_float,
           "seconds a webhook delivery is retried (exponential backoff) before it is given up"),
    Option("WEBHOOK_TIMEOUT", "10", _positive_float, "seconds one webhook attempt may take"),
    Option("V2_API", "on", _switch,
           "serve Comfy API v2 under /api/v2 (whole graphs, assets, events); off: those routes answer 404"),
    Option("V2_ALLOWED_NODE_CLASSES", "", _names,
           "comma-separated node classes a v2 graph may use (empty = any class a backend has)"),
)


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    comfyui_servers: tuple[str, ...]
    logging_level: str
    workflow_dir: Path
    workflow_alias: Path
    data_dir: Path
    current_state: Path
    upload_max_size: int
    execution_timeout: float
    heartbeat_interval: float
    result_ttl: float
    upload_ttl: float
    max_inflight_per_server: int
    models_kept_per_server: int
    max_retries: int
    max_queue: int
    queue_timeout: float
    free_after_n_generations: int
    backend_timeout: float
    health_check_interval: float
    header_timeout: float
    body_timeout: float
    bridge_api_key: str = field(repr=False)
    bridge_api_keys: tuple[tuple[str, str], ...] = field(repr=False)
    tenant_max_running: int
    tenant_max_queued: int
    cors_origins: tuple[str, ...]
    input_url_allowed_hosts: tuple[str, ...]
    webhook_secret: str = field(repr=False)
    webhook_url: str
    webhook_allowed_hosts: tuple[str, ...]
    webhook_inline_max: int
    webhook_retry_for: float
    webhook_timeout: float
    v2_api: bool
    v2_allowed_node_classes: frozenset[str]

    @functools.cached_property
    def api_keys(self) -> dict[str, str]:
        """Tenant name -> its key: BRIDGE_API_KEY's is 'default'. Empty: no key is asked for.
        (Read on every request: built once.)"""
        from balancer.jobs import DEFAULT_TENANT
        keys = {DEFAULT_TENANT: self.bridge_api_key} if self.bridge_api_key else {}
        keys.update(self.bridge_api_keys)
        return keys

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenants clients can be: one per key, or 'default' alone when no key is asked for."""
        from balancer.jobs import DEFAULT_TENANT
        return tuple(self.api_keys) or (DEFAULT_TENANT,)

    @property
    def upload_max_bytes(self) -> int:
        return self.upload_max_size * 1024 * 1024

    @property
    def webhook_inline_max_bytes(self) -> int:
        return self.webhook_inline_max * 1024 * 1024

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    def replace(self, **changes) -> "Settings":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def load_settings(
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike | None = ".env",
    check_paths: bool = True,
) -> Settings:
    """Defaults < `.env` < environment < overrides (e.g. command-line values)."""
    raw: dict[str, str] = {opt.key: opt.default for opt in OPTIONS}
    if dotenv_path and Path(dotenv_path).is_file():
        raw.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    source = os.environ if env is None else env
    raw.update({opt.key: source[opt.key] for opt in OPTIONS if opt.key in source})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})

    values = {}
    for opt in OPTIONS:
        try:
            values[opt.key.lower()] = opt.parse(raw[opt.key])
        except SettingsError:
            raise  # its own message, which must not show the value (keys)
        except (ValueError, TypeError) as exc:
            reason = str(exc) or "invalid value"
            if opt.parse in (int, _port, _positive_int, _non_negative_int) and "invalid literal" in reason:
                reason = "not an integer"
            elif "could not convert" in reason:
                reason = "not a number"
            shown = "the value given" if opt.key in SECRET_OPTIONS else repr(raw[opt.key])
            raise SettingsError(f"{opt.key}: {shown} is invalid ({reason})") from None
    if not values["comfyui_servers"]:
        raise SettingsError("COMFYUI_SERVERS: '' is invalid (list at least one host:port)")
    _check_keys_apart(values["bridge_api_key"], values["bridge_api_keys"])
    if values["webhook_url"] and not values["webhook_secret"]:
        raise SettingsError("WEBHOOK_URL: set WEBHOOK_SECRET too (webhooks are signed)")
    if not str(raw["CURRENT_STATE"]).strip():
        values["current_state"] = values["data_dir"] / "current_state.json"
    settings = Settings(**values)
    if check_paths:
        check_paths_usable(settings)
    return settings


def _check_keys_apart(single: str, pairs: tuple[tuple[str, str], ...]) -> None:
    """BRIDGE_API_KEY is the tenant 'default': no tenant of BRIDGE_API_KEYS may be it too."""
    from balancer.jobs import DEFAULT_TENANT
    if not single:
        return
    for name, key in pairs:
        if name == DEFAULT_TENANT:
            raise SettingsError(f"BRIDGE_API_KEYS: tenant '{DEFAULT_TENANT}' is BRIDGE_API_KEY's; "
                                "name it otherwise or leave BRIDGE_API_KEY empty")
        if key == single:
            raise SettingsError(f"BRIDGE_API_KEYS: tenant '{name}' has the same key as BRIDGE_API_KEY; "
                                "each tenant needs its own")


def setting_source(key: str, overrides: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                   dotenv_path: str | os.PathLike | None = ".env") -> str | None:
    """Where `key` is set, in the order `load_settings` reads them: "the command line", "the
    environment", the dotenv file's path, or None when the default applies."""
    if overrides and overrides.get(key) is not None:
        return "the command line"
    if key in (os.environ if env is None else env):
        return "the environment"
    if dotenv_path and Path(dotenv_path).is_file() and dotenv_values(dotenv_path).get(key) is not None:
        return str(dotenv_path)
    return None


def check_paths_usable(settings: Settings) -> None:
    if not settings.workflow_dir.is_dir() or not os.access(settings.workflow_dir, os.R_OK | os.X_OK):
        raise SettingsError(
            f"WORKFLOW_DIR: '{settings.workflow_dir}' is not a readable folder")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.current_state.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"DATA_DIR: '{settings.data_dir}' cannot be created ({exc.strerror})") from None
    if not os.access(settings.data_dir, os.W_OK):
        raise SettingsError(f"DATA_DIR: '{settings.data_dir}' is not writable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--key-name` flag per option; values given there override the environment."""
    for opt in OPTIONS:
        default = opt.default or "(empty)"
        if opt.key in SECRET_OPTIONS:
            default = "(none)"
        parser.add_argument(
            "--" + opt.key.lower().replace("_", "-"), dest=opt.key, metavar=opt.key,
            help=f"{opt.help} [env {opt.key}, default {default}]")


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {opt.key: getattr(args, opt.key) for opt in OPTIONS if getattr(args, opt.key, None) is not None}
