"""Model affinity end to end (issue 15): simulators that hold one model each (their GPU
memory: comfysim/models.py), jobs over two checkpoints. The bridge learns where each model is
loaded and sends jobs there, rather than making a backend swap models at every job."""
from __future__ import annotations

from tests.conftest import new_client_id, wait_for

CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "dreamshaper_8.safetensors")


async def text_to_image(api, checkpoint: str, seed: int) -> str:
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "text-to-image", "4/ckpt_name": checkpoint,
                                   "3/seed": seed, "3/steps": 2, "5/width": 16, "5/height": 16})
    return client_id


async def two_model_farm(sim_factory, bridge_factory, load_seconds: float):
    sims = [await sim_factory(name=f"gpu{i}", tick_seconds=0.01, models_kept=1, model_load_seconds=load_seconds)
            for i in range(2)]
    bridge = await bridge_factory(sims, models_kept_per_server=1)
    return sims, bridge


async def test_alternating_checkpoints_settle_one_per_backend(sim_factory, bridge_factory):
    sims, bridge = await two_model_farm(sim_factory, bridge_factory, load_seconds=0.2)
    api = bridge.api()
    # First what a load costs is learned: a cold and a warm run of one model, then the other
    # model, one job at a time (until then a load is not known to cost anything).
    for seed, checkpoint in enumerate((CHECKPOINTS[0], CHECKPOINTS[0], CHECKPOINTS[1])):
        await api.wait_status(await text_to_image(api, checkpoint, seed), "closed")
    assert sorted(sim.model_loads for sim in sims) == [1, 1]
    clients = [await text_to_image(api, CHECKPOINTS[i % 2], seed=10 + i) for i in range(12)]
    for client_id in clients:
        assert (await api.wait_status(client_id, "closed", "error"))["status"] == "closed"
    # No more loads: each model stays on its own backend (a swap per job would be 12 more).
    assert sorted(sim.model_loads for sim in sims) == [1, 1]
    held = sorted(m for backend in bridge.service.backends for m in backend.gpu.models)
    assert held == sorted(CHECKPOINTS)
    from tests.test_metrics import scrape
    metrics = await scrape(api)
    assert metrics.value("bridge_jobs_dispatched_total", workflow="text-to-image", warm="true") == 13
    assert metrics.value("bridge_jobs_dispatched_total", workflow="text-to-image", warm="false") == 2
    for backend in bridge.service.backends:
        assert metrics.value("bridge_backend_models_loaded", backend=backend.address) == 1
        assert metrics.value("bridge_backend_backlog_seconds", backend=backend.address) == 0
    api.close()


async def one_model_loaded(sim_factory, bridge_factory):
    """A two-backend farm that has run one job: (sims, bridge, api)."""
    sims, bridge = await two_model_farm(sim_factory, bridge_factory, load_seconds=0.05)
    api = bridge.api()
    await api.wait_status(await text_to_image(api, CHECKPOINTS[0], seed=1), "closed")
    assert any(b.gpu.models for b in bridge.service.backends)
    return sims, bridge, api


async def test_after_a_free_the_bridge_knows_nothing_is_loaded(sim_factory, bridge_factory):
    sims, bridge, api = await one_model_loaded(sim_factory, bridge_factory)
    await api.json("/free", "POST")
    await wait_for(lambda: not any(b.gpu.models for b in bridge.service.backends), what="beliefs cleared")
    status = await api.json("/status")
    assert [b["models"] for b in status["backends"]] == [[], []]
    api.close()


async def test_a_backend_that_came_back_is_believed_to_hold_nothing(sim_factory, bridge_factory):
    sims, bridge, api = await one_model_loaded(sim_factory, bridge_factory)
    [(sim, backend)] = [(s, b) for s, b in zip(sims, bridge.service.backends) if b.gpu.models]
    await sim.crash()
    await wait_for(lambda: not backend.up, what="the backend seen down")
    assert backend.gpu.models == ()
    await sim.restart()
    assert await backend.wait_up(10)
    assert backend.gpu.models == ()
    api.close()
