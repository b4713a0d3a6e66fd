"""Comfy API v2 driven by Comfy-Org's own client, `comfy-sdk`, unchanged: the bridge in front of
two simulated backends. The SDK is synchronous here (httpx), so each call runs in a thread while
the bridge's loop goes on serving in this one."""
from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image, ImageChops, ImageOps

from bridge import Bridge
from comfy_low.models import Job as ContractJob
from comfy_sdk import Comfy, JobFailed, StatusChange
from comfy_sdk import OutputReady, Preview, Progress
from tests.conftest import TIMEOUT, png_bytes, stopped_by_id, wait_for

pytestmark = pytest.mark.timeout(60)
KEY = "v2-test-key"


def invert_graph(image) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v2"}},
    }


def slow_graph(image, steps: int) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v2slow"}},
    }


@pytest.fixture
async def two(sim_factory, bridge_factory):
    sims = [await sim_factory(name="sim-a"), await sim_factory(name="sim-b")]
    return await bridge_factory(sims, bridge_api_key=KEY)


@pytest.fixture
def sdk(monkeypatch):
    """sdk(bridge) -> a `Comfy` client pointed at that bridge (COMFY_BASE_URL, as its docs say)."""
    clients = []

    def make(running) -> Comfy:
        monkeypatch.setenv("COMFY_BASE_URL", running.url)
        client = Comfy(api_key=KEY, timeout=TIMEOUT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


async def test_upload_submit_follow_events_and_download_every_output(two, sdk):
    client = sdk(two)
    source = png_bytes(24, 16, seed=7)

    def run():
        asset = client.assets.from_bytes(source, filename="photo.png", content_type="image/png")
        workflow = client.workflows.from_json(invert_graph("placeholder.png"))
        workflow.set_input("1", "image", asset)
        job = client.submit(workflow, metadata={"suite": "v2", "case": "events"})
        events = list(job.events())
        job.result()
        outputs = [(o, o.to_bytes()) for o in job.outputs]
        again = [o.to_bytes() for o in client.jobs.get(job.id).outputs]   # fetching does not consume
        ranged = job.outputs[0].to_bytes(range=(0, 7))
        listed = list(client.list_jobs(metadata={"suite": "v2"}))
        workflow_back = job.get_workflow()
        return asset, job, events, outputs, again, ranged, listed, workflow_back

    asset, job, events, outputs, again, ranged, listed, workflow_back = await asyncio.to_thread(run)
    assert asset.id and asset.hash.startswith("blake3:")
    assert job.status == "succeeded"
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "StatusChange" and isinstance(events[-1], StatusChange)
    assert events[-1].status == "succeeded"
    assert "OutputReady" in kinds and kinds.index("OutputReady") < len(kinds) - 1   # outputs before the end
    values = [e.value for e in events if isinstance(e, Progress)]
    assert values == sorted(values) and values and values[-1] == 1.0
    assert len(outputs) == 1
    output, data = outputs[0]
    assert output.node_id == "3" and output.type == "image" and output.size_bytes == len(data)
    assert ImageChops.difference(pixels(data), ImageOps.invert(pixels(source))).getbbox() is None
    assert again == [data] and ranged == data[:8]
    ready = [e for e in events if isinstance(e, OutputReady)]
    assert ready[0].output.id == output.id
    assert [s.id for s in listed] == [job.id] and listed[0].metadata == {"suite": "v2", "case": "events"}
    assert workflow_back.format == "api" and workflow_back.graph["1"]["inputs"]["image"]["__type"] == "core/ASSET"
    # The v2 job is a job of the bridge's own: visible in /status while it is kept.
    api = two.api(KEY)
    try:
        assert (await api.json("/status"))["jobs"] == {"done": 1}
    finally:
        api.close()


async def test_outputs_of_jobs_on_both_backends(two, sdk):
    """Several jobs at once run on both backends; every output matches its input's inversion."""
    client = sdk(two)
    sources = [png_bytes(8 + i, 8, seed=i) for i in range(4)]

    def submit_all():
        jobs = []
        for i, source in enumerate(sources):
            asset = client.assets.from_bytes(source, filename=f"in{i}.png", content_type="image/png")
            workflow = client.workflows.from_json(slow_graph("x.png", 3))
            workflow.set_input("1", "image", asset)
            jobs.append(client.submit(workflow))
        return [(job.result(), job.outputs[0].to_bytes()) for job in jobs]

    done = await asyncio.to_thread(submit_all)
    for (job, data), source in zip(done, sources):
        assert ImageChops.difference(pixels(data), pixels(source)).getbbox() is None
    ran = {sim.name: len(sim.executions) for sim in two.sims}
    assert sum(ran.values()) == 4 and all(ran.values()), ran


@pytest.mark.parametrize("profile", ["legacy", "0.3.64", "current"])
async def test_cancel_a_running_job(profile, sim_factory, bridge_factory, sdk):
    """On every ComfyUI version the simulator imitates (0.3.64 lacks the cancel route the
    reference gateway relies on): the prompt is stopped on its backend."""
    sims = [await sim_factory(name="sim-a", profile=profile), await sim_factory(name="sim-b", profile=profile)]
    two = await bridge_factory(sims, bridge_api_key=KEY)
    client = sdk(two)

    def start():
        asset = client.assets.from_bytes(png_bytes(), filename="in.png", content_type="image/png")
        workflow = client.workflows.from_json(slow_graph("x.png", 2000))   # 40 s: it is cancelled long before
        workflow.set_input("1", "image", asset)
        return client.submit(workflow)

    job = await asyncio.to_thread(start)

    def running() -> bool:
        return job.refresh().status == "running" and job._model.progress is not None

    await wait_for(lambda: asyncio.to_thread(running), TIMEOUT, interval=0.05, what="the job running")
    bridge_job = two.service.get(f"v2.{job.id}")
    # Executing on its backend (not only dispatched, its files still on the way): a stop is seen there.
    await wait_for(lambda: bridge_job.executing, TIMEOUT, what="the prompt executing")
    prompt_id = bridge_job.prompt_id
    sim = next(s for s in two.sims if s.address == bridge_job.backend.address)
    canceled = await asyncio.to_thread(job.cancel)
    assert canceled.status == "canceled"
    assert (await asyncio.to_thread(job.wait)).status == "canceled"
    assert await asyncio.to_thread(lambda: job.cancel().status) == "canceled"   # idempotent
    with pytest.raises(JobFailed):
        await asyncio.to_thread(job.result)
    await wait_for(lambda: stopped_by_id(sim, prompt_id), TIMEOUT, what="the prompt stopped on its backend")


async def test_an_idempotent_retry_returns_the_same_job_and_runs_once(two, sdk):
    client = sdk(two)

    def twice():
        asset = client.assets.from_bytes(png_bytes(seed=3), filename="in.png", content_type="image/png")
        workflow = client.workflows.from_json(invert_graph("x.png"))
        workflow.set_input("1", "image", asset)
        first = client.submit(workflow, idempotency_key="retry-after-a-lost-answer")
        second = client.submit(workflow, idempotency_key="retry-after-a-lost-answer")
        return first.result(), second.result()

    first, second = await asyncio.to_thread(twice)
    assert first.id == second.id
    assert sum(len(sim.executions) for sim in two.sims) == 1
    assert len([j for j in two.service.jobs.values() if j.v2 is not None]) == 1


async def test_a_job_survives_a_bridge_restart_and_polling_finds_it_done(sim_factory, bridge_factory, sdk):
    sims = [await sim_factory(name="sim-a"), await sim_factory(name="sim-b")]
    first = await bridge_factory(sims, bridge_api_key=KEY)
    client = sdk(first)

    def start():
        asset = client.assets.from_bytes(png_bytes(seed=5), filename="in.png", content_type="image/png")
        workflow = client.workflows.from_json(slow_graph("x.png", 30))
        workflow.set_input("1", "image", asset)
        return client.submit(workflow, idempotency_key="durable"), asset

    job, asset = await asyncio.to_thread(start)
    await wait_for(lambda: first.service.get(f"v2.{job.id}").executing, TIMEOUT, what="the job running")
    settings, port = first.bridge.settings, first.port
    await first.stop()
    second = Bridge(settings)
    await second.start(port=port, host="127.0.0.1")
    try:
        done = await asyncio.to_thread(job.result)     # the same client, polling the same address
        assert done.status == "succeeded" and len(done.outputs) == 1
        data = await asyncio.to_thread(done.outputs[0].to_bytes)
        assert ImageChops.difference(pixels(data), pixels(png_bytes(seed=5))).getbbox() is None
        assert sum(1 for sim in sims for pid in sim.executions) == 1   # resumed, not run again

        def replay():   # the key's answer was kept across the restart
            workflow = client.workflows.from_json(job.get_workflow().graph)
            return client.submit(workflow, idempotency_key="durable")
        assert (await asyncio.to_thread(replay)).id == job.id
        kept = await asyncio.to_thread(client.assets.get, asset.id)   # asset records are in the job database
        assert kept.hash == asset.hash
        assert ContractJob.model_validate(done._model.model_dump(mode="json"))
    finally:
        await second.stop()


async def test_every_answer_parses_as_the_contract_says(two, sdk):
    """The SDK's models are generated from the contract (strict pydantic): a bad shape would
    have raised a ValidationError above; here the lists and errors the SDK maps by code."""
    client = sdk(two)
    from comfy_sdk import InvalidWorkflow, MissingAsset, NotFound

    def refusals():
        with pytest.raises(InvalidWorkflow):
            client.submit(client.workflows.from_json({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
        with pytest.raises(MissingAsset):
            client.submit(client.workflows.from_json(invert_graph(
                {"__type": "core/ASSET", "info": {"id": "asset_" + "0" * 32}})))
        with pytest.raises(NotFound):
            client.jobs.get("0" * 32)
        asset = client.assets.from_bytes(b"plain bytes", filename="notes.txt", content_type="text/plain")
        asset.commit()
        again = client.assets.from_bytes(b"plain bytes", filename="notes.txt", content_type="text/plain")
        assert again.commit() == asset.id   # by-hash hit, and that reference existed: returned as it is
        same = client.assets.from_bytes(b"plain bytes", filename="copy.txt", content_type="text/plain")
        same.commit()   # by-hash hit: a new asset minted from the hash, nothing uploaded again
        assert same.id != asset.id and same.hash == asset.hash
        client.assets.delete(asset.id)
        with pytest.raises(NotFound):
            client.assets.get(asset.id)
        assert client.assets.get(same.id).hash == asset.hash   # the blob stays for the other asset

    started = time.monotonic()
    await asyncio.to_thread(refusals)
    assert time.monotonic() - started < TIMEOUT


async def test_previews_the_backend_sends_reach_the_event_stream(two, sdk):
    client = sdk(two)
    source = png_bytes(20, 10, seed=11)
    shown = {**invert_graph("x.png"), "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}}}

    def run():
        asset = client.assets.from_bytes(source, filename="p.png", content_type="image/png")
        workflow = client.workflows.from_json(shown)
        workflow.set_input("1", "image", asset)
        job = client.submit(workflow)
        return list(job.events())

    events = await asyncio.to_thread(run)
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and previews[0].node_id == "4" and previews[0].content_type == "image/png"
    assert ImageChops.difference(previews[0].to_pil().convert("RGB"), ImageOps.invert(pixels(source))).getbbox() is None
    assert events[-1].status == "succeeded"


async def test_a_v2_job_moves_to_the_other_backend_when_its_backend_dies(two, sdk):
    """Failover and metrics are the core's, shared with every job: the SDK only sees it succeed."""
    client = sdk(two)
    source = png_bytes(seed=13)

    def start():
        asset = client.assets.from_bytes(source, filename="f.png", content_type="image/png")
        workflow = client.workflows.from_json(slow_graph("x.png", 60))
        workflow.set_input("1", "image", asset)
        return client.submit(workflow)

    job = await asyncio.to_thread(start)
    bridge_job = await wait_for(lambda: (j := two.service.get(f"v2.{job.id}")).executing and j, TIMEOUT,
                                what="the job running")
    first = next(s for s in two.sims if s.address == bridge_job.backend.address)
    await first.crash()
    done = await asyncio.to_thread(job.result)
    data = await asyncio.to_thread(done.outputs[0].to_bytes)
    assert ImageChops.difference(pixels(data), pixels(source)).getbbox() is None
    other = next(s for s in two.sims if s is not first)
    assert bridge_job.last_backend.address == other.address and bridge_job.requeues == 1
    api = two.api(KEY)
    try:
        metrics = (await api.fetch("/metrics")).body.decode()
    finally:
        api.close()
    assert 'bridge_jobs_requeued_total{workflow="v2"} 1.0' in metrics, metrics[:2000]


@pytest.mark.parametrize("profile", ["legacy", "0.3.64"])
async def test_the_simplest_flow_on_older_backends(profile, sim_factory, bridge_factory, sdk):
    sims = [await sim_factory(name="sim-a", profile=profile), await sim_factory(name="sim-b", profile=profile)]
    client = sdk(await bridge_factory(sims, bridge_api_key=KEY))
    source = png_bytes(12, 9, seed=17)

    def run():
        workflow = client.workflows.from_json(invert_graph("x.png"))
        workflow.set_input("1", "image", client.assets.from_bytes(source, filename="o.png", content_type="image/png"))
        job = client.submit(workflow)
        events = list(job.events())
        return events, client.jobs.get(job.id).outputs[0].to_bytes()

    events, data = await asyncio.to_thread(run)
    assert events[-1].status == "succeeded" and any(isinstance(e, OutputReady) for e in events)
    assert ImageChops.difference(pixels(data), ImageOps.invert(pixels(source))).getbbox() is None
