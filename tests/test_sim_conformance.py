"""Replays the captured real-ComfyUI sessions (tests/sim_captures/NN_*.json) against comfysim.

The captures were taken on ComfyUI 0.3.64, so they are replayed against the simulator's
"0.3.64" profile (not its default, today's ComfyUI: see test_sim_profiles.py for that).

Each capture is a list of events: HTTP exchanges, websocket opens/sends/closes and the
frames each socket received. The replay sends the same requests in the same order and
compares, per exchange, the status code, Content-Type and (normalised) body, and per
socket the sequence of received message types plus each message's normalised data.

Normalisation (applied to the capture and to the simulator alike) removes what cannot
match between two runs: prompt ids (mapped by order of creation), timestamps, queue
numbers (checked separately), tracebacks, random temp-file letters, the data folder path,
uuid socket ids, and the order of id lists that ComfyUI builds from Python sets.

Graphs that use the tiny upscale model are replayed with SimSlowProgress in place of
ImageUpscaleWithModel (UpscaleModelLoader dropped, steps = the captured tile count); the
expected messages are filtered the same way. Where a real run races an interrupt or a
reconnect against progress ticks, runs of progress/progress_state are compared as one token.

Before each request the replay waits until every open socket has received what the real
client had received when it sent that request; nothing waits a fixed time.
"""
from __future__ import annotations

import copy
import json
import re
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from comfysim import SimulatedComfy
from comfysim.testing import WSClient, fetch, multipart, parse_binary_frame, wait_until

CAPTURES = Path(__file__).parent / "sim_captures"
CAPTURED_PROFILE = "0.3.64"  # the ComfyUI version the captures were taken on
TIMEOUT = 10.0
SET_KEYS = {"executed", "current_outputs", "dependent_outputs"}
PLACEHOLDER = re.compile(r"^<(\d+) bytes(?: of .*)?>$")
TEMP_NAME = re.compile(r"ComfyUI_temp_[a-z]{5}_")
UUID_HEX = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Scenario:
    tick_seconds: float = 0.005
    collapse_ticks: bool = False        # compare runs of progress/progress_state as one token
    status_apart: bool = False          # queue `status` broadcasts race with execution events
    output_order: list | None = None    # pin the order ComfyUI happened to iterate its output set
    # (method, path) -> ("skip" | "keys", reason): bodies that cannot match, and why
    body_modes: dict = field(default_factory=dict)
    headers_by_label: dict = field(default_factory=dict)


SCENARIOS = {
    "00_info_endpoints": Scenario(body_modes={
        ("GET", "/system_stats"): ("keys", "machine facts differ"),
        ("GET", "/api/system_stats"): ("keys", "machine facts differ"),
        ("GET", "/object_info/ImageUpscaleWithModel"): ("skip", "no upscale nodes in the simulator"),
        ("GET", "/models/upscale_models"): ("skip", "the simulator has no model files"),
    }),
    "01_ws_connect": Scenario(),
    "02_upload_image": Scenario(),
    "03_invert_success": Scenario(),
    "04_cached_resubmit": Scenario(),
    "05_validation_errors": Scenario(),
    # Interrupts and reconnects race with progress ticks, and queue changes (`status`) with
    # both: ticks are compared as runs, and `status` apart from the execution events.
    "06_interrupt": Scenario(tick_seconds=0.02, collapse_ticks=True, status_apart=True),
    "07_progress_and_preview": Scenario(),
    "08_reconnect_and_routing": Scenario(tick_seconds=0.02, collapse_ticks=True, status_apart=True),
    "09_history_queue_free": Scenario(
        body_modes={
            ("GET", "/history?max_items=2"): ("skip", "lists prompts of earlier capture sessions"),
            ("GET", "/history?max_items=2&offset=0"): ("skip", "lists prompts of earlier capture sessions"),
            ("GET", "/system_stats"): ("keys", "machine facts differ"),
        },
        # the capture does not record request headers; these are what its labels describe
        headers_by_label={"Origin host != Host": {"Origin": "http://evil.example:8188"},
                          "matching Origin": {"Origin": "http://{address}"}}),
    "10_binary_frames": Scenario(output_order=["5", "3"]),
    # prompts are queued while another runs: where their `status` lands among the
    # running prompt's events is timing; both streams are still compared in order
    "11_priority_front_partial": Scenario(tick_seconds=0.02, status_apart=True),
    "12_ui_vs_api_format": Scenario(),
    "13_reconnect_old_socket_close": Scenario(),
}


def _is_progress_type(token) -> bool:
    return token in ("progress", "progress_state")


def collapse(tokens: list) -> list:
    """Turn every run of progress/progress_state frames into one 'TICKS' token."""
    out = []
    for tok in tokens:
        if _is_progress_type(tok[0]):
            if not out or out[-1][0] != "TICKS":
                out.append(("TICKS", None))
        else:
            out.append(tok)
    return out


def prefix_reached(expected: list, actual: list) -> bool:
    return [t for t, _ in actual[:len(expected)]] == [t for t, _ in expected]


class Replay:
    def __init__(self, name: str, sim: SimulatedComfy, scenario: Scenario):
        self.name, self.sim, self.sc = name, sim, scenario
        self.capture = json.loads((CAPTURES / f"{name}.json").read_text())
        self.events = self.capture["events"]
        self.base = f"http://{sim.address}"
        self.ws_base = f"ws://{sim.address}"
        self.root = str(sim.folders.root)
        self.sockets: dict[str, WSClient] = {}
        self.cap_pids: dict[str, str] = {}    # captured prompt id -> our prompt id
        self.pid_index: dict[str, int] = {}   # any prompt id (either side) -> creation index
        self.number_offset = None
        self.removed_by_pid: dict[str, set] = {}
        self.steps_by_pid: dict[tuple, int] = {}
        self.failures: list[str] = []
        self._scan_capture()
        self.expected = self._expected_frames()

    # -- what the capture tells us up front -----------------------------------------------
    def _scan_capture(self) -> None:
        for e in self.events:
            if e["kind"] == "ws_recv" and e.get("type") == "progress":
                d = e["data"]
                key = (d["prompt_id"], d["node"])
                self.steps_by_pid[key] = max(self.steps_by_pid.get(key, 0), d["max"])
            if e["kind"] == "http" and e["path"].split("?")[0].endswith("/prompt") and e["method"] == "POST" \
                    and e["status"] == 200 and isinstance(e["request_body"], dict):
                pid = e["response_body"]["prompt_id"]
                self.pid_index.setdefault(pid, len(self.pid_index))
                graph = e["request_body"].get("prompt") or {}
                self.removed_by_pid[pid] = {nid for nid, n in graph.items()
                                            if isinstance(n, dict) and n.get("class_type") == "UpscaleModelLoader"}

    def transform_graph(self, graph, cap_pid):
        """Replace the upscale-model nodes by SimSlowProgress (see module docstring)."""
        if not isinstance(graph, dict):
            return graph
        out = {}
        for nid, node in graph.items():
            if not isinstance(node, dict):
                out[nid] = node
                continue
            ct = node.get("class_type")
            if ct == "UpscaleModelLoader":
                continue
            if ct == "ImageUpscaleWithModel":
                steps = self.steps_by_pid.get((cap_pid, nid), 25)
                node = {**node, "class_type": "SimSlowProgress",
                        "inputs": {"image": node["inputs"]["image"], "steps": steps}}
            out[nid] = node
        if self.sc.output_order:
            last = [k for k in self.sc.output_order if k in out]
            out = {**{k: v for k, v in out.items() if k not in last}, **{k: out[k] for k in last}}
        return out

    def filter_message(self, mtype, data, removed):
        """The captured message as it looks without the dropped loader node."""
        if not removed or not isinstance(data, dict):
            return data
        data = dict(data)
        if mtype == "execution_cached":
            data["nodes"] = [n for n in data["nodes"] if n not in removed]
        if mtype in ("execution_interrupted", "execution_error"):
            data["executed"] = [n for n in data["executed"] if n not in removed]
        if data.get("node_type") == "ImageUpscaleWithModel":
            data["node_type"] = "SimSlowProgress"
        return data

    def _expected_frames(self) -> dict[str, list]:
        per_socket = defaultdict(list)
        last_state: dict[tuple, dict] = {}
        for e in self.events:
            if e["kind"] != "ws_recv":
                continue
            ws = e["ws"]
            if e["frame_type"] != "text":
                data = {k: v for k, v in e.items() if k not in ("t_ms", "kind", "ws", "frame_type", "length")}
                per_socket[ws].append((e["t_ms"], "binary", data))
                continue
            mtype, data = e["type"], e["data"]
            removed = self.removed_by_pid.get(data.get("prompt_id"), set())
            if mtype == "executing" and data.get("node") in removed:
                continue
            if mtype == "progress_state":
                nodes = data["nodes"]
                before = last_state.get((ws, data["prompt_id"]), {})
                last_state[(ws, data["prompt_id"])] = nodes
                changed = {k for k, v in nodes.items() if before.get(k) != v}
                if changed and changed <= removed:
                    continue  # this update was about a dropped node
                data = {**data, "nodes": {k: v for k, v in nodes.items() if k not in removed}}
            per_socket[ws].append((e["t_ms"], mtype, self.filter_message(mtype, data, removed)))
        return per_socket

    # -- normalisation ------------------------------------------------------------------------
    def norm(self, obj):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                k = self.norm(k) if isinstance(k, str) else k
                if k == "timestamp" and isinstance(v, int):
                    out[k] = "<ts>"
                elif k == "traceback":
                    out[k] = "<traceback>"
                elif k == "number":
                    out[k] = "<number>"
                elif k in SET_KEYS and isinstance(v, list):
                    out[k] = sorted(self.norm(x) for x in v)
                elif k == "errors" and isinstance(v, list):
                    out[k] = sorted((self.norm(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True))
                else:
                    out[k] = self.norm(v)
            return out
        if isinstance(obj, list):
            if len(obj) == 5 and isinstance(obj[1], str) and obj[1] in self.pid_index and isinstance(obj[2], dict):
                # a queue item / history "prompt": [number, prompt_id, graph, extra_data, outputs]
                return ["<number>", self.norm(obj[1]), self.norm(obj[2]), self.norm(obj[3]),
                        sorted(self.norm(x) for x in obj[4])]
            return [self.norm(x) for x in obj]
        if isinstance(obj, str):
            if obj in self.pid_index:
                return f"<prompt {self.pid_index[obj]}>"
            if UUID_HEX.match(obj):
                return "<uuid>"
            return TEMP_NAME.sub("ComfyUI_temp_<rand>_", obj.replace(self.root, "<comfy-run>"))
        return obj

    def captured_body(self, body, cap_pid_hint=None):
        """Bring a captured body to what the simulator should answer (graph substitution)."""
        body = copy.deepcopy(body)

        def fix_item(item):
            if isinstance(item, list) and len(item) == 5 and isinstance(item[2], dict):
                item[2] = self.transform_graph(item[2], item[1])

        if isinstance(body, dict):
            for key in ("queue_running", "queue_pending"):
                for item in body.get(key, []) if isinstance(body.get(key), list) else []:
                    fix_item(item)
            for pid, entry in body.items():
                if isinstance(entry, dict) and "prompt" in entry and "status" in entry:
                    fix_item(entry["prompt"])
                    removed = self.removed_by_pid.get(pid, set())
                    msgs = (entry.get("status") or {}).get("messages", [])
                    entry["status"]["messages"] = [[m, self.filter_message(m, d, removed)] for m, d in msgs]
        return body

    # -- helpers ------------------------------------------------------------------------------
    def map_pids(self, text: str) -> str:
        for cap, ours in self.cap_pids.items():
            text = text.replace(cap, ours)
        # PreviewImage names are random: map captured ones to ours in order of appearance
        captured = [n for name in sorted(self.expected) for _, _, d in self.expected[name] for n in temp_names(d)]
        ours = [n for name in sorted(self.sockets) for f in self.sockets[name].messages for n in temp_names(f["data"])]
        for cap, mine in zip(captured, ours):
            text = text.replace(cap, mine)
        return text

    @staticmethod
    def tokens(frames) -> list:
        return [("binary", parse_binary_frame(f)) if isinstance(f, bytes) else (f["type"], f["data"])
                for f in frames]

    def expected_tokens(self, ws, before=None):
        return [(t, d) for ts, t, d in self.expected.get(ws, []) if before is None or ts < before]

    def streams(self, tokens) -> list[list]:
        """The token sequences compared in order: one, or execution events and `status` apart."""
        if self.sc.status_apart:
            streams = [[t for t in tokens if t[0] != "status"], [t for t in tokens if t[0] == "status"]]
        else:
            streams = [tokens]
        return [collapse(s) for s in streams] if self.sc.collapse_ticks else streams

    async def wait_frames(self, name: str, client: WSClient, before=None) -> None:
        expected = self.streams(self.expected_tokens(name, before))

        def reached(frames):
            return all(prefix_reached(e, a) for e, a in zip(expected, self.streams(self.tokens(frames))))
        try:
            await client.wait_for(reached, TIMEOUT, what=f"{name}")
        except TimeoutError:
            exp = [[t for t, _ in e] for e in expected]
            act = [[t for t, _ in a] for a in self.streams(self.tokens(client.frames))]
            raise AssertionError(f"{self.name}: socket {name} never got the captured frames\n"
                                 f"  expected {exp}\n  actual   {act}") from None

    async def settle(self, before: float) -> None:
        """Wait until every open socket got what the real client had received by `before`."""
        for name, client in self.sockets.items():
            if not client.closed:
                await self.wait_frames(name, client, before)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    # -- the replay ---------------------------------------------------------------------------
    async def run(self) -> list[str]:
        for i, e in enumerate(self.events):
            kind = e["kind"]
            if kind == "ws_open":
                await self.settle(e["t_ms"])
                query = e["url"].split("?", 1)[1] if "?" in e["url"] else ""
                client_id = query.split("clientId=", 1)[1] if "clientId=" in query else None
                self.sockets[e["ws"]] = await WSClient.connect(self.ws_base, client_id)
            elif kind == "ws_send":
                await self.settle(e["t_ms"])
                self.sockets[e["ws"]].send(e["frame"])
            elif kind == "ws_close_by_client":
                await self.settle(e["t_ms"])
                await self.sockets[e["ws"]].close()
                still_open = sum(1 for c in self.sockets.values() if not c.closed)
                await wait_until(lambda: self.sim.websocket_count == still_open, TIMEOUT,
                                 what="the server to see the close")
            elif kind == "http":
                await self.settle(e["t_ms"] - e["elapsed_ms"])
                await self.http(i, e)
        for name, client in self.sockets.items():
            if not client.closed:
                await self.wait_frames(name, client)
            self.compare_socket(name, client)
        return self.failures

    async def http(self, index: int, e: dict) -> None:
        # quoted like the capturing client (requests) did, e.g. the space in "x.png [output]"
        method, path = e["method"], urllib.parse.quote(self.map_pids(e["path"]), safe="/?&=:;%@!$'()*+,[]~")
        where = f"#{index} {method} {e['path']} ({e.get('label') or ''})"
        req, headers, body = e["request_body"], {}, None
        if isinstance(req, dict) and "multipart_files" in req:
            files = {k: (v[0], self.fake_bytes(v[1]), v[2]) for k, v in req["multipart_files"].items()}
            body, ctype = multipart(req["multipart_fields"], files)
            headers["Content-Type"] = ctype
        elif isinstance(req, str):
            body = req
        elif req is not None:
            req = copy.deepcopy(req)
            if isinstance(req, dict) and "prompt" in req and e["status"] == 200:
                req["prompt"] = self.transform_graph(req["prompt"], e["response_body"]["prompt_id"])
            body = self.map_pids(json.dumps(req))
        for label, extra in self.sc.headers_by_label.items():
            if label in (e.get("label") or ""):
                headers.update({k: v.format(address=self.sim.address) for k, v in extra.items()})

        captured = e["response_body"]
        poll = method == "GET" and e["path"].startswith("/history/") and captured not in ({}, "", None)

        async def attempt():
            r = await fetch(self.base, path, method, body, headers or None)
            # The capture polled /history/{id} until the entry appeared (no WS event says so in 13).
            return r if not poll or r.body not in (b"{}", b"") else None
        resp = await wait_until(attempt, TIMEOUT, interval=0.02, what=f"{where} to answer as captured")

        if resp.code != e["status"]:
            return self.fail(f"{where}: status {resp.code} != {e['status']} body={resp.body[:200]!r}")
        cap_ctype = e["response_headers"].get("Content-Type")
        if resp.headers.get("Content-Type") != cap_ctype:
            self.fail(f"{where}: Content-Type {resp.headers.get('Content-Type')!r} != {cap_ctype!r}")
        if "Content-Disposition" in e["response_headers"] and "Content-Disposition" not in resp.headers:
            self.fail(f"{where}: Content-Disposition missing")

        ours = self.decode_body(resp)
        if method == "POST" and e["path"].split("?")[0] in ("/prompt", "/api/prompt") and resp.code == 200:
            self.check_prompt_response(where, req, captured, ours)
        mode, _reason = self.sc.body_modes.get((method, e["path"]), ("exact", ""))
        if mode == "skip" or captured == "<omitted>":
            return
        if isinstance(captured, str) and PLACEHOLDER.match(captured):
            if (int(PLACEHOLDER.match(captured).group(1)) == 0) != (resp.body == b""):
                self.fail(f"{where}: body emptiness differs")
            return
        expected = self.norm(self.captured_body(captured))
        actual = self.norm(ours)
        if mode == "keys":
            expected, actual = keys_of(expected), keys_of(actual)
        if expected != actual:
            self.fail(f"{where}: body differs\n  expected {json.dumps(expected)[:1500]}\n"
                      f"  actual   {json.dumps(actual)[:1500]}")

    def check_prompt_response(self, where, req, captured, ours) -> None:
        cap_pid, our_pid = captured["prompt_id"], ours["prompt_id"]
        self.cap_pids[cap_pid] = our_pid
        self.pid_index[our_pid] = self.pid_index[cap_pid]
        if isinstance(req, dict) and "prompt_id" in req and our_pid != cap_pid:
            self.fail(f"{where}: client prompt_id not kept")
        cap_n, our_n = captured["number"], ours["number"]
        if isinstance(req, dict) and "number" in req:
            ok = cap_n == our_n  # explicit priority is echoed as given
        else:
            # The real server had counted earlier sessions' prompts: compare up to a constant offset.
            if self.number_offset is None:
                self.number_offset = abs(cap_n) - abs(our_n)
            front = isinstance(req, dict) and bool(req.get("front"))
            ok = abs(cap_n) - abs(our_n) == self.number_offset and (our_n <= 0 if front else our_n >= 0)
        if not ok:
            self.fail(f"{where}: number {our_n} does not correspond to captured {cap_n}")

    @staticmethod
    def decode_body(resp):
        ctype = resp.headers.get("Content-Type") or ""
        if ctype.startswith("application/json"):
            return json.loads(resp.body)
        if ctype.startswith("text/"):
            return resp.body.decode()
        return "" if not resp.body else f"<{len(resp.body)} bytes>"

    @staticmethod
    def fake_bytes(placeholder: str) -> bytes:
        """Stand-in for an uploaded file the capture only describes by size: same size, same bytes."""
        size = int(PLACEHOLDER.match(placeholder).group(1))
        if size < 67:  # too small for a PNG: the capture's "not an image" uploads
            return (b"this is not an image " * 4)[:size]
        from comfysim.testing import png_bytes
        return png_bytes((64, 48), (size % 256, 255 - size % 256, 80))

    def compare_socket(self, name: str, client: WSClient) -> None:
        for expected, actual in zip(self.streams(self.expected_tokens(name)), self.streams(self.tokens(client.frames))):
            self.compare_stream(name, expected, actual)

    def compare_stream(self, name: str, expected: list, actual: list) -> None:
        exp_types, act_types = [t for t, _ in expected], [t for t, _ in actual]
        # The capturing client stopped reading when it closed; broadcasts it had not read yet
        # may still reach ours before our close.
        while len(act_types) > len(exp_types) and act_types[-1] == "status":
            act_types.pop()
        if exp_types != act_types:
            return self.fail(f"socket {name}: message types differ\n  expected {exp_types}\n  actual   {act_types}")
        for n, ((t, exp), (_, act)) in enumerate(zip(expected, actual)):
            if t == "TICKS":
                continue
            if t != "binary":
                exp = self.captured_body(exp)
            e_norm, a_norm = self.norm(exp), self.norm(act)
            if t == "binary":
                e_norm.pop("length", None)
            if e_norm != a_norm:
                self.fail(f"socket {name} frame {n} ({t}) differs\n  expected {json.dumps(e_norm)[:800]}\n"
                          f"  actual   {json.dumps(a_norm)[:800]}")


def temp_names(data) -> list[str]:
    out = data.get("output") if isinstance(data, dict) else None
    images = out.get("images", []) if isinstance(out, dict) else []
    return [i["filename"] for i in images if i.get("type") == "temp"]


def keys_of(obj):
    if isinstance(obj, dict):
        return {k: keys_of(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [keys_of(x) for x in obj[:1]]
    return type(obj).__name__


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replay_capture(name, tmp_path):
    scenario = SCENARIOS[name]
    sim = SimulatedComfy(name=f"replay-{name[:2]}", tick_seconds=scenario.tick_seconds, data_dir=tmp_path / "sim",
                         profile=CAPTURED_PROFILE)
    assert sim.profile == "0.3.64"
    await sim.start(port=0)
    replay = Replay(name, sim, scenario)
    try:
        failures = await replay.run()
    finally:
        for client in replay.sockets.values():
            if not client.closed:
                await client.close()
        await sim.stop()
    assert not failures, f"{name}: {len(failures)} difference(s):\n" + "\n".join(failures)
