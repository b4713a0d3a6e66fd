"""GET /docs and /docs/assets/ over HTTP (tests/test_page_browser.py renders it in Chromium):
behind the key like /openapi.json, a key form for browsers, only this bridge's own files."""
from __future__ import annotations

import re

import pytest
import ujson

import handlers.docs
from handlers.docs import ASSETS

from .conftest import ROOT

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture
async def keyed(sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_key="docs-key")
    client = running.api()
    yield client
    client.close()


def referenced(page: str) -> list[str]:
    return re.findall(r'(?:src|href|action)="([^"]*)"', page)


async def test_docs_page_loads_only_files_of_this_bridge(api):
    response = await api.fetch("/docs")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["Cache-Control"] == "no-store"
    page = response.body.decode()
    assert "://" not in page  # no URL with a host: everything relative to this bridge
    urls = referenced(page)
    assert "docs/assets/swagger-ui-bundle.js" in urls and "static/docs.js" in urls
    for url in urls:  # each one is served, without a key
        asset = await api.fetch("/" + url)
        assert asset.code == 200, url
    script = (ROOT / "static" / "docs.js").read_text()
    assert "validatorUrl: null" in script and not re.search(r"https?://", script.split('"use strict"')[1])


async def test_docs_needs_the_key_like_openapi_json(keyed):
    # No key: JSON for API clients, a form for browsers; both 401.
    plain = await keyed.fetch("/docs")
    assert plain.code == 401 and ujson.loads(plain.body)["detail"].startswith("missing or wrong API key")
    assert plain.headers["WWW-Authenticate"] == "Bearer"
    assert (await keyed.fetch("/openapi.json")).code == 401
    form = await keyed.fetch("/docs", headers=HTML)
    assert form.code == 401 and form.headers["Content-Type"].startswith("text/html")
    page = form.body.decode()
    assert '<form method="get" action="docs">' in page and 'name="token"' in page
    assert "asks for an API key" in page and "Content-Security-Policy" in form.headers
    wrong = await keyed.fetch("/docs?token=nope", headers=HTML)
    assert wrong.code == 401 and "That key was not accepted" in wrong.body.decode()
    assert b"nope" not in wrong.body  # the offered key is not echoed
    # The key as a header (either) or as ?token= (browsers).
    for headers, path in (({"Authorization": "Bearer docs-key"}, "/docs"), ({"X-API-Key": "docs-key"}, "/docs"),
                          ({}, "/docs?token=docs-key")):
        response = await keyed.fetch(path, headers={**HTML, **headers})
        assert response.code == 200, (path, headers)
        assert b"swagger-ui-bundle.js" in response.body
    # ?token= is for /docs (and /ws) only, as before.
    assert (await keyed.fetch("/openapi.json?token=docs-key")).code == 401


async def test_docs_assets_are_public_but_only_the_listed_files(keyed):
    for name in ASSETS:
        response = await keyed.fetch(f"/docs/assets/{name}")
        assert response.code == 200, name
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert (await keyed.fetch("/docs/assets/swagger-ui-bundle.js")).headers["Content-Type"] == "text/javascript"
    head = await keyed.fetch("/docs/assets/swagger-ui.css", method="HEAD")
    assert head.code == 200 and int(head.headers["Content-Length"]) > 10_000
    for path in ("/docs/assets/swagger-editor-bundle.js", "/docs/assets/index.css", "/docs/assets/",
                 "/docs/assets/..%2F..%2Fswagger_ui%2F__init__.py", "/docs/assets/%2e%2e/core.py",
                 "/docs/assets/swagger-ui-bundle.js/x"):
        response = await keyed.fetch(path)
        assert response.code == 404, path
        assert ujson.loads(response.body)["detail"].startswith("no such file"), path


async def test_docs_without_swagger_ui_installed_says_what_is_missing(monkeypatch, sim, bridge_factory):
    monkeypatch.setattr(handlers.docs, "swagger_ui_dir", lambda: None)
    running = await bridge_factory([sim])
    client = running.api()
    try:
        response = await client.fetch("/docs")
        assert response.code == 503
        assert "swagger-ui-py" in ujson.loads(response.body)["detail"]
        asset = await client.fetch("/docs/assets/swagger-ui.css")
        assert asset.code == 404
        assert (await client.fetch("/healthz")).code == 200  # the rest of the bridge is unaffected
    finally:
        client.close()


def test_swagger_ui_is_found_with_every_listed_file():
    folder = handlers.docs.swagger_ui_dir()
    assert folder is not None and all((folder / name).is_file() for name in ASSETS)
