"""What a form needs beside the specification's keys of GET /workflow-info (the backends'
limits of each input, the alias entry's description), and generate refusing a value outside
those limits before a job is queued."""
import json
import shutil
from types import SimpleNamespace

import pytest

from balancer.comfy.answers import input_limits, input_spec
from balancer.errors import Refused
from balancer.intake import JobIntake, _check_limits
from storage.catalog import WorkflowCatalog
from tests.conftest import ROOT, new_client_id, wait_for

SPEC_KEYS = {"type", "title", "class", "default", "upload"}


# -- reading /object_info -----------------------------------------------------------------

@pytest.mark.parametrize("spec, limits", [
    (["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], {"min": 1, "max": 16384, "step": 1}),
    (["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "round": 0.01}],
     {"min": 0.1, "max": 10.0, "step": 0.1}),
    (["INT", {"default": 1, "min": 1}], {"min": 1}),
    (["INT"], {}),
    (["INT", {"min": True, "max": "9", "step": float("nan")}], {}),
    ([["nearest-exact", "bilinear"]], {"choices": ["nearest-exact", "bilinear"]}),        # older servers
    ([["a", "b"], {"default": "a"}], {"choices": ["a", "b"]}),
    (["COMBO", {"options": ["euler", "dpmpp_2m"], "default": "euler"}],                 # newer servers
     {"choices": ["euler", "dpmpp_2m"]}),
    (["COMBO", {"remote": {"route": "/x"}}], {}),                                         # no options known
    ([["a.png", "b.png"], {"image_upload": True}], {}),         # the server's input folder
    (["COMBO", {"options": ["a.mp4"], "video_upload": True}], {}),
    (["STRING", {"default": "x", "multiline": True}], {}),
    (["IMAGE"], {}),
    (None, {}),
    ("INT", {}),
])
def test_input_limits_from_object_info(spec, limits):
    assert input_limits(spec) == limits


def test_input_spec_looks_in_required_then_optional():
    info = {"N": {"input": {"required": {"a": ["INT", {"max": 3}]},
                            "optional": {"b": [["x", "y"]]}, "hidden": {"c": "PROMPT"}}}}
    assert input_spec(info, "N", "a") == ["INT", {"max": 3}]
    assert input_spec(info, "N", "b") == [["x", "y"]]
    assert input_spec(info, "N", "c") is None
    assert input_spec(info, "Other", "a") is None
    assert input_spec({"N": {"input": "junk"}}, "N", "a") is None
    assert input_spec(None, "N", "a") is None


# -- where the limits come from -----------------------------------------------------------

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "color": 0}, "_meta": {"title": "Empty"}},
    "2": {"class_type": "KSampler", "inputs": {"sampler_name": "euler", "cfg": 8.0}},
    "3": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


def object_info(max_width: int = 16384) -> dict:
    return {
        "EmptyImage": {"input": {"required": {"width": ["INT", {"min": 1, "max": max_width, "step": 1}],
                                              "color": ["INT", {"min": 0, "max": 16777215}]}}},
        "KSampler": {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler", "dpmpp_2m"]}],
                                            "cfg": ["FLOAT", {"min": 0.0, "max": 100.0, "step": 0.1}]}}},
        "LoadImage": {"input": {"required": {"image": [["other.png"], {"image_upload": True}]}}},
    }


def backend(address: str, info: dict | None, up: bool = True):
    fake = SimpleNamespace(address=address, up=up, node_classes=frozenset(info or ()))
    if info is not None:
        fake.object_info = info
    return fake


@pytest.fixture
def workflow(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    (tmp_path / "aliases.json").write_text(json.dumps({
        "g": {"file": "g.json", "inputs": ["1/width", "1/color", "2/sampler_name", "2/cfg", "3/image"],
              "description": "a test graph"},
        "pinned": {"file": "g.json", "inputs": ["1/width"], "backends": ["b:1"]}}))
    return WorkflowCatalog(tmp_path, tmp_path / "aliases.json", check_interval=0)


def refusal(workflow, values: dict, backends) -> str | None:
    graph, _ = workflow.build_prompt(values)
    try:
        _check_limits(workflow, graph, values, backends)
    except Refused as exc:
        return str(exc)
    return None


def test_describe_adds_limits_and_description_beside_the_specification_keys(workflow):
    wf = workflow.get("g")
    info = JobIntake.describe(wf, [backend("a:1", object_info())])
    assert {k: {n: v for n, v in e.items() if n in SPEC_KEYS} for k, e in info.items()} == wf.info()
    assert info["1/width"] == {**wf.info()["1/width"], "min": 1, "max": 16384, "step": 1,
                                    "workflow_description": "a test graph"}
    assert info["2/sampler_name"]["choices"] == ["euler", "dpmpp_2m"]
    assert (info["2/cfg"]["min"], info["2/cfg"]["max"], info["2/cfg"]["step"]) == (0.0, 100.0, 0.1)
    # A file input: the bridge uploads it; the backend's input folder is no choice list.
    assert "choices" not in info["3/image"] and info["3/image"]["upload"] is True
    # No backend known yet: only the specification's keys and the description.
    bare = JobIntake.describe(wf, [backend("a:1", None, up=False)])
    assert {k: {n: v for n, v in e.items() if n != "workflow_description"} for k, e in bare.items()} == wf.info()


def test_limits_come_from_the_first_backend_up_with_that_class(workflow):
    wf = workflow.get("g")
    too_wide = {"1/width": 5000}
    narrow, wide = backend("a:1", object_info(max_width=4096)), backend("b:1", object_info())
    assert refusal(wf, too_wide, [narrow, wide]) == "input '1/width': 5000 is above its maximum 4096"
    assert refusal(wf, too_wide, [wide, narrow]) is None
    narrow.up = False                                             # a down backend is not asked
    assert refusal(wf, too_wide, [narrow, wide]) is None
    no_class = backend("c:1", {"SaveImage": {"input": {}}})       # up, but without EmptyImage
    assert refusal(wf, too_wide, [no_class, backend("a:1", object_info(4096))]).endswith("maximum 4096")
    # Nothing known yet (not connected, or no object_info): nothing refused.
    assert refusal(wf, too_wide, []) is None
    assert refusal(wf, too_wide, [backend("a:1", None)]) is None
    assert refusal(wf, too_wide, [no_class]) is None


def test_limits_of_a_pinned_workflow_come_from_its_backends(workflow):
    pinned = workflow.get("pinned")
    others, its = backend("a:1", object_info(max_width=4096)), backend("b:1", object_info())
    assert refusal(pinned, {"1/width": 5000}, [others, its]) is None
    assert JobIntake.describe(pinned, [others, its])["1/width"]["max"] == 16384


@pytest.mark.parametrize("values, message", [
    ({"1/width": 0}, "input '1/width': 0 is below its minimum 1"),
    ({"1/width": 16385}, "input '1/width': 16385 is above its maximum 16384"),
    ({"1/color": -1}, "input '1/color': -1 is below its minimum 0"),
    ({"2/cfg": 100.5}, "input '2/cfg': 100.5 is above its maximum 100.0"),
    ({"2/sampler_name": "ddim"}, "input '2/sampler_name': 'ddim' is not one of its choices: euler, dpmpp_2m"),
])
def test_out_of_limits_refused_naming_input_and_limit(workflow, values, message):
    assert refusal(workflow.get("g"), values, [backend("a:1", object_info())]).startswith(message)


@pytest.mark.parametrize("values", [
    {"1/width": 1}, {"1/width": 16384}, {"1/color": 16777215}, {"2/cfg": 0}, {"2/cfg": 7.5},
    {"2/sampler_name": "dpmpp_2m"},
    {"3/image": "anything.png"},               # file inputs are never checked against choices
    {},                                        # the file's defaults are not the client's
])
def test_values_within_limits_pass(workflow, values):
    assert refusal(workflow.get("g"), values, [backend("a:1", object_info())]) is None


def test_long_choice_lists_are_cut_in_the_refusal(workflow):
    info = object_info()
    info["KSampler"]["input"]["required"]["sampler_name"] = [[f"s{i}" for i in range(40)]]
    message = refusal(workflow.get("g"), {"2/sampler_name": "x"}, [backend("a:1", info)])
    assert "s0, s1" in message and "s9 and 30 more" in message and "s10" not in message


# -- through HTTP, against the simulator ----------------------------------------------------

async def test_workflow_info_has_the_simulator_limits_and_the_description(api):
    info = await api.json("/workflow-info?workflow=blank-image")
    for key in ("1/width", "1/height"):
        assert info[key] == {"type": "int", "title": "Empty Image", "class": "EmptyImage", "default": 512,
                             "min": 1, "max": 16384, "step": 1,
                             "workflow_description": info[key]["workflow_description"]}
        assert info[key]["workflow_description"].startswith("A plain image")
    assert (info["1/color"]["min"], info["1/color"]["max"]) == (0, 16777215)
    blur = await api.json("/workflow-info?workflow=blur-scale")
    assert (blur["3/blur_radius"]["min"], blur["3/blur_radius"]["max"]) == (1, 31)
    assert (blur["2/width"]["min"], blur["2/width"]["max"]) == (0, 16384)
    assert blur["1/image"]["upload"] is True and "choices" not in blur["1/image"]
    t2i = await api.json("/workflow-info?workflow=text-to-image")       # the simulator's KSampler and
    assert (t2i["3/steps"]["min"], t2i["3/steps"]["max"]) == (1, 10000)   # its checkpoint folder
    assert t2i["4/ckpt_name"]["choices"] and "min" not in t2i["6/text"]


def prompts_posted(sim) -> int:
    return sum(1 for method, path, _ in sim.requests_log if method == "POST" and path.endswith("/prompt"))


async def test_generate_out_of_range_is_refused_before_queueing(api, sim, bridge):
    client_id = new_client_id()
    answer = await api.generate(client_id, {"workflow": "blank-image", "1/width": 100000, "1/height": 8},
                                expect=400)
    assert answer["detail"] == "input '1/width': 100000 is above its maximum 16384"
    answer = await api.generate(client_id, {"workflow": "blur-scale", "3/blur_radius": 0}, expect=400)
    assert answer["detail"] == "input '3/blur_radius': 0 is below its minimum 1"
    assert prompts_posted(sim) == 0
    assert (await api.json("/status"))["queue"]["length"] == 0
    assert client_id not in bridge.service.jobs
    # The edge of the range is accepted and runs.
    await api.generate(client_id, {"workflow": "blank-image", "1/width": 16384, "1/height": 1})
    await api.wait_status(client_id, "closed")
    assert prompts_posted(sim) == 1


async def test_generate_refuses_a_value_not_in_a_list_input(tmp_path, sim, bridge_factory):
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", folder)
    aliases = json.loads((folder / "aliases.json").read_text())
    aliases["scale"] = {"file": "blur-scale.json", "inputs": ["1/image", "2/upscale_method"]}
    (folder / "aliases.json").write_text(json.dumps(aliases))
    bridge = await bridge_factory([sim], workflow_dir=str(folder), workflow_alias=str(folder / "aliases.json"))
    api = bridge.api()
    try:
        info = await api.json("/workflow-info?workflow=scale")
        assert info["2/upscale_method"]["choices"] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
        answer = await api.generate(new_client_id(), {"workflow": "scale", "2/upscale_method": "sharpest"},
                                    expect=400)
        assert answer["detail"].startswith("input '2/upscale_method': 'sharpest' is not one of its choices: "
                                           "nearest-exact, bilinear")
        assert prompts_posted(sim) == 0
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "scale", "2/upscale_method": "bicubic"})
        await api.wait_status(client_id, "closed")
    finally:
        api.close()


async def test_nothing_refused_before_a_backend_described_its_nodes(sim_factory, bridge_factory):
    sim = await sim_factory()
    await sim.stop()                                  # never reachable: no object_info known
    bridge = await bridge_factory([sim], wait_up=False)
    api = bridge.api()
    try:
        info = await api.json("/workflow-info?workflow=blank-image")
        assert "max" not in info["1/width"]
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "blank-image", "1/width": 100000})
        await wait_for(lambda: client_id in bridge.service.jobs, timeout=5, what="the job to be held")
    finally:
        api.close()
