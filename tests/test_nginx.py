"""deploy/nginx/comfy-bridge.conf really works: nginx runs with that file in front of a bridge,
and a whole job goes through it over TLS: an upload above nginx's default 1 MB body limit, the
websocket upgrade (wss://, the key as ?token=), generate, the results; plus the http -> https
redirect and an access log without the key.

Only what cannot be the same here is swapped, each swap checked to apply exactly where the file
says: listen ports (127.0.0.1, free ports), the upstream port, the certificate (self-signed,
made with openssl), log paths. Needs Debian's `nginx` and `openssl`: skipped without them
locally, failed under CI (CI=true; .ci/run installs nginx).
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import ujson
from PIL import Image
from tornado import httpclient, websocket

from .conftest import ROOT, TIMEOUT, multipart, new_client_id, parse_multipart, wait_for

EXAMPLE = ROOT / "deploy" / "nginx" / "comfy-bridge.conf"
KEY = "nginx-test-key"


def _nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def _missing() -> str | None:
    if _nginx() is None:
        return "nginx is not installed (apt-get install -y nginx)"
    if shutil.which("openssl") is None:
        return "openssl is not installed (apt-get install -y openssl)"
    return None


@pytest.fixture
def nginx_binary() -> str:
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the nginx test cannot run in CI: {reason}")
        pytest.skip(reason)
    return _nginx()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def swap(text: str, old: str, new: str, count: int = 1) -> str:
    """Replace `old`, which must appear exactly `count` times: the test breaks if the example changes."""
    assert text.count(old) == count, f"{old!r} appears {text.count(old)} times in {EXAMPLE.name}, not {count}"
    return text.replace(old, new)


def site_config(tmp: Path, bridge_port: int, tls_port: int, http_port: int) -> str:
    text = EXAMPLE.read_text()
    text = swap(text, "server 127.0.0.1:8000;", f"server 127.0.0.1:{bridge_port};")
    text = swap(text, "    listen 443 ssl;\n", f"    listen 127.0.0.1:{tls_port} ssl;\n")
    text = swap(text, "    listen [::]:443 ssl;\n", "")
    text = swap(text, "    listen 80;\n", f"    listen 127.0.0.1:{http_port};\n")
    text = swap(text, "    listen [::]:80;\n", "")
    text = swap(text, "/etc/letsencrypt/live/bridge.example.com/fullchain.pem", str(tmp / "cert.pem"))
    text = swap(text, "/etc/letsencrypt/live/bridge.example.com/privkey.pem", str(tmp / "key.pem"))
    text = swap(text, "/var/log/nginx/", f"{tmp}/", count=3)
    return text


def main_config(tmp: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf provides around a conf.d file, inside the test's folder."""
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in
                           ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's folder
    return (f"{user}worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/main-error.log warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temp_paths}\n    access_log off;\n    include {site};\n}}\n")


def make_certificate(tmp: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True, timeout=30)


@pytest.fixture
async def proxy(nginx_binary, tmp_path, sim, bridge_factory):
    """A bridge (with an API key) behind nginx; yields (https base URL, http base URL, folder)."""
    running = await bridge_factory([sim], bridge_api_key=KEY)
    folder = tmp_path / "nginx"
    folder.mkdir()
    make_certificate(folder)
    tls_port, http_port = free_port(), free_port()
    site = folder / "comfy-bridge.conf"
    site.write_text(site_config(folder, running.port, tls_port, http_port))
    conf = folder / "nginx.conf"
    conf.write_text(main_config(folder, site))
    checked = subprocess.run([nginx_binary, "-t", "-p", str(folder), "-c", str(conf)],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    process = await asyncio.create_subprocess_exec(
        nginx_binary, "-p", str(folder), "-c", str(conf),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def listening():
        assert process.returncode is None, (folder / "main-error.log").read_text()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", tls_port)
        except OSError:
            return False
        writer.close()
        return True
    try:
        await wait_for(listening, TIMEOUT, interval=0.02, what="nginx to listen")
        yield f"https://127.0.0.1:{tls_port}", f"http://127.0.0.1:{http_port}", folder
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), TIMEOUT)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()


def large_png() -> bytes:
    """About 3 MB that PNG cannot compress: well above nginx's default client_max_body_size (1 MB)."""
    image = Image.frombytes("RGB", (1024, 1024), os.urandom(3 * 1024 * 1024))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


async def test_a_job_through_nginx_with_tls_and_the_websocket(proxy):
    https, http, folder = proxy
    ca = str(folder / "cert.pem")
    client = httpclient.AsyncHTTPClient(force_instance=True)
    auth = {"Authorization": f"Bearer {KEY}"}

    async def fetch(path, method="GET", body=None, headers=None, base=https, **kw):
        return await client.fetch(base + path, method=method, body=body, headers={**auth, **(headers or {})},
                                  ca_certs=ca, request_timeout=TIMEOUT, raise_error=False, **kw)
    try:
        health = await fetch("/healthz")
        assert health.code == 200 and ujson.loads(health.body)["backends_up"] == 1
        assert health.headers["Server"].startswith("nginx")  # really through the proxy
        assert "max-age=" in health.headers["Strict-Transport-Security"]
        assert (await fetch("/workflow-list", headers={"Authorization": "Bearer wrong"})).code == 401

        source = large_png()
        assert len(source) > 2 * 1024 * 1024
        body, content_type = multipart([("1/image", "big.png", source, "image/png")])
        upload = await fetch("/upload", "POST", body, {"Content-Type": content_type})
        assert upload.code == 200, upload.body
        saved = ujson.loads(upload.body)["1/image"]

        # The websocket upgrade through nginx, the key as a browser sends it.
        client_id = new_client_id()
        socket_url = f"wss://127.0.0.1:{https.rsplit(':', 1)[1]}/ws?clientId={client_id}&token={KEY}"
        connection = await websocket.websocket_connect(httpclient.HTTPRequest(
            socket_url, ca_certs=ca, connect_timeout=TIMEOUT, request_timeout=TIMEOUT))
        try:
            first = ujson.loads(await asyncio.wait_for(connection.read_message(), TIMEOUT))
            assert first["status"] == "connected"
            generated = await fetch(f"/generate-based-workflow?clientId={client_id}", "POST",
                                    ujson.dumps({"workflow": "invert", "1/image": saved}),
                                    {"Content-Type": "application/json"})
            assert generated.code == 200, generated.body
            statuses = []
            while True:
                raw = await asyncio.wait_for(connection.read_message(), TIMEOUT)
                if raw is None:
                    break
                statuses.append(ujson.loads(raw)["status"])
            assert statuses[-1] == "closed", statuses
        finally:
            connection.close()

        history = await fetch(f"/history?clientId={client_id}")
        assert history.code == 200, history.body
        [part] = parse_multipart(history.body, history.headers["Content-Type"])
        original = Image.open(io.BytesIO(source)).convert("RGB")
        result = Image.open(io.BytesIO(part["data"])).convert("RGB")
        assert result.size == original.size
        assert result.getpixel((7, 9)) == tuple(255 - c for c in original.getpixel((7, 9)))

        # Plain http answers with a redirect to https, for every path.
        redirect = await fetch("/healthz", base=http, follow_redirects=False)
        assert redirect.code == 301
        assert redirect.headers["Location"].startswith("https://") and redirect.headers["Location"].endswith("/healthz")
    finally:
        client.close()

    log = (folder / "comfy-bridge.access.log").read_text()
    assert "GET /ws " in log and "POST /upload " in log
    assert KEY not in log and "token=" not in log  # ?token= never written to disk


async def test_generate_with_wait_through_nginx_and_a_client_leaving(proxy, sim):
    """The location for generate holds a `wait=` request and passes a client's leaving on."""
    https, _, folder = proxy
    ca = str(folder / "cert.pem")
    client = httpclient.AsyncHTTPClient(force_instance=True)
    auth = {"Authorization": f"Bearer {KEY}"}
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()

    async def generate(client_id, body, wait, timeout=TIMEOUT):
        return await client.fetch(f"{https}/generate-based-workflow?clientId={client_id}&wait={wait}", method="POST",
                                  body=ujson.dumps(body), headers={**auth, "Content-Type": "application/json"},
                                  ca_certs=ca, request_timeout=timeout, raise_error=False)
    try:
        done = await generate(new_client_id(), {"workflow": "invert", "1/image": data_url}, 10)
        assert done.code == 200 and len(parse_multipart(done.body, done.headers["Content-Type"])) == 1

        sim.tick_seconds = 0.05
        client_id = new_client_id()
        with pytest.raises(httpclient.HTTPClientError):  # the client gives up after 1 s and closes
            await generate(client_id, {"workflow": "slow-progress", "1/image": data_url, "2/steps": 400}, 60,
                           timeout=1.0)

        async def cancelled():
            info = await client.fetch(f"{https}/execution-info?clientId={client_id}", headers=auth, ca_certs=ca,
                                      request_timeout=TIMEOUT, raise_error=False)
            return ujson.loads(info.body).get("status") == "error" and ujson.loads(info.body)
        info = await wait_for(cancelled, TIMEOUT, interval=0.05, what="the job cancelled")
        assert info["detail"].startswith("interrupted: the client closed its connection")
    finally:
        client.close()
