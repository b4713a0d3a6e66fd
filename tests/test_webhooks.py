"""Webhooks (balancer/webhooks.py): a receiver in this process on a free port, verifying each
event with the `standardwebhooks` package as a real receiver would."""
from __future__ import annotations

import base64
import os
import sys

import pytest
import ujson
from standardwebhooks import Webhook
from tornado import httpserver, web
from tornado.testing import bind_unused_port

from balancer import egress, webhooks
from settings import SettingsError, load_settings
from tests.conftest import ROOT, Api, new_client_id, png_bytes, wait_for
from tests.test_durability import Process
from tests.test_no_backend import Dead, closed_port

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
ALLOW_LOCAL = "127.0.0.1:*"  # how an operator allows a receiver on an internal address


class Receiver:
    """Answers each POST with the next code of `codes` (then 200); records what it got."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.calls: list[dict] = []      # every attempt: headers, body, the code answered
        receiver = self

        class Hook(web.RequestHandler):
            def post(self):
                code = receiver.codes.pop(0) if receiver.codes else 200
                receiver.calls.append({"headers": dict(self.request.headers), "body": self.request.body,
                                       "code": code})
                self.set_status(code)
                self.finish("ok")

        sock, self.port = bind_unused_port()
        self.server = httpserver.HTTPServer(web.Application([(r"/hook", Hook)]))
        self.server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[dict]:
        """The events answered with a 2xx, each verified (signature, timestamp) and parsed."""
        verifier = Webhook(SECRET)
        return [verifier.verify(c["body"], {k.lower(): v for k, v in c["headers"].items()})
                for c in self.calls if 200 <= c["code"] < 300]

    def stop(self):
        self.server.stop()


@pytest.fixture
def receiver():
    made = []

    def make(codes=()):
        made.append(Receiver(codes))
        return made[-1]
    yield make
    for r in made:
        r.stop()


async def webhook_bridge(sim_factory, bridge_factory, **settings):
    sim = await sim_factory()
    values = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": ALLOW_LOCAL, **settings}
    return await bridge_factory([sim], **values)


async def settled(bridge):
    await wait_for(lambda: not bridge.bridge.webhooks.pending, 10, interval=0.02, what="deliveries ended")
    return dict(bridge.bridge.webhooks.counters)


async def test_a_done_job_posts_one_verified_event_and_keeps_its_results(sim_factory, bridge_factory, receiver):
    hook = receiver()
    bridge = await webhook_bridge(sim_factory, bridge_factory)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await wait_for(lambda: hook.calls, 10, what="the webhook")
    counts = await settled(bridge)
    [event] = hook.delivered()
    assert len(hook.calls) == 1 and counts == {"delivered": 1, "retried": 0, "gave_up": 0, "gone": 0}
    assert event["type"] == "job.done" and event["status"] == "done" and event["clientId"] == client_id
    assert event["detail"] == "Execution is done" and event["workflow"] == "invert"
    assert event["generationCount"] == 1
    timings = event["timings"]
    assert timings["finished"] >= timings["submitted"] and timings["runSeconds"] > 0
    [output] = event["outputs"]
    # Delivering consumed nothing: GET /history still sends the same bytes.
    [part] = await api.history(client_id)
    assert base64.b64decode(output["data"]) == part["data"] and part["data"].startswith(b"\x89PNG")
    assert output["size"] == len(part["data"]) and output["contentType"] == "image/png"
    assert output["name"] in part["headers"]["content-disposition"]
    metrics = (await api.fetch("/metrics")).body.decode()
    assert 'bridge_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    api.close()


async def test_retried_after_two_500s_with_the_same_id_and_body(sim_factory, bridge_factory, receiver,
                                                                monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_FIRST", 0.05)
    hook = receiver(codes=[500, 500])
    bridge = await webhook_bridge(sim_factory, bridge_factory)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    await api.generate(new_client_id(), {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await wait_for(lambda: len(hook.calls) >= 3, 10, what="three attempts")
    counts = await settled(bridge)
    assert [c["code"] for c in hook.calls] == [500, 500, 200]
    assert len({c["headers"]["Webhook-Id"] for c in hook.calls}) == 1
    assert len({c["body"] for c in hook.calls}) == 1
    assert len(hook.delivered()) == 1
    assert counts == {"delivered": 1, "retried": 2, "gave_up": 0, "gone": 0}
    metrics = (await api.fetch("/metrics")).body.decode()
    assert 'bridge_webhook_deliveries_total{outcome="retried"} 2.0' in metrics
    assert "bridge_webhook_pending 0.0" in metrics
    api.close()


async def test_410_stops_and_a_receiver_that_keeps_failing_is_given_up(sim_factory, bridge_factory, receiver,
                                                                      monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_FIRST", 0.05)
    gone, failing = receiver(codes=[410]), receiver(codes=[503] * 1000)
    bridge = await webhook_bridge(sim_factory, bridge_factory, WEBHOOK_RETRY_FOR=0.3)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    for hook in (gone, failing):
        await api.generate(new_client_id(), {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await wait_for(lambda: gone.calls and failing.calls, 10, what="both webhooks")
    counts = await settled(bridge)
    assert len(gone.calls) == 1 and counts["gone"] == 1
    assert counts["gave_up"] == 1 and counts["delivered"] == 0 and 1 <= len(failing.calls) <= 4
    metrics = (await api.fetch("/metrics")).body.decode()
    assert 'bridge_webhook_deliveries_total{outcome="gone"} 1.0' in metrics
    assert 'bridge_webhook_deliveries_total{outcome="gave_up"} 1.0' in metrics
    api.close()


async def test_cancelled_job_and_the_webhook_url_default(sim_factory, bridge_factory, receiver):
    hook = receiver()
    bridge = await webhook_bridge(sim_factory, bridge_factory, WEBHOOK_URL=hook.url, WEBHOOK_INLINE_MAX=0)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    slow, quick = new_client_id(), new_client_id()
    await api.generate(slow, {"workflow": "slow-progress", "1/image": saved, "2/steps": 500})
    await api.wait_status(slow, "progress")
    await api.json(f"/interrupt?clientId={slow}", "POST")
    await api.generate(quick, {"workflow": "invert", "1/image": saved})
    await wait_for(lambda: len(hook.calls) >= 2, 10, what="two webhooks")
    await settled(bridge)
    events = {e["clientId"]: e for e in hook.delivered()}
    assert len(hook.calls) == 2 and set(events) == {slow, quick}
    assert events[slow]["status"] == "cancelled" and events[slow]["type"] == "job.cancelled"
    assert events[slow]["detail"] == "interrupted" and events[slow]["outputs"] == []
    [output] = events[quick]["outputs"]  # WEBHOOK_INLINE_MAX=0: described, not inlined
    assert "data" not in output and output["size"] > 0
    api.close()


async def test_failed_and_expired_jobs_post_their_error(sim_factory, bridge_factory, receiver):
    hook = receiver()
    bridge = await webhook_bridge(sim_factory, bridge_factory)
    api = bridge.api()
    poison = await api.upload(png_bytes(seed=99))
    bridge.sims[0].fail_prompts_containing = poison
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": poison, "webhook": hook.url})
    info = await api.wait_status(client_id, "error")
    await wait_for(lambda: hook.calls, 10, what="the webhook")
    [event] = hook.delivered()
    assert event["status"] == "error" and event["type"] == "job.error" and event["detail"] == info["detail"]
    assert event["outputs"] == [] and event["timings"]["runSeconds"] is not None

    idle = await bridge_factory([Dead(closed_port())], wait_up=False, queue_timeout=0.3,
                                WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=ALLOW_LOCAL)
    idle_api = idle.api()
    waiting = new_client_id()
    await idle_api.generate(waiting, {"workflow": "blank-image", "webhook": hook.url})
    await wait_for(lambda: len(hook.calls) >= 2, 10, what="the second webhook")
    event = hook.delivered()[1]
    assert event["clientId"] == waiting and event["status"] == "expired" and "gave up after" in event["detail"]
    assert event["timings"]["runSeconds"] is None
    api.close()
    idle_api.close()


async def test_refused_webhooks_are_400s_naming_the_field(sim_factory, bridge_factory):
    bridge = await webhook_bridge(sim_factory, bridge_factory, WEBHOOK_ALLOWED_HOSTS="")
    api = bridge.api()
    saved = await api.upload(png_bytes())
    for url, words in [("http://127.0.0.1:9/hook", "loopback"), ("http://169.254.169.254/", "metadata"),
                       ("http://[::ffff:10.0.0.1]/", "private"), ("ftp://example.com/", "http"),
                       ("http://localhost:1/", "loopback"), (42, "must be a URL")]:
        response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                                   {"workflow": "invert", "1/image": saved, "webhook": url})
        assert response.code == 400, (url, response.body)
        detail = ujson.loads(response.body)["detail"]
        assert detail.startswith("webhook: ") and words in detail, (url, detail)
    assert not bridge.service.jobs
    api.close()


async def test_no_secret_no_webhooks(sim_factory, bridge_factory):
    sim = await sim_factory()
    bridge = await bridge_factory([sim], WEBHOOK_ALLOWED_HOSTS=ALLOW_LOCAL)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    response = await api.fetch(f"/generate-based-workflow?clientId={new_client_id()}", "POST",
                               {"workflow": "invert", "1/image": saved, "webhook": "http://127.0.0.1:9/"})
    assert response.code == 400 and b"WEBHOOK_SECRET" in response.body
    api.close()


def test_webhook_settings_are_checked():
    base = {"WORKFLOW_DIR": str(ROOT / "workflows")}
    for values, words in [({"WEBHOOK_SECRET": "plain"}, "whsec_"), ({"WEBHOOK_SECRET": "whsec_***"}, "base64"),
                          ({"WEBHOOK_URL": "http://h.example/"}, "WEBHOOK_SECRET"),
                          ({"WEBHOOK_URL": "ftp://h/", "WEBHOOK_SECRET": SECRET}, "http"),
                          ({"WEBHOOK_ALLOWED_HOSTS": "a.example.com/x"}, "host pattern")]:
        with pytest.raises(SettingsError, match=words):
            load_settings({**base, **values}, env={}, dotenv_path=None, check_paths=False)
    settings = load_settings({**base, "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": " *.a.com, B.com:8443"},
                             env={}, dotenv_path=None, check_paths=False)
    assert settings.webhook_allowed_hosts == ("*.a.com", "b.com:8443") and SECRET not in repr(settings)


def test_signature_is_what_standardwebhooks_verifies():
    body = ujson.dumps({"clientId": "c", "status": "done"})
    timestamp = int(__import__("time").time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": webhooks.sign(webhooks.secret_key(SECRET), "msg_1", timestamp, body)}
    assert Webhook(SECRET).verify(body, headers) == {"clientId": "c", "status": "done"}
    assert webhooks.retry_delay(1) == webhooks.RETRY_FIRST and webhooks.retry_delay(3) == 4 * webhooks.RETRY_FIRST
    assert webhooks.retry_delay(100) == webhooks.RETRY_CAP


@pytest.mark.timeout(120)
async def test_delivery_survives_a_sigkill_of_the_bridge(tmp_path, receiver):
    hook = receiver(codes=[503] * 1000)  # failing until the bridge is killed
    sim = Process([sys.executable, "-m", "comfysim", "--port", "0", "--name", "s0", "--tick-seconds", "0.01",
                   "--log-level", "WARNING"], tmp_path / "sim.log")
    procs = [sim]
    try:
        address = (await sim.wait_line(r"listening on ([\d.]+:\d+)")).group(1)

        async def start_bridge(port: int = 0):
            proc = Process([sys.executable, "bridge.py", "--env-file", str(tmp_path / "none"), "--host", "127.0.0.1",
                            "--port", str(port), "--data-dir", str(tmp_path / "data"), "--comfyui-servers", address,
                            "--webhook-secret", SECRET, "--webhook-allowed-hosts", ALLOW_LOCAL],
                           tmp_path / f"bridge{len(procs)}.log")
            procs.append(proc)
            port = int((await proc.wait_line(r"bridge listening on 127\.0\.0\.1:(\d+)")).group(1))
            return proc, port

        bridge, port = await start_bridge()
        api = Api(f"http://127.0.0.1:{port}")
        await wait_for(lambda: _backend_up(api), 20, interval=0.05, what="backend up")
        saved = await api.upload(png_bytes())
        client_id = new_client_id()
        await api.generate(client_id, {"workflow": "invert", "1/image": saved, "webhook": hook.url})
        await wait_for(lambda: hook.calls, 20, what="a first (failed) attempt")
        bridge.kill()  # the job has ended; its delivery has not
        api.close()
        hook.codes = []
        _, port = await start_bridge(port)
        await wait_for(lambda: hook.delivered(), 20, what="the delivery after the restart")
        [event] = hook.delivered()
        assert event["clientId"] == client_id and event["status"] == "done"
        assert len({c["headers"]["Webhook-Id"] for c in hook.calls}) == 1  # the same delivery, carried on
        api = Api(f"http://127.0.0.1:{port}")
        [part] = await api.history(client_id)
        assert base64.b64decode(event["outputs"][0]["data"]) == part["data"]
        api.close()
    finally:
        for proc in procs:
            proc.stop()


async def _backend_up(api) -> bool:
    response = await api.fetch("/healthz")
    return response.code == 200 and b'"backends_up":1' in response.body


async def test_the_delivery_is_committed_with_the_jobs_end(sim_factory, bridge_factory, receiver, monkeypatch):
    """One transaction: a crash cannot keep the job's end and lose its delivery (or the reverse)."""
    hook = receiver()
    bridge = await webhook_bridge(sim_factory, bridge_factory)
    store = bridge.bridge.store
    commits = []  # (job states written, deliveries written) per commit
    commit = store._commit

    def spy(batch, count, deliveries=None, records=None):
        commit(batch, count, deliveries, records)
        commits.append(([r["state"] for r in batch.values() if r],
                        {k: dict(v) if v else v for k, v in (deliveries or {}).items()}))
    monkeypatch.setattr(store, "_commit", spy)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    await api.generate(new_client_id(), {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await wait_for(lambda: hook.calls, 10, what="the webhook")
    await settled(bridge)
    await store.flush()  # the delivery's deletion, queued as it ended
    [(states, deliveries)] = [c for c in commits if "done" in c[0]]
    [delivery] = deliveries.values()
    assert delivery["body"] is None and delivery["event"]["status"] == "done"
    assert any(None in c[1].values() for c in commits)  # and deleted once delivered
    api.close()


async def test_a_clean_restart_carries_on_with_a_pending_delivery(sim_factory, bridge_factory, receiver, tmp_path):
    hook = receiver(codes=[503] * 1000)
    sim = await sim_factory()
    settings = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": ALLOW_LOCAL, "DATA_DIR": tmp_path / "kept"}
    first = await bridge_factory([sim], **settings)
    api = first.api()
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await wait_for(lambda: hook.calls, 10, what="a first (failed) attempt")
    api.close()
    await first.stop()
    hook.codes = []
    second = await bridge_factory([sim], **settings)
    await wait_for(lambda: hook.delivered(), 10, what="the delivery after the restart")
    await settled(second)
    [event] = hook.delivered()
    assert event["clientId"] == client_id and len({c["headers"]["Webhook-Id"] for c in hook.calls}) == 1
    assert second.bridge.webhooks.counters["delivered"] == 1


async def test_an_address_that_turns_internal_after_the_check_is_never_connected_to(
        sim_factory, bridge_factory, receiver, monkeypatch):
    """DNS rebinding: the URL passed its check, the connection still goes only to public addresses."""
    monkeypatch.setattr(webhooks, "RETRY_FIRST", 0.05)
    hook = receiver()
    bridge = await webhook_bridge(sim_factory, bridge_factory, WEBHOOK_ALLOWED_HOSTS="", WEBHOOK_RETRY_FOR=0.2)

    async def passes(url, field, allowed_hosts):  # what a rebinding name does at check time
        return None
    monkeypatch.setattr(egress, "check_url", passes)
    api = bridge.api()
    saved = await api.upload(png_bytes())
    client_id = new_client_id()
    await api.generate(client_id, {"workflow": "invert", "1/image": saved, "webhook": hook.url})
    await api.wait_status(client_id, "closed")
    counts = await settled(bridge)
    assert counts["gave_up"] == 1 and counts["delivered"] == 0 and hook.calls == []
    api.close()


def test_a_bad_webhook_secret_is_refused_without_showing_it():
    with pytest.raises(SettingsError) as refused:
        load_settings({"WORKFLOW_DIR": str(ROOT / "workflows"), "WEBHOOK_SECRET": "whsec_not-base64-secret!"},
                      env={}, dotenv_path=None, check_paths=False)
    assert "WEBHOOK_SECRET" in str(refused.value) and "not-base64-secret" not in str(refused.value)
