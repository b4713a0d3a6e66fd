"""Units of the core that need no server: progress, ComfyUI answers, the state file."""
import asyncio
import os

from balancer.progress import ProgressTracker, format_percent, nodes_to_run
from balancer.comfy.answers import describe_execution_error, describe_rejection, entry_from_events, output_files
from storage.state import StateFile

GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
    "2": {"class_type": "SimSlowProgress", "inputs": {"image": ["1", 0], "steps": 4}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    "9": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},  # dangling: never runs
}


def test_nodes_to_run_follows_outputs():
    assert nodes_to_run(GRAPH, frozenset({"SaveImage"})) == {"1", "2", "3"}
    # Without object_info, graph sinks stand in for output nodes.
    assert nodes_to_run(GRAPH) == {"1", "2", "3", "9"}


def test_progress_is_monotonic_and_below_100_until_done():
    tracker = ProgressTracker(GRAPH, frozenset({"SaveImage"}))
    seen = []
    events = [("execution_cached", {"nodes": ["1"]}), ("executing", {"node": "2"})]
    events += [("progress", {"node": "2", "value": v, "max": 4}) for v in (1, 2, 2, 1, 4)]
    events += [("executing", {"node": "3"}), ("executed", {"node": "3"})]
    for kind, data in events:
        tracker.on_event(kind, data)
        seen.append(tracker.percent)
    assert seen == sorted(seen)
    assert seen[0] > 0 and seen[-1] == ProgressTracker.CEILING
    assert format_percent(12.62) == "12.62%" and format_percent(99.999) == "100.00%"
    assert format_percent(3) == "3.00%"


def test_progress_ignores_other_nodes_and_bad_values():
    tracker = ProgressTracker(GRAPH, frozenset({"SaveImage"}))
    assert not tracker.on_event("progress", {"node": "9", "value": 1, "max": 1})
    assert not tracker.on_event("progress", {"node": "2", "value": 1, "max": 0})
    assert not tracker.on_event("status", {"status": {}})


def test_describe_rejection_uses_node_errors():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"2": {"errors": [{"message": "Value -5 smaller than min of 0", "details": "steps"}],
                                  "class_type": "SimSlowProgress"}}}
    reason = describe_rejection(body, GRAPH)
    assert "node 2 (SimSlowProgress)" in reason and "smaller than min" in reason and "steps" in reason
    unknown = {"error": {"message": "Cannot execute because node X does not exist.", "details": "Node ID '#2'"},
               "node_errors": {}}
    assert "does not exist" in describe_rejection(unknown, GRAPH)
    assert "HTTP 400" in describe_rejection(None, GRAPH)


def test_describe_execution_error():
    data = {"node_id": "2", "node_type": "SimSlowProgress", "exception_message": "boom\n"}
    assert describe_execution_error(data, GRAPH) == "execution error in node 2 (SimSlowProgress): boom"


def test_output_files_in_node_order_with_temp_and_dedup():
    entry = {"outputs": {
        "7": {"images": [{"filename": "b.png", "subfolder": "", "type": "temp"}]},
        "3": {"images": [{"filename": "a.png", "subfolder": "s", "type": "output"},
                         {"filename": "a.png", "subfolder": "s", "type": "output"}], "animated": [False]},
    }}
    items = output_files(entry, GRAPH)
    assert [(i.filename, i.subfolder, i.type) for i in items] == [("a.png", "s", "output"), ("b.png", "", "temp")]


def test_entry_from_events_only_when_every_output_node_reported():
    graph = {**GRAPH, "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    outputs = {"3": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}
    classes = frozenset({"SaveImage", "PreviewImage"})
    assert entry_from_events(outputs, graph, classes) is None          # node 4 missing (cached, or lost)
    outputs["4"] = None                                                 # cached, without UI: no files
    assert entry_from_events(outputs, graph, classes) == {"outputs": {"3": outputs["3"]}}
    assert entry_from_events(outputs, graph, frozenset()) is None      # output nodes unknown: ask history
    assert entry_from_events({}, {"1": GRAPH["1"]}, classes) is None    # no output node at all


async def test_state_file_counts_and_survives_damage(tmp_path):
    path = tmp_path / "current_state.json"
    state = StateFile(path)
    assert state.generation_count == 0
    for _ in range(5):
        state.increment()
    await state.flush()
    assert StateFile(path).generation_count == 5
    state.increment()
    await state.flush()
    # A torn write of the main file: the copy is used, not zero.
    path.write_text('{"generation_cou')
    assert StateFile(path).generation_count == 6
    os.remove(path)
    assert StateFile(path).generation_count == 6


async def test_state_file_coalesces_bursts(tmp_path):
    state = StateFile(tmp_path / "s.json")
    for _ in range(1000):
        state.increment()
    await state.flush()
    assert StateFile(tmp_path / "s.json").generation_count == 1000


def test_progress_state_before_executing_keeps_the_node_running():
    """ComfyUI announces a node as running in progress_state just before `executing` it."""
    tracker = ProgressTracker(GRAPH, frozenset({"SaveImage"}))
    tracker.on_event("progress_state", {"nodes": {"1": {"state": "finished", "value": 1, "max": 1},
                                                  "2": {"state": "running", "value": 0, "max": 1}}})
    tracker.on_event("executing", {"node": "2"})
    assert "2" not in tracker.done
    before = tracker.percent
    assert tracker.on_event("progress", {"node": "2", "value": 2, "max": 4})
    assert tracker.percent > before


def test_events_of_unknown_prompts_are_bounded():
    """Others' prompts on a shared ComfyUI broadcast progress: the buffer must not grow."""
    from balancer.comfy.backend import UNROUTED_EVENTS_PER_PROMPT, UNROUTED_PROMPTS_KEPT, Backend

    backend = Backend.__new__(Backend)
    backend._listeners, backend._unrouted = {}, {}
    for i in range(5000):
        backend._route("progress", {"prompt_id": "stranger", "value": i, "max": 5000})
    for i in range(500):
        backend._route("progress", {"prompt_id": f"p{i}", "value": 1, "max": 1})
    assert len(backend._unrouted) == UNROUTED_PROMPTS_KEPT
    assert all(len(events) <= UNROUTED_EVENTS_PER_PROMPT for events in backend._unrouted.values())


def test_restore_plan_orders_queued_jobs_and_resumes_only_those_on_a_known_backend():
    from balancer.jobs import Job, JobState
    from balancer.restore import plan_restore

    class Known:
        address = "127.0.0.1:8188"

    def record(client_id, state, created, backend=None, prompt_id=None):
        job = Job(client_id=client_id, alias="invert", graph={}, files={}, class_types=frozenset())
        job.state, job.created, job.prompt_id = state, created, prompt_id
        return {**job.to_record(), "backend": backend}

    records = [
        record("q2", JobState.QUEUED, 3), record("q1", JobState.QUEUED, 1),
        record("run", JobState.RUNNING, 2, Known.address, "p-1"),
        record("never-sent", JobState.RUNNING, 4),                      # no prompt yet: runs first
        record("gone-backend", JobState.RUNNING, 5, "10.9.9.9:1", "p-2"),
        record("done", JobState.DONE, 0, Known.address),
        {"client_id": "broken"},                                        # unreadable: skipped
    ]
    plan = plan_restore(records, [Known()])
    assert [j.client_id for j in plan.queue] == ["never-sent", "gone-backend", "q1", "q2"]
    assert [j.client_id for j in plan.resume] == ["run"] and plan.resume[0].backend.address == Known.address
    assert {j.client_id for j in plan.jobs} == {"q1", "q2", "run", "never-sent", "gone-backend", "done"}
    done = next(j for j in plan.jobs if j.client_id == "done")
    assert done.last_backend is not None and done.backend is None   # /free?clientId= finds it


async def test_the_nowait_frame_writer_still_works_with_this_tornado():
    """handlers/tornado_shim.py uses tornado's private frame writer: a client must receive the
    frame, and the shim must say it wrote it (else every heartbeat takes the slow path)."""
    from tornado import httpserver, web, websocket
    from tornado.testing import bind_unused_port

    from handlers.tornado_shim import write_text_frame_nowait

    opened, results = asyncio.Event(), []

    class Socket(websocket.WebSocketHandler):
        def open(self):
            results.append(write_text_frame_nowait(self, b'{"status": "listening"}'))
            opened.set()

    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(web.Application([(r"/ws", Socket)]))
    server.add_sockets([sock])
    try:
        client = await websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws")
        await asyncio.wait_for(opened.wait(), 5)
        assert results == [True]
        assert await asyncio.wait_for(client.read_message(), 5) == '{"status": "listening"}'
        client.close()
    finally:
        server.stop()
        await server.close_all_connections()


async def test_on_read_limit_hands_over_the_socket_before_tornado_closes_it():
    """handlers/tornado_shim.py relies on tornado closing a stream whose read went past its
    max_bytes through `stream.close(UnsatisfiableReadError)`: the callback must run while the
    socket is still open (a dup of it stays usable after tornado's close), for a read that was
    already waiting as for one the buffered bytes fail at once; any other close calls nothing."""
    import socket

    from tornado.iostream import IOStream, StreamClosedError

    from handlers.tornado_shim import on_read_limit

    for data_first in (False, True):
        ours, theirs = socket.socketpair()
        theirs.settimeout(5)
        stream = IOStream(ours)
        taken = []
        on_read_limit(stream, lambda: taken.append(stream.socket.dup()))
        if data_first:
            theirs.sendall(b"x" * 100)  # a socketpair: in our buffer when sendall returns
        read = stream.read_until_regex(b"\r?\n\r?\n", max_bytes=64)
        if not data_first:
            theirs.sendall(b"x" * 100)
        try:
            await asyncio.wait_for(read, 5)
        except StreamClosedError:
            pass
        assert stream.closed() and len(taken) == 1, data_first
        taken[0].sendall(b"answer")
        taken[0].close()
        assert theirs.recv(100) == b"answer"
        theirs.close()
    ours, theirs = socket.socketpair()
    stream = IOStream(ours)
    called = []
    on_read_limit(stream, lambda: called.append(1))
    stream.close()
    theirs.close()
    assert called == []


def test_input_limits_read_the_first_backend_that_describes_the_node_not_all_of_them():
    from types import SimpleNamespace

    from balancer.intake import _limits
    reads = 0

    class Described:
        up, address = True, "b:1"

        @property
        def object_info(self):
            nonlocal reads
            reads += 1
            return {"EmptyImage": {"input": {"required": {"width": ["INT", {"min": 1, "max": 16384}],
                                                          "height": ["INT", {"min": 1, "max": 16384}]}}}}
    exposed = {key: SimpleNamespace(is_file=False, class_type="EmptyImage", name=key[2:], type="int")
               for key in ("1/width", "1/height")}
    workflow = SimpleNamespace(backends=None, inputs=exposed)
    limits = _limits(workflow, [Described() for _ in range(300)])
    assert limits == {"1/width": {"min": 1, "max": 16384}, "1/height": {"min": 1, "max": 16384}}
    assert reads == 2  # one per input, from the first backend (was: one per backend configured)


def test_a_runnable_job_is_accepted_after_looking_at_one_backend_not_all():
    from types import SimpleNamespace

    from balancer.intake import JobIntake
    looked = 0

    class Fleet:
        def __init__(self, members):
            self.members = members

        def __iter__(self):
            nonlocal looked
            for backend in self.members:
                looked += 1
                yield backend

        def __len__(self):
            return len(self.members)

        def __getitem__(self, index):
            return self.members[index]
    classes = frozenset({"EmptyImage", "SaveImage"})
    fleet = Fleet([SimpleNamespace(address=f"b{i}:1", up=True, node_classes=classes) for i in range(300)])
    workflow = SimpleNamespace(backends=None, alias="blank", class_types=classes)
    job = SimpleNamespace(allowed_backends=None, refused_by={}, class_types=classes)
    JobIntake._check_runnable(workflow, job, fleet)  # no Refused
    assert looked == 1


def test_a_jobs_results_are_removed_by_their_known_files_and_a_stray_file_goes_too(tmp_path, monkeypatch):
    import shutil
    from storage.results import ResultFile, ResultStore
    store = ResultStore(tmp_path)
    walks = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: walks.append(path) or rmtree(path, **kw))

    def job_with(*names) -> tuple[str, list[ResultFile]]:
        job_id = os.urandom(16).hex()
        files = []
        for i, name in enumerate(names):
            path = store.file_path(job_id, i, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            files.append(ResultFile(name=name, path=path, media_type="image/png", size=1))
        return job_id, files

    plain, files = job_with("a.png", "b.png")
    store.remove_results(plain, files)
    assert not store.job_dir(plain).exists() and walks == []   # no walk of the folder
    stray, files = job_with("a.png")
    (store.job_dir(stray) / "0.png.part").write_bytes(b"left over")
    store.remove_results(stray, files)
    assert not store.job_dir(stray).exists() and walks == [store.job_dir(stray)]
    store.remove_results(stray, files)   # gone already: nothing to do


def test_the_memory_copies_of_recent_results_stay_within_their_budget(tmp_path, monkeypatch):
    from storage import results
    from storage.results import ResultFile, ResultStore
    monkeypatch.setattr(results, "RECENT_BYTES", 100)
    store = ResultStore(tmp_path)
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for path in paths:
        store.keep(path, b"x" * 40)
    assert [store.recent(p) is not None for p in paths] == [False, False, True, True]   # oldest first out
    store.keep(tmp_path / "big.png", b"x" * 101)
    assert store.recent(tmp_path / "big.png") is None
    store.release([ResultFile(name="a.png", path=paths[3], media_type="image/png", size=40)])
    assert store.recent(paths[3]) is None and store.recent(paths[2]) is not None
