"""GET /openapi.json: a valid OpenAPI document that describes every route the bridge serves,
and whose schemas the bridge's real answers satisfy."""
from __future__ import annotations

import re

import pytest
import ujson
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from tornado import web

import handlers
from comfy_bridge_version import __version__
from handlers.openapi import DOCUMENT
from tests.conftest import ROOT, multipart, new_client_id, png_bytes, wait_for

# OPTIONS (CORS preflight) and HEAD (static files) are HTTP mechanics, described in prose.
UNDOCUMENTED_METHODS = {"options", "head"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return ujson.loads(DOCUMENT.read_text())


def implemented_methods(handler_class) -> set[str]:
    served = {m.lower() for m in handler_class.SUPPORTED_METHODS
              if getattr(handler_class, m.lower()) is not getattr(web.RequestHandler, m.lower())}
    if "head" in served and "get" not in served:
        return {"head"}  # a route that is only HEAD (v2's by-hash probe) is described
    return served - UNDOCUMENTED_METHODS


def sample_path(template: str) -> str:
    """/static/{path} -> /static/x: a concrete path the route regex must match."""
    return re.sub(r"\{[^}]+\}", "x", template)


def test_document_is_valid_openapi(spec):
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises OpenAPIValidationError with the offending place


def test_every_route_is_described_with_its_methods(spec):
    routes = handlers.all_routes(str(ROOT / "static"))
    described = spec["paths"]
    seen = set()
    for route in routes:
        pattern, handler_class = route[0], route[1]
        matches = [p for p in described if re.fullmatch(pattern, sample_path(p))]
        assert matches, f"route {pattern} ({handler_class.__name__}) is not in openapi.json"
        for path in matches:
            seen.add(path)
            methods = set(described[path]) - {"parameters", "summary", "description", "servers"}
            missing = implemented_methods(handler_class) - methods
            assert not missing, f"{path}: {sorted(missing)} not described"
            extra = methods - implemented_methods(handler_class)
            assert not extra, f"{path}: {sorted(extra)} described but not served"
    assert seen == set(described), f"described but not served: {sorted(set(described) - seen)}"


def test_contract_details_are_described(spec):
    paths = spec["paths"]
    history = paths["/history"]["get"]["responses"]
    assert "X-Bridge-Detail" in history["204"]["headers"]
    assert "content" not in history["204"]
    assert "multipart/form-data" in history["200"]["content"]
    ws = paths["/ws"]["get"]
    assert {"101", "400", "401"} <= set(ws["responses"])
    assert [p for p in ws["parameters"] if p.get("name") == "token"]
    assert "multipart/form-data" in paths["/upload"]["post"]["requestBody"]["content"]
    assert paths["/healthz"]["get"]["security"] == []
    # Public by contract: only /healthz and the test page; and Swagger UI's files for /docs.
    public = sorted(p for p, item in paths.items() if item[next(m for m in ("get", "post", "head") if m in item)].get("security") == [])
    assert public == ["/", "/docs/assets/{path}", "/healthz", "/static/{path}"]
    assert {"tokenQuery": []} in paths["/docs"]["get"]["security"]


def test_document_names_the_license_and_points_inside_the_repository(spec):
    assert spec["info"]["license"] == {"name": "MIT", "identifier": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "docs/API.md" in spec["info"]["description"]
    assert (ROOT / "docs" / "API.md").is_file()
    assert "contract is API.md" not in spec["info"]["description"]


async def test_served_document_is_the_file_and_needs_the_key(sim, bridge_factory, spec):
    bridge = await bridge_factory([sim], bridge_api_key="doc-key")
    anonymous, keyed = bridge.api(), bridge.api("doc-key")
    try:
        assert (await anonymous.fetch("/openapi.json")).code == 401
        response = await keyed.fetch("/openapi.json")
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        served = ujson.loads(response.body)
        assert served["info"].pop("version") == __version__  # the one version, set when served
        assert served["info"]["license"]["identifier"] == "MIT"
        assert served == {**spec, "info": {k: v for k, v in spec["info"].items() if k != "version"}}
    finally:
        anonymous.close()
        keyed.close()


class Checker:
    """Validates real answers against the document's response schemas."""

    def __init__(self, spec: dict):
        self.spec = spec

    def schema(self, path: str, method: str, status: int, media: str = "application/json") -> dict:
        response = self.spec["paths"][path][method]["responses"][str(status)]
        if "$ref" in response:
            response = self.spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        return response["content"][media]["schema"]

    def check(self, path: str, method: str, response, status: int | None = None) -> None:
        status = status or response.code
        assert response.code == status, (path, response.code, response.body)
        schema = {**self.schema(path, method, status), "components": self.spec["components"]}
        OAS31Validator(schema).validate(ujson.loads(response.body))


async def test_real_answers_match_the_schemas(api, spec):
    c = Checker(spec)
    c.check("/workflow-list", "get", await api.fetch("/workflow-list"))
    c.check("/workflow-info", "get", await api.fetch("/workflow-info?workflow=invert"))
    c.check("/workflow-info", "get", await api.fetch("/workflow-info?workflow=nope"), 400)
    c.check("/healthz", "get", await api.fetch("/healthz"))
    c.check("/generation-count", "get", await api.fetch("/generation-count"))
    body, ctype = multipart([("file", "in.png", png_bytes(), "image/png")])
    upload = await api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    c.check("/upload", "post", upload)
    saved = ujson.loads(upload.body)["file"]

    client_id = new_client_id()
    empty = await api.fetch(f"/history?clientId={client_id}")
    assert empty.code == 204 and empty.headers["X-Bridge-Detail"]
    generated = await api.fetch(f"/generate-based-workflow?clientId={client_id}", "POST",
                                {"workflow": "invert", "1/image": saved})
    c.check("/generate-based-workflow", "post", generated)
    c.check("/generate-based-workflow", "post", await api.fetch(
        f"/generate-based-workflow?clientId={new_client_id()}", "POST", {"workflow": "invert", "7/x": 1}), 400)
    c.check("/execution-info", "get", await api.fetch(f"/execution-info?clientId={client_id}"))
    c.check("/status", "get", await api.fetch("/status"))
    await api.wait_status(client_id, "closed")
    c.check("/execution-info", "get", await api.fetch(f"/execution-info?clientId={client_id}"))
    c.check("/free", "post", await api.fetch("/free", "POST"))
    c.check("/free", "post", await api.fetch(f"/free?clientId={client_id}", "POST"))
    c.check("/interrupt", "post", await api.fetch(f"/interrupt?clientId={client_id}", "POST"))  # ended: a no-op
    history = await api.fetch(f"/history?clientId={client_id}")
    assert history.code == 200 and history.headers["Content-Type"].startswith("multipart/form-data")
    c.check("/interrupt", "post", await api.fetch(f"/interrupt?clientId={new_client_id()}", "POST"), 400)
    c.check("/status", "get", await api.fetch("/status"))


def test_tenant_extensions_are_described(spec):
    generate = spec["paths"]["/generate-based-workflow"]["post"]
    assert "Retry-After" in generate["responses"]["429"]["headers"]
    priority = spec["components"]["schemas"]["GenerateRequest"]["properties"]["priority"]
    assert (priority["type"], priority["minimum"], priority["maximum"], priority["default"]) == ("integer", -100, 100, 0)
    assert "tenants" in spec["components"]["schemas"]["Status"]["properties"]


async def test_a_429_matches_its_schema(sim, bridge_factory, spec):
    bridge = await bridge_factory([sim], bridge_api_keys="a:key-a", tenant_max_queued=1, max_inflight_per_server=1)
    api = bridge.api("key-a")
    try:
        saved = await api.upload(png_bytes())
        await api.generate(new_client_id(), {"workflow": "slow-progress", "1/image": saved, "2/steps": 500})
        await wait_for(lambda: bridge.service.running_of("a"), 10, what="the first job to run")
        # The second waits: the tenant's limit.
        await api.generate(new_client_id(), {"workflow": "slow-progress", "1/image": saved, "2/steps": 501})
        Checker(spec).check("/generate-based-workflow", "post", await api.fetch(
            f"/generate-based-workflow?clientId={new_client_id()}", "POST", {"workflow": "invert"}), 429)
    finally:
        api.close()
