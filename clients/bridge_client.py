"""What both example clients share: options, HTTP calls to the bridge, the progress bar.

Only the bridge's own dependencies are used (tornado, ujson) plus the standard library.
`ws_example.py` follows a job over the websocket; `rest_example.py` polls /execution-info.
"""
from __future__ import annotations

import argparse
import mimetypes
import os
import re
import sys
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import ujson
from tornado import httpclient, httputil

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_OUT = "out"        # the folder the repository's .gitignore ignores
CALL_TIMEOUT = 60.0        # seconds for one ordinary API call
TRANSFER_TIMEOUT = 600.0   # seconds for an upload or a /history download


class ClientError(Exception):
    """A reason to stop, shown to the user as is; the process exits non-zero."""


# ------------------------------------------------------------------------------- options

def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Example: %(prog)s --workflow invert --file 1/image=photo.png --out out")
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"bridge address (default {DEFAULT_SERVER})")
    parser.add_argument("--workflow", help="workflow alias; without it the available aliases are listed")
    parser.add_argument("--input", action="append", default=[], metavar="KEY=VALUE", type=_pair,
                        help="set a workflow input, e.g. 6/text='a red fox' or 3/seed=42; the value is "
                             "JSON when it parses as JSON (42, 1.5, true, \"42\"), else a string. Repeatable.")
    parser.add_argument("--file", action="append", default=[], metavar="KEY=PATH", type=_pair,
                        help="upload PATH through /upload and use the saved name for input KEY, "
                             "e.g. 10/image=photo.png. Repeatable.")
    parser.add_argument("--api-key", default=os.environ.get("BRIDGE_API_KEY") or None,
                        help="API key when the bridge requires one (default: $BRIDGE_API_KEY)")
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path,
                        help=f"folder for the result files (default ./{DEFAULT_OUT}, git-ignored in the repository)")
    parser.add_argument("--client-id", default=None,
                        help="clientId of this job (default: a new uuid4)")
    args = parser.parse_args(argv)
    args.client_id = args.client_id or str(uuid.uuid4())
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", args.client_id):
        parser.error("--client-id: use 1 to 128 of A-Z a-z 0-9 . _ -")
    return args


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def input_value(text: str):
    """`42` -> 42, `true` -> True, `"42"` -> "42", `a red fox` -> "a red fox"."""
    try:
        return ujson.loads(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------------- the bridge

class Bridge:
    """HTTP calls to one bridge. Every method raises ClientError with the bridge's reason."""

    def __init__(self, server: str, api_key: str | None = None):
        if "://" not in server:
            server = "http://" + server
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"--server must look like http://host:port, got {server!r}")
        self.base = server.rstrip("/")
        self.ws_base = ("wss://" if parts.scheme == "https" else "ws://") + self.base.split("://", 1)[1]
        self.api_key = api_key
        self.http = httpclient.AsyncHTTPClient(force_instance=True)

    def close(self) -> None:
        self.http.close()

    def headers(self, extra: dict | None = None) -> dict:
        headers = dict(extra or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                   timeout: float = CALL_TIMEOUT) -> httpclient.HTTPResponse:
        if method == "POST" and body is None:
            body = b""
        try:
            response = await self.http.fetch(self.base + path, method=method, body=body,
                                             headers=self.headers(headers), request_timeout=timeout,
                                             raise_error=False)
        except OSError as exc:
            raise ClientError(f"cannot reach the bridge at {self.base}: {exc}") from None
        if response.code == 599:
            raise ClientError(f"{method} {path}: {response.error}")
        if response.code >= 400:
            raise ClientError(f"{method} {path} answered {response.code}: {detail_of(response)}")
        return response

    async def json(self, method: str, path: str, payload=None, *, body: bytes | None = None,
                   headers: dict | None = None, timeout: float = CALL_TIMEOUT):
        """A call whose answer is JSON; `payload` is sent as a JSON body."""
        if payload is not None:
            body = ujson.dumps(payload).encode()
            headers = {"Content-Type": "application/json"}
        response = await self.call(method, path, body, headers, timeout)
        try:
            return ujson.loads(response.body)
        except ValueError:
            raise ClientError(f"{method} {path}: the answer is not JSON: {response.body[:200]!r}") from None

    async def workflow_list(self) -> list[str]:
        return await self.json("GET", "/workflow-list")

    async def upload(self, files: list[tuple[str, str]]) -> dict[str, str]:
        """[(identifier, local path)] -> {identifier: name saved on the bridge}, in one request."""
        parts = []
        for identifier, path in files:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ClientError(f"--file {identifier}={path}: {exc.strerror or exc}") from None
            ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
            parts.append((identifier, Path(path).name, data, ctype))
        body, content_type = encode_multipart(parts)
        saved = await self.json("POST", "/upload", body=body, headers={"Content-Type": content_type},
                                timeout=TRANSFER_TIMEOUT)
        missing = [identifier for identifier, _ in files if identifier not in saved]
        if missing:
            raise ClientError(f"/upload did not return a saved name for {', '.join(missing)}: {saved}")
        return saved

    async def generate(self, client_id: str, payload: dict) -> str:
        answer = await self.json("POST", f"/generate-based-workflow?clientId={quote(client_id)}", payload)
        return answer.get("detail", "")

    async def execution_info(self, client_id: str) -> dict:
        return await self.json("GET", f"/execution-info?clientId={quote(client_id)}")

    async def interrupt(self, client_id: str) -> str:
        answer = await self.json("POST", f"/interrupt?clientId={quote(client_id)}")
        return answer.get("detail", "")

    async def save_history(self, client_id: str, out: Path) -> list[Path]:
        """GET /history, then write each multipart part to `out` under its file name."""
        response = await self.call("GET", f"/history?clientId={quote(client_id)}", timeout=TRANSFER_TIMEOUT)
        if response.code == 204:
            raise ClientError("no results: " + (response.headers.get("X-Bridge-Detail") or "204 No Content"))
        content_type = response.headers.get("Content-Type", "")
        boundary = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.startswith("multipart/") or not boundary:
            raise ClientError(f"/history answered {content_type!r}, not multipart")
        arguments: dict = {}
        files: dict = {}
        httputil.parse_multipart_form_data(boundary.group(1).encode(), response.body, arguments, files)
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for field_name, parts in files.items():
            for part in parts:
                target = free_path(out, safe_name(part.filename, field_name))
                target.write_bytes(part.body)
                saved.append(target)
        return saved


def encode_multipart(parts: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """[(field, file name, data, content type)] -> (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for field, filename, data, ctype in parts:
        field = field.replace('"', "%22")
        filename = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                      f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def detail_of(response: httpclient.HTTPResponse) -> str:
    try:
        detail = ujson.loads(response.body).get("detail")
        if detail:
            return str(detail)
    except (ValueError, AttributeError):
        pass
    text = (response.body or b"").decode("utf-8", "replace").strip()
    return text[:500] or (response.reason or "no reason given")


def safe_name(filename: str, fallback: str) -> str:
    """A part's file name reduced to a plain name inside the output folder."""
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", Path(filename.replace("\\", "/")).name).strip(" .")
    return name or re.sub(r"[^A-Za-z0-9._-]", "_", fallback) or "result"


def free_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/name-1.ext, -2, ... when a file of that name exists."""
    target = folder / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


async def prepare_job(bridge: Bridge, args: argparse.Namespace) -> dict | None:
    """The generate body from --workflow/--input/--file (uploads the files); None = nothing to run."""
    if not args.workflow:
        aliases = await bridge.workflow_list()
        print("workflows on this bridge:", ", ".join(aliases) or "(none)")
        print("choose one with --workflow ALIAS")
        return None
    payload: dict = {"workflow": args.workflow}
    for key, text in args.input:
        payload[key] = input_value(text)
    if args.file:
        saved = await bridge.upload(args.file)
        for key, _path in args.file:
            payload[key] = saved[key]
            print(f"uploaded {key}: {saved[key]}")
    return payload


# ------------------------------------------------------------------------------- terminal

class ProgressBar:
    """One redrawn line on a terminal; a line per 10 % step when the output is a pipe or file."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self.shown = False
        self.last_step = -1

    def update(self, percent: float, label: str = "") -> None:
        percent = max(0.0, min(100.0, percent))
        if self.tty:
            filled = round(self.width * percent / 100)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {percent:6.2f}% {label}".ljust(self.width + 30))
            self.shown = True
        else:
            step = int(percent // 10)
            if step == self.last_step:
                return
            self.last_step = step
            self.stream.write(f"progress {percent:.2f}% {label}".rstrip() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, below the bar."""
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.shown = False


def percent_of(detail: str) -> float | None:
    try:
        return float(str(detail).rstrip("%"))
    except ValueError:
        return None


def detail(message: dict) -> str:
    """Status messages carry their text under "detail" or "details"."""
    return str(message.get("detail", message.get("details", "")))


def report_saved(paths: list[Path]) -> None:
    if not paths:
        print("the job finished without output files")
    for path in paths:
        print(f"saved {path}")
