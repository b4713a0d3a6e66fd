"""The bridge as a real process, killed with SIGKILL: no job, result or count is lost."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ujson

from storage.results import ResultStore
from storage.sweep import sweep_disk
from storage.uploads import UploadStore
from tests.conftest import ROOT, Api, new_client_id, png_bytes, wait_for

pytestmark = pytest.mark.timeout(120)


class Process:
    """A child process whose output goes to a file we can search."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.handle = open(log, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def wait_line(self, pattern: str, timeout: float = 20) -> re.Match:
        regex = re.compile(pattern)

        def found():
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            return regex.search(self.log.read_text())
        return await wait_for(found, timeout, interval=0.05, what=pattern)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.handle.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.handle.close()


@pytest.fixture
async def cluster(tmp_path):
    """Simulators and a bridge as processes; `start_bridge()` (re)starts the bridge on one port."""
    started: list[Process] = []

    class Cluster:
        data_dir = tmp_path / "data"
        sims: list[str] = []
        bridge: Process | None = None
        port: int | None = None

        async def start_sims(self, count: int, tick: float):
            for i in range(count):
                proc = Process([sys.executable, "-m", "comfysim", "--port", "0", "--name", f"s{i}",
                                "--tick-seconds", str(tick), "--log-level", "WARNING"], tmp_path / f"sim{i}.log")
                started.append(proc)
                match = await proc.wait_line(r"listening on ([\d.]+:\d+)")
                self.sims.append(match.group(1))

        async def start_bridge(self) -> Api:
            log = tmp_path / f"bridge{len(started)}.log"
            port = self.port or 0
            proc = Process([sys.executable, "bridge.py", "--env-file", str(tmp_path / "none"),
                            "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(self.data_dir),
                            "--comfyui-servers", ",".join(self.sims), "--health-check-interval", "1"], log)
            started.append(proc)
            match = await proc.wait_line(r"bridge listening on 127\.0\.0\.1:(\d+)")
            self.port = int(match.group(1))
            self.bridge = proc
            api = Api(f"http://127.0.0.1:{self.port}")

            async def backends_up():
                response = await api.fetch("/healthz")
                return response.code == 200 and b'"backends_up":%d' % len(self.sims) in response.body
            await wait_for(backends_up, 20, interval=0.05, what="backends up")
            return api

    yield Cluster()
    for proc in started:
        proc.stop()


async def count(api) -> int:
    return int((await api.fetch("/generation-count")).body)


async def test_sigkill_with_jobs_queued_and_running_loses_none(cluster):
    await cluster.start_sims(2, tick=0.02)
    api = await cluster.start_bridge()
    saved = await api.upload(png_bytes())
    clients = []
    for i in range(20):
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "slow-progress", "1/image": saved, "2/steps": 4 + i})
        clients.append(client_id)

    async def some_done():
        return await count(api) >= 3
    await wait_for(some_done, 30, interval=0.02, what="a few jobs done")
    cluster.bridge.kill()
    api.close()

    api = await cluster.start_bridge()
    watcher = await api.ws(clients[-1])  # a socket opened after the restart follows its job
    for client_id in clients:
        info = await api.wait_status(client_id, "closed", "error", timeout=60)
        assert info["status"] == "closed", (client_id, info)
    assert (await watcher.closed(timeout=30))[-1]["status"] == "closed"
    for client_id in clients:
        assert len(await api.history(client_id)) == 1
        assert (await api.fetch(f"/history?clientId={client_id}")).code == 204  # exactly once
    assert await count(api) == 20
    api.close()


async def test_results_waiting_survive_sigkill(cluster):
    await cluster.start_sims(1, tick=0.01)
    api = await cluster.start_bridge()
    source = png_bytes(9, 7, seed=5)
    saved = await api.upload(source)
    clients = [new_client_id() for _ in range(3)]
    for client_id in clients:
        await api.generate(client_id, {"workflow": "invert", "1/image": saved})
        await api.wait_status(client_id, "closed")
    cluster.bridge.kill()
    api.close()
    api = await cluster.start_bridge()
    # The backend that ran a job is remembered too: /free for that clientId still works.
    assert (await api.json(f"/free?clientId={clients[0]}", "POST"))["detail"].endswith(clients[0])
    for client_id in clients:
        info = await api.json(f"/execution-info?clientId={client_id}")
        assert info["status"] == "closed"
        parts = await api.history(client_id)
        assert len(parts) == 1 and parts[0]["data"].startswith(b"\x89PNG")
    assert await count(api) == 3
    api.close()


def state_count(path: Path) -> int | None:
    try:
        return ujson.loads(path.read_bytes())["generation_count"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def test_damaged_state_file_keeps_the_count(cluster):
    await cluster.start_sims(1, tick=0.01)
    api = await cluster.start_bridge()
    saved = await api.upload(png_bytes())
    for i in range(4):
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "blank-image", "1/width": 8 + i, "1/height": 8})
        await api.wait_status(client_id, "closed")
        await api.history(client_id)
    assert await count(api) == 4
    cluster.bridge.kill()
    api.close()
    state = cluster.data_dir / "current_state.json"
    state.write_bytes(state.read_bytes()[:7])  # torn write
    api = await cluster.start_bridge()
    assert await count(api) == 4
    assert "damaged" in cluster.bridge.log.read_text()
    # The state file is rewritten off the loop after start-up; the next step relies on it.
    await wait_for(lambda: state_count(state) == 4, what="the repaired state file written")
    cluster.bridge.kill()
    api.close()
    # Without the job database the state file's last good copy still has it.
    for leftover in cluster.data_dir.glob("jobs.sqlite3*"):
        leftover.unlink()
    state.write_bytes(b"\0\0\0")
    api = await cluster.start_bridge()
    assert await count(api) == 4
    api.close()


def test_sweep_removes_only_expired_and_unreferenced(tmp_path, caplog):
    uploads = UploadStore(tmp_path / "uploads", 10 * 1024 * 1024)
    results = ResultStore(tmp_path / "results")
    names = []
    for _ in range(3):
        name = f"{os.urandom(16).hex()}.png"
        (uploads.directory / name).write_bytes(png_bytes())
        names.append(name)
    old, referenced_old, fresh = names
    hour_ago = time.time() - 3600
    for name in (old, referenced_old):
        os.utime(uploads.directory / name, (hour_ago, hour_ago))
    job_dirs = [os.urandom(16).hex() for _ in range(3)]
    for job_id in job_dirs:
        results.job_dir(job_id).mkdir()
        (results.job_dir(job_id) / "0.png").write_bytes(b"x")
    expired, kept_by_job, recent = job_dirs
    for job_id in (expired, kept_by_job):
        os.utime(results.job_dir(job_id), (hour_ago, hour_ago))
    with caplog.at_level("INFO", logger="bridge.sweep"):
        removed_uploads, removed_results = sweep_disk(
            uploads, results, upload_ttl=600, result_ttl=600, keep_uploads={referenced_old},
            keep_results={kept_by_job})
    assert removed_uploads == [old] and removed_results == [expired]
    assert uploads.exists(referenced_old) and uploads.exists(fresh) and not uploads.exists(old)
    assert results.job_dir(kept_by_job).exists() and results.job_dir(recent).exists()
    assert old in caplog.text and expired in caplog.text


async def test_an_unreadable_row_of_any_table_is_skipped_and_the_rest_read(tmp_path, caplog):
    import sqlite3

    from storage.jobstore import JobStore
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.open()
    await store.close()
    db = sqlite3.connect(path)
    db.executescript("""
        INSERT INTO jobs VALUES ('good', '{"client_id": "good"}', 0), ('bad', '{not json', 0);
        INSERT INTO webhooks VALUES ('w1', '{"id": "w1"}', 0), ('w2', '[', 0);
        INSERT INTO records VALUES ('keys', 'k1', '{"key": "k1"}', 0), ('keys', 'k2', 'nope', 1);""")
    db.commit()
    db.close()
    store = JobStore(path)
    records, _ = store.open()
    try:
        assert records == [{"client_id": "good"}]
        assert store.deliveries() == [{"id": "w1"}]
        assert store.records("keys") == [{"key": "k1"}]
    finally:
        await store.close()
    logged = caplog.text
    assert "job record for clientId bad" in logged and "webhook delivery w2" in logged and "keys record k2" in logged
