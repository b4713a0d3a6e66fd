"""Pipelining (issue 15): a backend holds one prompt waiting in ComfyUI's own queue behind
the one it runs, so its GPU does not wait for the bridge between two jobs. What that changes:
EXECUTION_TIMEOUT counts from the prompt's execution_start, a backend lost with two prompts
gives both back, in order. (Cancelling a waiting prompt: test_balancer.py.)"""
from __future__ import annotations

from balancer.jobs import JobState
from tests.conftest import wait_for
from tests.test_balancer import finish_all, submit_slow


def pending_on(sim) -> list[str]:
    """Prompt ids waiting in the simulator's own queue."""
    _, pending = sim._rt.queue.current()
    return [item[1] for item in pending]


async def test_the_next_prompt_waits_in_the_backends_queue_while_one_runs(sim, bridge_factory):
    bridge = await bridge_factory([sim])           # MAX_INFLIGHT_PER_SERVER's default: 2
    sim.tick_seconds = 0.03
    api = bridge.api()
    clients = await submit_slow(api, 3, steps=30)
    first_two = [bridge.service.get(c) for c in clients[:2]]
    third = bridge.service.get(clients[2])

    def one_runs_one_waits():
        running = [j for j in first_two if j.executing]
        waiting = [j for j in first_two if j.prompt_id in pending_on(sim)]
        return len(running) == 1 and len(waiting) == 1 and (running[0], waiting[0])
    running, waiting = await wait_for(one_runs_one_waits, what="one running, the other in ComfyUI's queue")
    assert waiting.state is JobState.RUNNING and not waiting.executing
    assert third.state is JobState.QUEUED          # no more than one waits there
    await finish_all(api, clients)
    assert [prompt for prompt, *_ in sim.prompt_times][:2] == [running.prompt_id, waiting.prompt_id]
    api.close()


async def test_execution_timeout_counts_from_the_prompts_own_start(sim, bridge_factory):
    # Each job runs about 0.9 s; the second waits about as long behind the first. From dispatch,
    # the second takes 1.8 s: over the 1.5 s limit, which it must not be held to.
    bridge = await bridge_factory([sim], execution_timeout=1.5)
    sim.tick_seconds = 0.03
    api = bridge.api()
    first, second = await submit_slow(api, 2, steps=30)
    await finish_all(api, [first, second])
    api.close()


async def test_a_prompt_that_runs_too_long_after_its_start_is_still_timed_out(sim, bridge_factory):
    bridge = await bridge_factory([sim], execution_timeout=0.6)
    sim.tick_seconds = 0.03
    api = bridge.api()
    first, second = await submit_slow(api, 2, steps=60)        # 1.8 s each
    for client_id in (first, second):
        info = await api.wait_status(client_id, "closed", "error")
        assert info["status"] == "error" and info["detail"] == "time out error: exceed 0.6s"
    api.close()


async def test_a_backend_lost_with_two_prompts_gives_both_back_in_order(sim_factory, bridge_factory):
    doomed = await sim_factory(name="doomed", tick_seconds=0.05)
    spare = await sim_factory(name="spare", tick_seconds=0.01)
    bridge = await bridge_factory([doomed, spare])
    service = bridge.service
    await spare.crash()                                          # so both go to the doomed one
    await wait_for(lambda: not service.backends[1].up, what="the spare seen down")
    api = bridge.api()
    clients = await submit_slow(api, 2, steps=40)
    jobs = [service.get(c) for c in clients]
    await wait_for(lambda: any(j.executing for j in jobs) and any(j.prompt_id in pending_on(doomed) for j in jobs),
                   what="one running and one waiting on the doomed backend")
    requeued, redispatched = [], []
    service.observers.append(lambda event, job, backend, detail: event == "requeued" and requeued.append(job))
    service.observers.append(lambda event, job, backend, detail: event == "dispatched" and redispatched.append(job))
    await spare.restart()
    await doomed.crash()
    await finish_all(api, clients)
    assert requeued and set(requeued) == set(jobs)
    assert [j.last_backend.address for j in jobs] == [spare.address] * 2
    # back at the front in the order they were sent (the bridge's order, whichever ComfyUI ran first)
    assert redispatched == jobs
    assert all(j.requeues == 1 for j in jobs)
    api.close()


async def test_a_prompts_end_is_seen_at_once_when_its_start_came_before_the_wait():
    """The run waits on its end and on its start (which moves the deadline): either one ends the
    wait. (Waiting for both held an end until the history poll, 2 s, whenever the start had come
    before the wait began.)"""
    import asyncio
    import time

    from balancer.jobs import Job
    from balancer.run import PromptRun
    job = Job(client_id="c", alias="a", graph={}, files={}, class_types=frozenset())
    run = PromptRun(job, backend=None, events=None, results=None,
                    deadline=time.monotonic() + 60, execution_timeout=60)
    asyncio.get_running_loop().call_later(0.01, run.watch.outcome.set_result, ("success", {}))
    assert await asyncio.wait_for(run._await_end(), 1.0) == ("success", {})
