"""Several simulated backends: scheduling, failover, hangs, class checks, OOM, targeted cancel."""
import asyncio
import json
import shutil
import time

import pytest

from balancer.jobs import JobState
from tests.conftest import ROOT, new_client_id, png_bytes, stopped_by_id, wait_for


async def submit_slow(api, count, steps=5, saved=None):
    """Queue `count` slow jobs; their step counts differ so no run is served from the cache."""
    saved = saved or await api.upload(png_bytes())
    clients = []
    for i in range(count):
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": steps + i})
        clients.append(client_id)
    return clients


async def finish_all(api, clients, timeout=30):
    for client_id in clients:
        info = await api.wait_status(client_id, "closed", "error", timeout=timeout)
        assert info["status"] == "closed", (client_id, info)
        parts = await api.history(client_id)
        assert len(parts) == 1


def prompts_posted(sim):
    return [body["prompt_id"] for method, path, body in sim.requests_log
            if method == "POST" and path.endswith("/prompt") and isinstance(body, dict)]


async def test_burst_leaves_no_backend_idle_that_would_end_a_waiting_job_first(sim_factory, bridge_factory):
    from balancer.affinity import Estimator
    fast = await sim_factory(name="fast", tick_seconds=0.004)
    slow = await sim_factory(name="slow", tick_seconds=0.04)
    bridge = await bridge_factory([fast, slow])
    service = bridge.service
    violations = []
    original = service._pump

    def checked_pump():
        original()
        if not service.queue:
            return
        head, now = next(iter(service.queue)), time.monotonic()
        estimate = Estimator(service.backends)
        ends = {b: now + b.backlog(now, estimate.expected) + estimate.expected(b, head.alias) for b in service.backends if b.up}
        idle = [b for b in ends if not b.in_flight]
        busy = [ends[b] for b in ends if b.in_flight]
        if idle and (not busy or min(ends[b] for b in idle) < min(busy) - 1e-9):
            violations.append((len(service.queue), [b.address for b in idle]))

    service._pump = checked_pump
    api = bridge.api()
    clients = await submit_slow(api, 16, steps=5)
    await finish_all(api, clients)
    assert violations == []
    assert len(fast.executed_prompts) > len(slow.executed_prompts) >= 1
    assert len(fast.executed_prompts) + len(slow.executed_prompts) == 16
    status = await api.json("/status")
    assert sum(b["completed"] for b in status["backends"]) == 16
    api.close()


async def test_backend_killed_mid_job_every_job_finishes_once(sim_factory, bridge_factory):
    a = await sim_factory(name="a", tick_seconds=0.03)
    b = await sim_factory(name="b", tick_seconds=0.03)
    bridge = await bridge_factory([a, b], max_retries=3)
    api = bridge.api()
    sockets = {}
    saved = await api.upload(png_bytes())
    clients = []
    for _ in range(6):
        client_id = new_client_id()
        sockets[client_id] = await api.ws(client_id)
        await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 6})
        clients.append(client_id)
    on_a = bridge.service.backends[0]
    await wait_for(lambda: any(bridge.service.get(c).prompt_id and bridge.service.get(c).backend is on_a
                               for c in clients), what="a job running on a")
    await a.crash()
    for client_id in clients:
        messages = await sockets[client_id].closed(timeout=30)
        finals = [m for m in messages if m["status"] in ("closed", "error")]
        assert [m["detail"] for m in finals] == ["Execution is done"], messages
        assert len(await api.history(client_id)) == 1
    assert (await api.fetch("/generation-count")).body == b"6"
    status = await api.json("/status")
    assert status["backends"][0]["up"] is False and status["backends"][0]["last_error"]
    # It comes back by itself and gets work again.
    await a.restart()
    await wait_for(lambda: on_a.up, what="backend a back up")
    before = len(a.executed_prompts)
    more = await submit_slow(api, 4, steps=3)
    await finish_all(api, more)
    assert len(a.executed_prompts) > before
    api.close()


async def test_hung_backend_is_detected_and_its_job_moves(sim_factory, bridge_factory):
    a = await sim_factory(name="a", tick_seconds=0.05)
    b = await sim_factory(name="b", tick_seconds=0.01)
    bridge = await bridge_factory([a, b], health_check_interval=0.3, backend_timeout=2)
    api = bridge.api()
    on_a = bridge.service.backends[0]
    client_id = new_client_id()
    saved = await api.upload(png_bytes())
    # With both idle, round robin sends the first job to a.
    await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 60})
    await wait_for(lambda: bridge.service.get(client_id).backend is on_a and bridge.service.get(client_id).percent > 0,
                   what="job running on a")
    abandoned_prompt = bridge.service.get(client_id).prompt_id
    a.hang(True)
    await wait_for(lambda: not on_a.up, timeout=10, what="hung backend marked down")
    info = await api.wait_status(client_id, "closed", "error", timeout=20)
    assert info["status"] == "closed"
    assert bridge.service.get(client_id).last_backend is bridge.service.backends[1]
    assert len(await api.history(client_id)) == 1
    a.hang(False)
    await wait_for(lambda: on_a.up, timeout=10, what="backend a back")
    # The abandoned prompt is stopped there, by its id only.
    await wait_for(lambda: stopped_by_id(a, abandoned_prompt, ("interrupted", "dequeued", "terminal")) or
                   any(p == "/queue" for _, p, _ in a.requests_log), what="abandoned prompt stopped")
    assert None not in a.interrupt_calls
    assert (await api.fetch("/generation-count")).body == b"1"
    api.close()


async def test_backend_without_a_node_class_never_gets_the_workflow(sim_factory, bridge_factory):
    a = await sim_factory(name="a", tick_seconds=0.002)
    b = await sim_factory(name="b", tick_seconds=0.002)
    bridge = await bridge_factory([a, b])
    lacking = bridge.service.backends[1]
    lacking.node_classes = lacking.node_classes - {"SimSlowProgress"}
    api = bridge.api()
    clients = await submit_slow(api, 6, steps=2)
    await finish_all(api, clients)
    assert len(a.executed_prompts) == 6 and b.executed_prompts == []
    # When no backend has it, generate refuses and names the class.
    only = bridge.service.backends[0]
    only.node_classes = only.node_classes - {"SimSlowProgress"}
    saved = await api.upload(png_bytes())
    answer = await api.generate(new_client_id(), {"workflow": "slow-progress", "1/image": saved}, expect=400)
    assert "SimSlowProgress" in answer["detail"]
    api.close()


async def test_alias_may_name_its_backends(tmp_path, sim_factory, bridge_factory):
    a = await sim_factory(name="a")
    b = await sim_factory(name="b")
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", folder)
    aliases = json.loads((folder / "aliases.json").read_text())
    aliases["invert-on-b"] = {"file": "invert.json", "inputs": ["1/image"], "backends": [b.address]}
    (folder / "aliases.json").write_text(json.dumps(aliases))
    bridge = await bridge_factory([a, b], workflow_dir=str(folder), workflow_alias=str(folder / "aliases.json"))
    api = bridge.api()
    saved = await api.upload(png_bytes())
    clients = []
    for _ in range(4):
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "invert-on-b", "1/image": saved})
        clients.append(client_id)
    await finish_all(api, clients)
    assert prompts_posted(a) == [] and len(prompts_posted(b)) == 4
    api.close()


async def test_out_of_memory_frees_and_retries_once(sim, bridge_factory):
    bridge = await bridge_factory([sim])
    api = bridge.api()
    sim.fail_next_oom(1)
    clients = await submit_slow(api, 1, steps=2)
    await finish_all(api, clients)
    assert [b for m, p, b in sim.requests_log if p.endswith("/free")] == [{"unload_models": True, "free_memory": True}]
    sim.fail_next_oom(2)
    (client_id,) = await submit_slow(api, 1, steps=2)
    info = await api.wait_status(client_id, "error")
    assert info["detail"].startswith("execution error in node") and "memory" in info["detail"].lower()
    api.close()


async def test_free_after_n_generations(sim, bridge_factory):
    bridge = await bridge_factory([sim], free_after_n_generations=2)
    api = bridge.api()
    for expected_frees in (0, 1, 1, 2):
        clients = await submit_slow(api, 1, steps=1)
        await finish_all(api, clients)
        await wait_for(lambda: len([p for m, p, b in sim.requests_log if p.endswith("/free")]) == expected_frees,
                       what=f"{expected_frees} frees")
    api.close()


async def two_jobs_on_one_backend(sim, bridge_factory):
    """Two slots on one backend: one job executing, the other waiting in ComfyUI's own queue.
    Returns (bridge, api, running clientId, waiting clientId)."""
    bridge = await bridge_factory([sim], max_inflight_per_server=2)
    sim.tick_seconds = 0.03
    api = bridge.api()
    clients = await submit_slow(api, 2, steps=10)
    jobs = [bridge.service.get(c) for c in clients]
    await wait_for(lambda: all(j.prompt_id for j in jobs) and any(j.percent > 0 for j in jobs),
                   what="both jobs on the backend, one running")
    running, waiting = clients if jobs[0].percent > 0 else clients[::-1]
    return bridge, api, running, waiting


async def test_cancel_of_job_waiting_on_backend_deletes_only_it(sim, bridge_factory):
    bridge, api, first, second = await two_jobs_on_one_backend(sim, bridge_factory)
    waiting_prompt = bridge.service.get(second).prompt_id
    await api.json(f"/interrupt?clientId={second}", "POST")
    await wait_for(lambda: stopped_by_id(sim, waiting_prompt, ("dequeued",)), what="the waiting prompt deleted")
    assert sim.interrupt_calls == [] and not stopped_by_id(sim, bridge.service.get(first).prompt_id)
    await finish_all(api, [first])
    assert waiting_prompt not in sim.executed_prompts
    api.close()


async def test_cancel_running_job_leaves_other_clients_job_running(sim, bridge_factory):
    bridge = await bridge_factory([sim], max_inflight_per_server=2)
    sim.tick_seconds = 0.02
    api = bridge.api()
    first, second = await submit_slow(api, 2, steps=15)
    await wait_for(lambda: bridge.service.get(first).percent > 0, what="first job running")
    running_prompt = bridge.service.get(first).prompt_id
    await api.json(f"/interrupt?clientId={first}", "POST")
    await wait_for(lambda: stopped_by_id(sim, running_prompt, ("interrupted",)), what="targeted interrupt")
    assert None not in sim.interrupt_calls
    await finish_all(api, [second])


async def test_retries_are_bounded(sim, bridge_factory):
    bridge = await bridge_factory([sim], max_retries=0)
    sim.tick_seconds = 0.05
    api = bridge.api()
    (client_id,) = await submit_slow(api, 1, steps=40)
    await wait_for(lambda: bridge.service.get(client_id).percent > 0, what="job running")
    await sim.crash()
    info = await api.wait_status(client_id, "error")
    assert "lost" in info["detail"] or "failed" in info["detail"]
    assert "gave up after 1 attempts" in info["detail"]
    await sim.restart()
    api.close()


async def test_queue_limit_answers_503_with_retry_after(sim, bridge_factory):
    bridge = await bridge_factory([sim], max_queue=2, max_inflight_per_server=1)
    sim.tick_seconds = 0.05
    api = bridge.api()
    saved = await api.upload(png_bytes())
    clients = await submit_slow(api, 3, steps=40, saved=saved)  # one runs, two wait
    response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                               {"workflow": "invert", "1/image": saved})
    assert response.code == 503 and response.headers["Retry-After"]
    for client_id in clients:
        await api.json(f"/interrupt?clientId={client_id}", "POST")
    api.close()


async def test_job_waiting_in_the_backends_own_queue_is_not_yet_progress(sim, bridge_factory):
    bridge, api, running, waiting = await two_jobs_on_one_backend(sim, bridge_factory)
    assert (await api.json(f"/execution-info?clientId={running}"))["status"] == "progress"
    assert (await api.json(f"/execution-info?clientId={waiting}")) == {
        "status": "connected", "detail": "server connected", "details": "server connected"}
    await finish_all(api, [running, waiting])
    api.close()


async def test_backend_that_lost_its_input_files_gets_them_again(sim, bridge_factory):
    """A ComfyUI whose input folder was emptied (restart, cleanup) refuses the prompt at
    validation (LoadImage: invalid image file); the bridge uploads the file again, once."""
    bridge = await bridge_factory([sim])
    api = bridge.api()
    saved = await api.upload(png_bytes())
    first = new_client_id()
    await api.generate(first, {"workflow": "blur-scale", "1/image": saved, "2/width": 8, "2/height": 8})
    await finish_all(api, [first])
    sim.folders.wipe("input")
    second = new_client_id()
    await api.generate(second, {"workflow": "blur-scale", "1/image": saved, "2/width": 9, "2/height": 9})
    await finish_all(api, [second])
    uploads = [p for m, p, _ in sim.requests_log if p.endswith("/upload/image")]
    assert len(uploads) == 2
    api.close()
