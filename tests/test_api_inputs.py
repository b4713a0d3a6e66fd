"""Workflow list/info, uploads and generate's validation, through HTTP."""
import io

import ujson
from PIL import Image

from tests.conftest import multipart, new_client_id, png_bytes


async def test_workflow_list(api):
    aliases = await api.json("/workflow-list")
    assert {"invert", "blank-image", "blur-scale", "slow-progress", "text-to-image"} <= set(aliases)


async def test_workflow_info_shape(api):
    info = await api.json("/workflow-info?workflow=text-to-image")
    assert info["6/text"]["type"] == "str" and info["6/text"]["class"] == "CLIPTextEncode"
    assert info["6/text"]["title"] and "default" in info["6/text"]
    assert info["3/seed"]["type"] == "int" and isinstance(info["3/seed"]["default"], int)
    image = (await api.json("/workflow-info?workflow=invert"))["1/image"]
    assert image["class"] == "LoadImage" and image["type"] == "str" and image.get("upload") is True


async def test_workflow_info_errors(api):
    missing = await api.json("/workflow-info", expect=400)
    assert "workflow" in missing["detail"]
    unknown = await api.json("/workflow-info?workflow=nope", expect=400)
    assert "nope" in unknown["detail"] and "invert" in unknown["detail"]


async def test_unknown_path_is_json_404(api):
    response = await api.fetch("/no/such/thing")
    assert response.code == 404 and "detail" in ujson.loads(response.body)


async def test_upload_several_parts_maps_identifiers(api, bridge):
    body, ctype = multipart([("first", "a.png", png_bytes(seed=1), "image/png"),
                             ("second", "../../etc/b.png", png_bytes(seed=2), "image/png")])
    saved = await api.json("/upload", "POST", body, headers={"Content-Type": ctype})
    assert set(saved) == {"first", "second"} and saved["first"] != saved["second"]
    for name in saved.values():
        assert "/" not in name and ".." not in name and name.endswith(".png")
        assert bridge.bridge.uploads.exists(name)


async def test_upload_default_identifier_is_file(api):
    body, ctype = multipart([("", "a.png", png_bytes(), "image/png")])
    saved = await api.json("/upload", "POST", body, headers={"Content-Type": ctype})
    assert list(saved) == ["file"]


async def test_upload_refuses_non_media_naming_the_part(api, bridge):
    body, ctype = multipart([("good", "a.png", png_bytes(), "image/png"),
                             ("evil", "x.png", b"MZ\x90\x00 not an image at all", "image/png")])
    answer = await api.json("/upload", "POST", body, headers={"Content-Type": ctype}, expect=400)
    assert "evil" in answer["detail"]
    assert list(bridge.bridge.settings.uploads_dir.rglob("*.png")) == []  # nothing partial left


async def test_upload_over_limit_is_413_and_leaves_nothing(sim, bridge_factory):
    bridge = await bridge_factory([sim], upload_max_size=1)
    api = bridge.api()
    big = png_bytes() + b"\0" * (1024 * 1024 + 10)
    body, ctype = multipart([("file", "big.png", big, "image/png")])
    response = await api.fetch("/upload", "POST", body, headers={"Content-Type": ctype})
    assert response.code == 413 and "detail" in ujson.loads(response.body)
    assert [p for p in bridge.bridge.settings.uploads_dir.rglob("*") if p.is_file()] == []
    api.close()


async def test_upload_needs_multipart(api):
    answer = await api.json("/upload", "POST", b"{}", headers={"Content-Type": "application/json"}, expect=400)
    assert "multipart" in answer["detail"]


async def test_generate_validation_names_the_key(api):
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    cases = [
        ({}, "workflow"),
        ({"workflow": "nope"}, "nope"),
        ({"workflow": "invert", "7/txt": "x"}, "7/txt"),
        ({"workflow": "blank-image", "1/width": "wide"}, "1/width"),
        ({"workflow": "blank-image", "1/width": True}, "1/width"),
        ({"workflow": "blank-image", "1/width": 1.5}, "1/width"),
        ({"workflow": "invert", "1/image": "never-uploaded.png"}, "1/image"),
        ({"workflow": "invert", "1/image": "../../etc/passwd"}, "1/image"),
        ({"workflow": "text-to-image", "6/text": 5}, "6/text"),
    ]
    for body, named in cases:
        answer = await api.generate(client_id, body, expect=400)
        assert named in answer["detail"], (body, answer)
    # None of those created a job.
    assert (await api.fetch(f"/history?clientId={client_id}")).code == 204
    assert await api.generate(client_id, {"workflow": "invert", "1/image": saved}) == {"detail": "queued / 1"}
    await api.wait_status(client_id, "closed")


async def test_generate_bad_json_is_400(api):
    for body in (b"{not json", b"[1, 2]", b""):
        response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST", body,
                                   headers={"Content-Type": "application/json"})
        assert response.code == 400, body
        assert "detail" in ujson.loads(response.body)


async def test_generate_applies_inputs_and_keeps_defaults(api, sim):
    client_id = new_client_id()
    saved = await api.upload(png_bytes(32, 32))
    await api.generate(client_id, {"workflow": "blur-scale", "1/image": saved, "2/width": 8, "2/height": 6})
    await api.wait_status(client_id, "closed")
    parts = await api.history(client_id)
    assert Image.open(io.BytesIO(parts[0]["data"])).size == (8, 6)
    sent = [body for method, path, body in sim.requests_log if method == "POST" and path.endswith("/prompt")][-1]
    graph = sent["prompt"]
    assert graph["2"]["inputs"]["width"] == 8 and graph["2"]["inputs"]["height"] == 6
    assert graph["3"]["inputs"]["blur_radius"] == 3 and graph["3"]["inputs"]["sigma"] == 1.0  # defaults
    assert graph["1"]["inputs"]["image"] == f"bridge/{saved}"  # as the backend named it in /upload/image
    assert "client_id" in sent and "prompt_id" in sent


async def test_workflow_default_file_is_put_on_the_backend(api):
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert"})
    await api.wait_status(client_id, "closed", "error")
    info = await api.json(f"/execution-info?clientId={client_id}")
    assert info["status"] == "closed", info
    assert len(await api.history(client_id)) == 1
