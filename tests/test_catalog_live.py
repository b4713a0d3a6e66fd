"""A workflow file or the alias file broken during a live edit: the running bridge keeps
serving the last good version, /status names the broken file since when, and the fix is
picked up (and the entry cleared) without a restart."""
import json
import shutil
import time

import pytest
import ujson

from handlers.openapi import DOCUMENT
from tests.conftest import ROOT, new_client_id, wait_for
from tests.test_openapi import Checker


@pytest.fixture
async def live(tmp_path, sim, bridge_factory):
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", folder)
    bridge = await bridge_factory([sim], workflow_dir=str(folder), workflow_alias=str(folder / "aliases.json"))
    api = bridge.api()
    yield folder, api
    api.close()


async def broken_files(api) -> list[dict]:
    return (await api.json("/status"))["catalog"]["broken"]


async def wait_broken(api, name: str) -> dict:
    async def named():
        return next((b for b in await broken_files(api) if b["file"] == name), None)
    return await wait_for(named, timeout=5, interval=0.05, what=f"/status to name {name}")


async def test_broken_workflow_file_keeps_serving_its_last_good_version(live, sim):
    folder, api = live
    checker = Checker(ujson.loads(DOCUMENT.read_text()))
    assert await broken_files(api) == []
    before = time.time()
    (folder / "blank.json").write_text('{"1": {"class_type": "EmptyIm')      # a half-saved edit
    broken = await wait_broken(api, "blank.json")
    assert before - 1 <= broken["since"] <= time.time()
    assert "invalid JSON" in broken["error"] and broken["aliases"] == ["blank-image"]
    checker.check("/status", "get", await api.fetch("/status"))

    assert "blank-image" in await api.json("/workflow-list")
    assert (await api.json("/workflow-info?workflow=blank-image"))["1/width"]["default"] == 512
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "blank-image", "1/width": 8, "1/height": 8})
    await api.wait_status(client_id, "closed")

    graph = json.loads((ROOT / "workflows" / "blank.json").read_text())
    graph["1"]["inputs"]["width"] = 64
    (folder / "blank.json").write_text(json.dumps(graph))

    async def fixed():
        info = await api.json("/workflow-info?workflow=blank-image")
        return info["1/width"]["default"] == 64
    await wait_for(fixed, timeout=5, interval=0.05, what="the fixed workflow to be served")
    assert await broken_files(api) == []


async def test_broken_alias_file_keeps_serving_the_last_good_table(live):
    folder, api = live
    aliases_before = await api.json("/workflow-list")
    alias_file = folder / "aliases.json"
    good = alias_file.read_text()
    alias_file.write_text(good[: len(good) // 2])                         # cut mid-save
    broken = await wait_broken(api, "aliases.json")
    assert "invalid JSON" in broken["error"] and broken["aliases"] == []
    assert await api.json("/workflow-list") == aliases_before
    assert "1/width" in await api.json("/workflow-info?workflow=blank-image")

    table = json.loads(good)
    table["copy"] = {"file": "blank.json", "inputs": ["1/width"]}
    alias_file.write_text(json.dumps(table))

    async def fixed():
        return "copy" in await api.json("/workflow-list")
    await wait_for(fixed, timeout=5, interval=0.05, what="the fixed alias file to be read")
    assert await broken_files(api) == []


async def test_broken_at_start_up_is_unavailable_and_named(tmp_path, sim, bridge_factory):
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", folder)
    (folder / "blank.json").write_text("{")
    bridge = await bridge_factory([sim], workflow_dir=str(folder), workflow_alias=str(folder / "aliases.json"))
    api = bridge.api()
    try:
        assert "blank-image" not in await api.json("/workflow-list")
        refused = await api.generate(new_client_id(), {"workflow": "blank-image"}, expect=400)
        assert "unavailable" in refused["detail"]
        [broken] = await broken_files(api)
        assert broken["file"] == "blank.json"
        shutil.copy(ROOT / "workflows" / "blank.json", folder / "blank.json")

        async def fixed():
            return "blank-image" in await api.json("/workflow-list")
        await wait_for(fixed, timeout=5, interval=0.05, what="the fixed workflow to appear")
        assert await broken_files(api) == []
    finally:
        api.close()
