"""Access control: the API key on every endpoint, keys kept out of logs, CORS, and what the
bridge sends to ComfyUI (never the client's Origin, Cookie or Authorization)."""
import logging

import pytest
import ujson
from tornado import httpclient, web, websocket

import handlers.base
from tests.conftest import TIMEOUT, new_client_id, png_bytes

KEY = "k3y-Vm9yWQ-s3cret"
PUBLIC = ("/healthz", "/", "/static/index.html")


def endpoints(running) -> list[tuple[str, str, type]]:
    """(method, path, handler) for every route the bridge serves, read from the application
    itself so that an endpoint added later is covered without editing this file."""
    found = []
    for rule in running.bridge.app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        handler = rule.target
        if "(" in pattern:  # the static routes: checked apart, they are public
            continue
        for method in ("get", "post", "put", "delete", "patch"):
            if getattr(handler, method) is not getattr(web.RequestHandler, method):
                found.append((method.upper(), pattern, handler))
    return found


def secured(running) -> list[tuple[str, str]]:
    return [(method, path) for method, path, handler in endpoints(running)
            if path not in PUBLIC and not getattr(handler, "public", False)]


async def keyed_bridge(sim, bridge_factory, **settings):
    return await bridge_factory([sim], bridge_api_key=KEY, **settings)


def detail(response) -> str:
    """The error's words: `detail`, or under /api/v2 the message of Comfy API v2's envelope."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = ujson.loads(response.body)
    if response.request.url.split("?")[0].split("/", 3)[-1].startswith("api/v2/"):
        assert set(body) == {"error"}, body
        return body["error"]["message"]
    assert set(body) == {"detail"}, body
    return body["detail"]


async def ws_connect(running, query: str, headers: dict | None = None):
    url = running.url.replace("http://", "ws://") + "/ws?" + query
    return await websocket.websocket_connect(httpclient.HTTPRequest(
        url, headers=headers, connect_timeout=TIMEOUT, request_timeout=TIMEOUT))


# ---------------------------------------------------------------- the API key

async def test_every_endpoint_but_the_public_ones_needs_the_key(sim, bridge_factory):
    running = await keyed_bridge(sim, bridge_factory)
    routes = secured(running)
    paths = {path for _, path in routes}
    # the enumeration found the API, not nothing
    assert {"/generate-based-workflow", "/upload", "/history", "/ws", "/free", "/interrupt",
            "/execution-info", "/workflow-list", "/workflow-info", "/generation-count",
            "/status"} <= paths
    api = running.api()
    wrong_keys = [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY[:-1]}"},
                  {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                  {"Authorization": "Bearer "}, {"X-API-Key": "wrong"}, {"X-API-Key": ""},
                  {"Authorization": KEY}]
    for method, path in routes:
        for headers in wrong_keys:
            query = f"?clientId={new_client_id()}&workflow=invert"
            response = await api.fetch(path + query, method, body=b"{}" if method == "POST" else None,
                                       headers=headers)
            assert response.code == 401, (method, path, headers, response.code, response.body)
            assert "API key" in detail(response)
            assert response.headers.get("WWW-Authenticate") == "Bearer"
        # ?token= is for the websocket and the /docs page only (browsers cannot send a header
        # there); on REST endpoints it is not a credential
        response = await api.fetch(f"{path}?token={KEY}", method, body=b"" if method == "POST" else None)
        if path == "/docs":
            assert response.code == 200
        elif path != "/ws":
            assert response.code == 401, (method, path)
    api.close()


async def test_public_paths_need_no_key(sim, bridge_factory):
    running = await keyed_bridge(sim, bridge_factory)
    api = running.api()
    for path in PUBLIC:
        assert (await api.fetch(path)).code == 200, path
    # an unknown path says so (JSON) rather than asking for a key
    response = await api.fetch("/no-such-endpoint")
    assert response.code == 404 and "no such endpoint" in detail(response)
    api.close()


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                                     {"X-API-Key": KEY}], ids=["bearer", "bearer-lowercase", "x-api-key"])
async def test_the_right_key_opens_every_endpoint(sim, bridge_factory, headers):
    running = await keyed_bridge(sim, bridge_factory)
    api = running.api()
    for method, path in secured(running):
        if path == "/ws":
            continue
        response = await api.fetch(f"{path}?clientId={new_client_id()}&workflow=invert", method,
                                   body=b"{}" if method == "POST" else None, headers=headers)
        assert response.code != 401, (method, path, response.body)
        assert response.code < 500, (method, path, response.body)
    socket = await ws_connect(running, f"clientId={new_client_id()}", headers)
    assert ujson.loads(await socket.read_message())["status"] == "connected"
    socket.close()
    api.close()


async def test_websocket_key_in_header_or_token(sim, bridge_factory):
    running = await keyed_bridge(sim, bridge_factory)
    socket = await ws_connect(running, f"clientId={new_client_id()}&token={KEY}")
    assert ujson.loads(await socket.read_message())["status"] == "connected"
    socket.close()
    for query, headers in [(f"clientId={new_client_id()}", None),
                           (f"clientId={new_client_id()}&token=wrong", None),
                           (f"clientId={new_client_id()}&token=", None),
                           (f"clientId={new_client_id()}&token={KEY}x", None),
                           (f"clientId={new_client_id()}", {"Authorization": "Bearer wrong"})]:
        with pytest.raises(httpclient.HTTPClientError) as failure:
            await ws_connect(running, query, headers)
        assert failure.value.code == 401, query
        assert "API key" in detail(failure.value.response)


async def test_a_keyed_client_runs_a_whole_job(sim, bridge_factory):
    running = await keyed_bridge(sim, bridge_factory)
    api = running.api(KEY)
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    socket = await ws_connect(running, f"clientId={client_id}&token={KEY}")
    await api.generate(client_id, {"workflow": "invert", "1/image": saved})
    messages = []
    while (raw := await socket.read_message()) is not None:
        messages.append(ujson.loads(raw)["status"])
    socket.close()
    assert messages[-1] == "closed"
    assert len(await api.history(client_id)) == 1
    api.close()


async def test_keys_are_compared_in_constant_time(sim, bridge_factory, monkeypatch):
    running = await keyed_bridge(sim, bridge_factory)
    calls = []
    real = handlers.base.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(handlers.base.hmac, "compare_digest", spy)
    api = running.api()
    for headers in ({"Authorization": "Bearer guess"}, {"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        await api.fetch("/workflow-list", headers=headers)
    socket = await ws_connect(running, f"clientId={new_client_id()}&token={KEY}")
    socket.close()
    offered = [a for a, _ in calls]
    assert offered == [b"guess", KEY.encode(), KEY.encode(), KEY.encode()]
    assert all(b == KEY.encode() for _, b in calls)
    api.close()


async def test_the_key_never_reaches_the_logs(sim, bridge_factory, caplog):
    caplog.set_level(logging.DEBUG)
    running = await keyed_bridge(sim, bridge_factory)
    api = running.api()
    bearer = {"Authorization": f"Bearer {KEY}"}
    client_id = new_client_id()
    socket = await ws_connect(running, f"clientId={client_id}&token={KEY}")
    socket.close()
    for query in (f"clientId=bad%20id&token={KEY}", f"token={KEY}", f"clientId={client_id}&%74oken={KEY}",
                  f"clientId={client_id}&TOKEN={KEY}", f"clientId={client_id}&api_key={KEY}"):
        with pytest.raises(httpclient.HTTPClientError):
            # (not `"bad" in query`: a uuid4 clientId can contain "bad", e.g. "...-bada-...")
            bad_id = query.startswith("clientId=bad%20id")
            await ws_connect(running, query, headers={} if bad_id else {"Authorization": "Bearer no"})
        for path in ("/execution-info", "/status", "/history", "/nowhere"):
            await api.fetch(f"{path}?{query}")             # 401: no header
            await api.fetch(f"{path}?{query}", headers=bearer)  # 400 / 404 / 204 with the key
    await api.fetch(f"/generate-based-workflow?clientId={client_id}&token={KEY}", "POST",
                    b'{"workflow": "nope"}', headers=bearer)
    await api.fetch(f"/upload?token={KEY}", "POST", b"junk", headers={**bearer, "Content-Type": "text/plain"})
    records = caplog.records
    assert any(r.name == "bridge.access" and "/ws" in r.getMessage() for r in records)
    assert any("***" in r.getMessage() for r in records)  # tornado's warning lines were scrubbed
    for record in records:
        text = record.getMessage() + (caplog.handler.format(record) if record.exc_info else "")
        assert KEY not in text, text
    api.close()


# ---------------------------------------------------------------- CORS

ALLOWED = "https://app.example"


async def test_cors_is_off_by_default(api):
    for method, path in (("GET", "/workflow-list"), ("OPTIONS", "/generate-based-workflow"),
                         ("OPTIONS", "/upload"), ("GET", "/healthz")):
        response = await api.fetch(path, method, headers={"Origin": ALLOWED,
                                                          "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in response.headers, (method, path)
        assert "Access-Control-Allow-Credentials" not in response.headers


async def test_cors_allows_listed_origins_only(sim, bridge_factory):
    running = await bridge_factory([sim], cors_origins=f"{ALLOWED}, https://other.example/",
                                   bridge_api_key=KEY)
    api = running.api()
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    for path in ("/generate-based-workflow", "/upload", "/free", "/interrupt", "/workflow-list",
                 "/history", "/execution-info"):
        # a preflight carries no credentials: it must pass without the key
        ok = await api.fetch(path, "OPTIONS", headers={"Origin": ALLOWED, **preflight})
        assert ok.code in (200, 204), (path, ok.code, ok.body)
        assert ok.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "POST" in ok.headers["Access-Control-Allow-Methods"]
        allowed_headers = ok.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed_headers and "content-type" in allowed_headers
        assert "origin" in ok.headers.get("Vary", "").lower()
        for origin in ("https://evil.example", "null", "https://app.example.evil.example",
                       "http://app.example"):
            refused = await api.fetch(path, "OPTIONS", headers={"Origin": origin, **preflight})
            assert "Access-Control-Allow-Origin" not in refused.headers, (path, origin)
    other = await api.fetch("/workflow-list", headers={"Origin": "https://other.example",
                                                       "Authorization": f"Bearer {KEY}"})
    assert other.code == 200 and other.headers["Access-Control-Allow-Origin"] == "https://other.example"
    # a refusal is readable by the allowed page (it carries the CORS header too)
    denied = await api.fetch("/workflow-list", headers={"Origin": ALLOWED})
    assert denied.code == 401 and denied.headers["Access-Control-Allow-Origin"] == ALLOWED
    # never a wildcard, never credentials (the key travels in a header, not a cookie)
    for response in (other, denied):
        assert response.headers.get("Access-Control-Allow-Origin") != "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
    api.close()


# ---------------------------------------------------------------- what ComfyUI sees

@pytest.fixture
def sim_headers(monkeypatch):
    """Every request header set the simulators receive (HTTP and websocket)."""
    from comfysim import handlers as sim_handlers
    seen: list[tuple[str, dict]] = []
    original = sim_handlers.SimMixin._gate_request

    async def recording(self):
        seen.append((self.request.uri, dict(self.request.headers)))
        return await original(self)

    monkeypatch.setattr(sim_handlers.SimMixin, "_gate_request", recording)
    return seen


async def test_client_headers_never_reach_comfyui(sim_headers, sim, bridge_factory):
    running = await keyed_bridge(sim, bridge_factory)
    api = running.api()
    hostile = {"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example",
               "Cookie": "session=victim", "X-Forwarded-For": "10.6.6.6", "Referer": "http://evil.example/x",
               "X-API-Key": KEY}
    body, ctype = _one_png()
    saved = ujson.loads((await api.fetch("/upload", "POST", body,
                                         headers={**hostile, "Content-Type": ctype})).body)["file"]
    client_id = new_client_id()
    response = await api.fetch(f"/generate-based-workflow?clientId={client_id}", "POST",
                               {"workflow": "invert", "1/image": saved},
                               headers={**hostile, "Content-Type": "application/json"})
    assert response.code == 200, response.body
    socket = await ws_connect(running, f"clientId={client_id}", hostile)
    statuses = []
    while (raw := await socket.read_message()) is not None:
        statuses.append(ujson.loads(raw)["status"])
    socket.close()
    assert statuses[-1] == "closed", statuses  # a forwarded foreign Origin would get a 403 from ComfyUI
    await api.fetch(f"/free?clientId={client_id}", "POST", headers=hostile)
    assert len(await running.api(KEY).history(client_id)) == 1
    uris = [uri for uri, _ in sim_headers]
    assert any(u.startswith("/prompt") for u in uris) and any(u.startswith("/upload/image") for u in uris)
    for uri, headers in sim_headers:
        names = {name.lower() for name in headers}
        assert not names & {"authorization", "cookie", "origin", "x-api-key", "referer",
                            "x-forwarded-for"}, (uri, headers)
        assert KEY not in str(headers) and KEY not in uri, uri
    api.close()


def _one_png():
    from tests.conftest import multipart
    return multipart([("file", "in.png", png_bytes(), "image/png")])
