"""The simulator's model files and GPU memory: loader nodes, load costs (LRU of K files), /free,
load counters, and the text-to-image workflows on the simulator and through the bridge."""
from __future__ import annotations

import asyncio
import copy
import io
import json
import sys

import pytest
from PIL import Image

from comfysim import nodes
from comfysim.files import Folders
from comfysim.models import DEFAULT_MODEL_FILES
from comfysim.testing import WSClient, fetch, wait_until
from tests.conftest import ROOT, new_client_id

TIMEOUT = 10.0
T2I = json.loads((ROOT / "workflows" / "text-to-image.json").read_text())
LORA = json.loads((ROOT / "workflows" / "lora-image.json").read_text())
CKPT_A, CKPT_B, CKPT_C = sorted(DEFAULT_MODEL_FILES["checkpoints"])[:3]


@pytest.fixture
async def gpu_sim(sim_factory, tmp_path):
    """`await gpu_sim(**kwargs)`: a started simulator with short ticks and no load time unless given."""
    made = 0

    async def make(**kwargs):
        nonlocal made
        made += 1
        kwargs.setdefault("tick_seconds", 0.001)
        kwargs.setdefault("model_load_seconds", 0.0)
        return await sim_factory(name="gpu-sim", data_dir=tmp_path / f"sim{made}", **kwargs)
    return make


def t2i(ckpt=CKPT_A, seed=1, steps=1, width=64, height=48, graph=T2I):
    graph = copy.deepcopy(graph)
    graph["4"]["inputs"]["ckpt_name"] = ckpt
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    graph["5"]["inputs"].update(width=width, height=height)
    return graph


async def run(sim, graph, client_id=None):
    """Queue the graph and wait for its run to end; returns (prompt_id, its prompt_times entry)."""
    body = {"prompt": graph} if client_id is None else {"prompt": graph, "client_id": client_id}
    resp = await fetch(sim.url, "/prompt", "POST", body)
    assert resp.code == 200, resp.body
    prompt_id = json.loads(resp.body)["prompt_id"]
    entry = await wait_until(lambda: next((t for t in sim.prompt_times if t.prompt_id == prompt_id), None),
                             TIMEOUT, what=f"prompt {prompt_id} ran")
    assert entry.success, entry
    return prompt_id, entry


def nodes_run(sim, prompt_id) -> list[str]:
    return [node for record in sim.execution_records if record.prompt_id == prompt_id for node in record.nodes]


async def saved_image(sim, prompt_id) -> Image.Image:
    history = json.loads((await fetch(sim.url, f"/history/{prompt_id}")).body)[prompt_id]
    [image] = history["outputs"]["9"]["images"]
    resp = await fetch(sim.url, f"/view?filename={image['filename']}&type=output")
    assert resp.code == 200
    return Image.open(io.BytesIO(resp.body))


# -- the nodes ------------------------------------------------------------------------------

@pytest.mark.parametrize("class_name", [name for name, cls in nodes.NODE_CLASSES.items() if cls.MODEL_INPUTS])
def test_loader_options_list_their_model_folder(class_name):
    cls = nodes.NODE_CLASSES[class_name]
    files = {folder: [f"{folder}-{i}.safetensors" for i in range(2)] for folder in DEFAULT_MODEL_FILES}
    entry = nodes.object_info(Folders("/nonexistent", files), class_name)[class_name]
    for name, folder in cls.MODEL_INPUTS.items():
        spec = entry["input"]["required"][name]
        options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
        expected = files[folder] + (["pixel_space"] if class_name == "VAELoader" else [])
        assert options == expected, name
    assert entry["output"] == list(cls.RETURN_TYPES)


async def test_text_to_image_makes_a_picture_from_seed_and_size(gpu_sim):
    sim, fresh = await gpu_sim(), await gpu_sim()
    first, _ = await run(sim, t2i(seed=5, width=72, height=40))
    other_seed, _ = await run(sim, t2i(seed=6, width=72, height=40))
    more_steps, _ = await run(sim, t2i(seed=5, width=72, height=40, steps=2))
    same_elsewhere, _ = await run(fresh, t2i(seed=5, width=72, height=40))
    a, b, c = [await saved_image(sim, p) for p in (first, other_seed, more_steps)]
    d = await saved_image(fresh, same_elsewhere)
    assert a.size == (72, 40) and a.format == "PNG" and a.text["comfysim"] == "gpu-sim"
    pixels = [i.convert("RGB").tobytes() for i in (a, b, c, d)]
    assert pixels[0] != pixels[1] and pixels[0] != pixels[2]   # the seed and what was sampled decide it
    assert pixels[0] == pixels[3]                              # ... and nothing else


async def test_ksampler_reports_one_progress_per_step(gpu_sim):
    sim = await gpu_sim(tick_seconds=0.01)
    ws = await WSClient.connect(f"ws://{sim.address}", "c1")
    prompt_id, entry = await run(sim, t2i(steps=4), client_id="c1")
    await ws.wait_prompt_done(prompt_id)
    progress = [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in ws.messages
                if m["type"] == "progress"]
    assert progress == [(1, 4, "3"), (2, 4, "3"), (3, 4, "3"), (4, 4, "3")]
    assert entry.ended - entry.started >= 4 * 0.01   # steps ticks of tick_seconds
    await ws.close()


async def test_unknown_model_file_is_refused_as_comfyui_does(gpu_sim):
    sim = await gpu_sim()
    resp = await fetch(sim.url, "/prompt", "POST", {"prompt": t2i(ckpt="nope.safetensors")})
    assert resp.code == 400
    body = json.loads(resp.body)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = body["node_errors"]["4"]["errors"]
    assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == "ckpt_name"
    assert error["details"] == f"ckpt_name: 'nope.safetensors' not in {sorted(DEFAULT_MODEL_FILES['checkpoints'])}"
    assert sim.prompt_times == [] and sim.model_loads == 0
    # the newer combo schema (UpscaleModelLoader: ["COMBO", {"options": [...]}]) is checked too
    graph = {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "nope.pth"}},
             "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    resp = await fetch(sim.url, "/prompt", "POST", {"prompt": graph})
    assert resp.code == 400
    assert json.loads(resp.body)["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
    models = json.loads((await fetch(sim.url, "/models/checkpoints")).body)
    assert models == sorted(DEFAULT_MODEL_FILES["checkpoints"])


async def test_model_files_are_configurable(gpu_sim):
    sim = await gpu_sim(model_files={"checkpoints": ["only.ckpt"]})
    info = json.loads((await fetch(sim.url, "/object_info/CheckpointLoaderSimple")).body)
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["only.ckpt"]
    _, entry = await run(sim, t2i(ckpt="only.ckpt"))
    assert entry.models_loaded == ("checkpoints/only.ckpt",)
    sim.model_files = {"checkpoints": ["other.ckpt"]}   # at run time: validation follows
    assert (await fetch(sim.url, "/prompt", "POST", {"prompt": t2i(ckpt="only.ckpt")})).code == 400
    with pytest.raises(ValueError):
        sim.model_files = {"checkpoints": "not-a-list"}


# -- GPU memory -----------------------------------------------------------------------------

async def test_cold_load_costs_the_load_time_and_warm_costs_nothing(gpu_sim):
    load = 0.15
    sim = await gpu_sim(model_load_seconds=load)
    _, cold = await run(sim, t2i(seed=1))
    _, warm = await run(sim, t2i(seed=2))        # a new seed: KSampler runs, the checkpoint is held
    assert cold.models_loaded == (f"checkpoints/{CKPT_A}",) and warm.models_loaded == ()
    cold_time, warm_time = cold.ended - cold.started, warm.ended - warm.started
    assert cold_time >= load and warm_time < cold_time - load / 2
    sim.model_load_seconds = 0.0                 # a knob read at each load
    _, other = await run(sim, t2i(ckpt=CKPT_B, seed=3))
    assert other.models_loaded == (f"checkpoints/{CKPT_B}",) and other.ended - other.started < load
    assert sim.model_loads == 2


async def test_least_recently_used_file_goes_first(gpu_sim):
    sim = await gpu_sim(models_kept=2)
    loads = []
    for seed, ckpt in enumerate([CKPT_A, CKPT_B, CKPT_A, CKPT_C, CKPT_B]):
        prompt_id, entry = await run(sim, t2i(ckpt=ckpt, seed=seed))
        loads.append((entry.models_loaded, "4" in nodes_run(sim, prompt_id)))
    a, b, c = (f"checkpoints/{n}" for n in (CKPT_A, CKPT_B, CKPT_C))
    assert loads == [((a,), True), ((b,), True),
                     ((), False),          # A held: its cached loader is reused and becomes the most recent
                     ((c,), True),         # C evicts B (least recently used), not A
                     ((b,), True)]         # B's loader output is still cached, but B left the GPU: it runs again
    assert sim.loaded_models == [c, b] and sim.model_loads == 4
    sim.models_kept = 1                    # lowering K evicts at once
    assert sim.loaded_models == [b]
    with pytest.raises(ValueError):
        sim.models_kept = -1


async def test_every_loader_file_of_a_prompt_counts(gpu_sim):
    sim = await gpu_sim()
    flux = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
                                                   "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
        "9": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["8", 0], "image": ["7", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "flux"}},
    }
    sim.models_kept = 5
    prompt_id, entry = await run(sim, flux)
    assert sorted(entry.models_loaded) == sorted([
        "diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors", "vae/sdxl_vae.safetensors", "upscale_models/4x-UltraSharp.pth"])
    history = json.loads((await fetch(sim.url, f"/history/{prompt_id}")).body)[prompt_id]
    name = history["outputs"]["10"]["images"][0]["filename"]
    image = Image.open(io.BytesIO((await fetch(sim.url, f"/view?filename={name}&type=output")).body))
    assert image.size == (128, 128)   # "4x" upscale of 32 x 32
    # a LoRA and a ControlNet count as files of their own; pixel_space and a zero-strength LoRA load nothing
    graph = copy.deepcopy(LORA)
    graph["3"]["inputs"]["steps"] = 1
    graph["5"]["inputs"].update(width=16, height=16)
    graph["11"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "control_v11p_sd15_canny.pth"}}
    graph["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["11", 0], "image": ["8", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    graph["13"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "positive": ["12", 0],
                                                         "negative": ["12", 1]}}
    graph["14"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    graph["15"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["14", 0]}}
    graph["16"] = {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "cn"}}
    _, entry = await run(sim, graph)
    assert entry.models_loaded == (f"checkpoints/{LORA['4']['inputs']['ckpt_name']}",
                                   f"loras/{LORA['10']['inputs']['lora_name']}",
                                   "controlnet/control_v11p_sd15_canny.pth")
    graph = copy.deepcopy(LORA)
    graph["10"]["inputs"].update(lora_name="film-grain.safetensors", strength_model=0.0, strength_clip=0.0)
    _, entry = await run(sim, graph)
    assert entry.models_loaded == ()


@pytest.mark.parametrize("flags", [{"unload_models": True}, {"free_memory": True}])
async def test_free_unloads_the_models(gpu_sim, flags):
    sim = await gpu_sim()
    first, _ = await run(sim, t2i(seed=1))
    assert sim.loaded_models == [f"checkpoints/{CKPT_A}"]
    resp = await fetch(sim.url, "/free", "POST", flags)
    assert resp.code == 200
    await wait_until(lambda: sim.loaded_models == [], TIMEOUT, what="models unloaded")
    again, entry = await run(sim, t2i(seed=2))
    assert entry.models_loaded == (f"checkpoints/{CKPT_A}",) and "4" in nodes_run(sim, again)
    assert sim.model_loads == 2
    if flags == {"free_memory": True}:   # it also dropped the output cache: the whole graph ran
        assert nodes_run(sim, again) == nodes_run(sim, first)


async def test_a_crash_empties_the_gpu_but_keeps_the_counter(gpu_sim):
    sim = await gpu_sim()
    await run(sim, t2i(seed=1))
    await sim.crash()
    await sim.restart()
    assert sim.loaded_models == []
    _, entry = await run(sim, t2i(seed=2))
    assert entry.models_loaded == (f"checkpoints/{CKPT_A}",) and sim.model_loads == 2


async def test_standalone_options_and_timeline(tmp_path):
    timeline, files = tmp_path / "timeline.json", tmp_path / "models.json"
    files.write_text(json.dumps({"checkpoints": ["x.safetensors", "y.safetensors"]}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfysim", "--port", "0", "--name", "cli-gpu", "--data-dir", str(tmp_path / "d"),
        "--tick-seconds", "0.001", "--models-kept", "1", "--model-load-seconds", "0", "--model-files", str(files),
        "--timeline", str(timeline), cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        url = "http://" + line.strip().rsplit(" ", 1)[1]
        for seed, ckpt in enumerate(["x.safetensors", "y.safetensors", "y.safetensors", "x.safetensors"]):
            resp = await fetch(url, "/prompt", "POST", {"prompt": t2i(ckpt=ckpt, seed=seed)})
            assert resp.code == 200, resp.body

        async def all_ran():
            return len(json.loads((await fetch(url, "/history")).body)) == 4
        await wait_until(all_ran, TIMEOUT, what="four prompts in history")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    entries = json.loads(timeline.read_text())
    assert [e["models_loaded"] for e in entries] == [
        ["checkpoints/x.safetensors"], ["checkpoints/y.safetensors"], [], ["checkpoints/x.safetensors"]]
    assert set(entries[0]) == {"server", "prompt_id", "started", "ended", "success", "models_loaded"}


async def test_bad_standalone_options_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text('{"checkpoints": "x"}')
    for argv in (["--models-kept", "-1"], ["--model-load-seconds", "-2"], ["--model-files", str(tmp_path / "bad.json")]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfysim", "--port", "0", *argv, cwd=str(ROOT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode == 2 and argv[0].encode() in err, (argv, err)


# -- through the bridge ---------------------------------------------------------------------

async def test_text_to_image_through_the_bridge(sim_factory, bridge_factory):
    sim = await sim_factory(name="t2i", tick_seconds=0.001, model_load_seconds=0.0)
    bridge = await bridge_factory([sim])
    api = bridge.api()
    info = await api.json("/workflow-info?workflow=text-to-image")
    assert info["4/ckpt_name"]["choices"] == sorted(DEFAULT_MODEL_FILES["checkpoints"])   # from the backend
    assert info["4/ckpt_name"]["type"] == "str" and info["3/steps"]["min"] == 1
    assert set(info) == {"4/ckpt_name", "6/text", "7/text", "3/seed", "3/steps", "5/width", "5/height"}
    lora = await api.json("/workflow-info?workflow=lora-image")
    assert lora["10/lora_name"]["choices"] == sorted(DEFAULT_MODEL_FILES["loras"])
    refused = await api.generate(new_client_id(), {"workflow": "text-to-image", "4/ckpt_name": "nope"}, expect=400)
    assert refused["detail"].startswith("input '4/ckpt_name': 'nope' is not one of its choices")
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "text-to-image", "4/ckpt_name": CKPT_B, "3/steps": 2,
                                   "5/width": 64, "5/height": 32, "6/text": "a lighthouse"})
    await api.wait_status(client_id, "closed")
    [part] = await api.history(client_id)
    image = Image.open(io.BytesIO(part["data"]))
    assert image.format == "PNG" and image.size == (64, 32) and image.text["comfysim"] == "t2i"
    assert sim.prompt_times[-1].models_loaded == (f"checkpoints/{CKPT_B}",)
    api.close()
