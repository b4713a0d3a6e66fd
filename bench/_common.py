"""What every bench/ script shares: starting and stopping the simulators and the bridge as
subprocesses, readiness polling, a small keep-alive HTTP client, statistics and the report.

Every run waits for a quiet machine, times a fixed Python workload (the machine's speed drifts),
and measures the CPU that processes it did not start used meanwhile; `quiet_run` repeats a run
that had more than MAX_FOREIGN cores of such load. Nothing here is imported by the bridge or by
the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"   # every process here listens and connects on loopback only



def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # so that `with Stack(...)` stops what it started


signal.signal(signal.SIGTERM, _terminate)

# Settings the bridge reads from the environment: cleared so only our flags count.
BRIDGE_ENV_KEYS = (
    "HOST", "PORT", "COMFYUI_SERVERS", "LOGGING_LEVEL", "WORKFLOW_DIR", "WORKFLOW_ALIAS", "DATA_DIR",
    "CURRENT_STATE", "UPLOAD_MAX_SIZE", "EXECUTION_TIMEOUT", "HEARTBEAT_INTERVAL", "RESULT_TTL",
    "UPLOAD_TTL", "MAX_INFLIGHT_PER_SERVER", "MAX_RETRIES", "MAX_QUEUE", "FREE_AFTER_N_GENERATIONS",
    "BACKEND_TIMEOUT", "HEALTH_CHECK_INTERVAL", "BRIDGE_API_KEY", "BRIDGE_API_KEYS", "TENANT_MAX_RUNNING",
    "TENANT_MAX_QUEUED", "CORS_ORIGINS")


# ----------------------------------------------------------------------------- arguments

def parser(description: str, runs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=runs, help=f"independent runs (default {runs})")
    p.add_argument("--root", default=str(REPO),
                   help="checkout whose bridge.py and comfysim are measured (default: this one); "
                        "point it at a scratch copy to measure a proposed change")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra bridge setting, e.g. --set MAX_INFLIGHT_PER_SERVER=2 (repeatable)")
    p.add_argument("--profile", metavar="FILE",
                   help="run the bridge of the last run under py-spy; collapsed stacks go to FILE "
                        "and a summary is printed")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary dirs and logs")
    return p


def extra_settings(args) -> dict[str, str]:
    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().upper()] = value
    return out


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def raise_nofile(limit: int | None = None) -> int:
    """Raise this process's open-file limit (soft) to `limit` or the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if limit is None else min(limit, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.setsid()  # its own process group: a Ctrl+C of the bench reaches it only through stop()


class Proc:
    """A subprocess this bench started; `stop()` ends it (SIGTERM, then SIGKILL) and nothing else."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_path: Path, env: dict | None = None,
                 stdout=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout or self._log,
                                      stderr=self._log, stdin=subprocess.DEVNULL, preexec_fn=_preexec_nofile)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> set[int]:
        return {self.pid}

    def sample_cpu(self) -> None:
        """Remember the CPU jiffies this process (and its python child) used so far."""
        if not hasattr(self, "jiffies"):
            self.jiffies = {}
        if self.alive():
            for pid in self.pids():
                j = process_jiffies(pid)
                if j:
                    self.jiffies[pid] = j

    def stop(self, timeout: float = 15.0) -> int | None:
        self.sample_cpu()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Sim(Proc):
    """`python -m comfysim` on a port of its own; `timeline` (if asked) is written when it stops."""

    def __init__(self, root: Path, workdir: Path, name: str, tick_seconds: float = 0.05,
                 timeline: bool = False):
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.timeline_path = workdir / f"{name}.timeline.json" if timeline else None
        argv = [PYTHON, "-m", "comfysim", "--host", LOOPBACK, "--port", str(self.port), "--name", name,
                "--tick-seconds", repr(tick_seconds), "--data-dir", str(workdir / name),
                "--log-level", "WARNING"]
        if self.timeline_path is not None:
            argv += ["--timeline", str(self.timeline_path)]
        super().__init__(name, argv, root, workdir / f"{name}.log")
        self.tick_seconds = tick_seconds

    def wait_ready(self, deadline: float = 30.0) -> None:
        wait_http(f"http://{self.address}/system_stats", deadline, self)

    def timeline(self) -> list[dict]:
        if self.timeline_path is None or not self.timeline_path.exists():
            return []
        return json.loads(self.timeline_path.read_text())


class BridgeProc(Proc):
    """`python bridge.py` in front of `sims`, with a data dir of its own. With `profile`, py-spy
    starts it and records until it exits (py-spy cannot attach to a running process here)."""

    def __init__(self, root: Path, workdir: Path, sims: list[Sim], settings: dict[str, str] | None = None,
                 profile: Path | None = None):
        self.port = free_port()
        self.base = f"http://{LOOPBACK}:{self.port}"
        self.backends = len(sims)
        self.settings = {"LOGGING_LEVEL": "INFO", **(settings or {})}
        argv = [PYTHON, "bridge.py", "--env-file", str(workdir / "no.env"), "--host", LOOPBACK,
                "--port", str(self.port), "--comfyui-servers", ",".join(s.address for s in sims),
                "--data-dir", str(workdir / "bridge-data"),
                "--workflow-dir", str(root / "workflows"), "--workflow-alias", str(root / "workflows" / "aliases.json")]
        for key, value in self.settings.items():
            argv += ["--" + key.lower().replace("_", "-"), str(value)]
        env = {k: v for k, v in os.environ.items() if k not in BRIDGE_ENV_KEYS}
        env["PYTHONUNBUFFERED"] = "1"
        self.profile = profile
        if profile is not None:
            pyspy = Path(PYTHON).with_name("py-spy")
            argv = [str(pyspy), "record", "--rate", "200", "--format", "raw", "--output", str(profile),
                    "--"] + argv
        super().__init__("bridge", argv, root, workdir / "bridge.log", env=env)

    @property
    def python_pid(self) -> int:
        """The bridge's own pid (py-spy's child when profiling)."""
        if self.profile is None:
            return self.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                children = (task / "children").read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.05)
        raise RuntimeError("py-spy started no bridge process")

    def pids(self) -> set[int]:
        if self.profile is None:
            return {self.pid}
        try:
            return {self.pid, self.python_pid}
        except (OSError, RuntimeError):
            return {self.pid}

    def wait_ready(self, deadline: float = 60.0) -> None:
        def ready(body: bytes) -> bool:
            return json.loads(body).get("backends_up") == self.backends
        wait_http(f"{self.base}/healthz", deadline, self, ready)

    def stop(self, timeout: float = 30.0) -> int | None:
        self.sample_cpu()
        if self.profile is not None and self.alive():
            try:
                os.kill(self.python_pid, signal.SIGTERM)  # py-spy writes its file once the bridge exits
                self.popen.wait(timeout)
            except (ProcessLookupError, RuntimeError, subprocess.TimeoutExpired):
                pass
        return super().stop(timeout)


def wait_http(url: str, deadline: float, proc: Proc, ready=None) -> None:
    """Poll `url` until it answers 200 (and `ready(body)`), or fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    last = "no answer"
    while time.monotonic() < end:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read()
                if resp.status == 200 and (ready is None or ready(body)):
                    return
                last = body.decode(errors="replace")[:200]
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready after {deadline}s ({url}: {last}):\n{proc.log_tail()}")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def busy_cores(seconds: float = 1.0) -> float:
    b0, t0 = machine_jiffies()
    time.sleep(seconds)
    b1, t1 = machine_jiffies()
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


# Other sessions may share this machine: every run waits until it is quiet, and says how much
# CPU processes it did not start used while it ran ("foreign load").
QUIET_CORES = 0.3
QUIET_WAIT = 180.0


def wait_quiet(threshold: float = QUIET_CORES, max_wait: float = QUIET_WAIT) -> float:
    end = time.monotonic() + max_wait
    while True:
        busy = busy_cores(1.0)
        if busy <= threshold or time.monotonic() > end:
            return busy
        print(f"(waiting for the machine to be quiet: {busy:.2f} cores busy with other work)",
              file=sys.stderr, flush=True)
        time.sleep(4.0)


CALIBRATIONS: list[float] = []  # ms of the fixed workload below, once per Stack


def calibrate() -> float:
    """Milliseconds this machine takes now for a fixed pure-Python workload (best of 5).

    The CPU this VM gets varies over time (by a factor of 2 within an hour here): comparing
    figures taken at different times is only fair relative to this number."""
    payload = {"prompt": {str(i): {"class_type": "Node", "inputs": {"a": i, "b": [str(i - 1), 0]}} for i in range(50)}}
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            json.loads(json.dumps(payload))
        best = min(best, time.perf_counter() - t)
    CALIBRATIONS.append(1000 * best)
    return 1000 * best


class Stack:
    """The processes of one run, in a temporary dir; stopped (bridge first) on exit.

    It waits for a quiet machine first, and measures the CPU that other processes used while
    it ran (`foreign_cores`, in cores): a figure taken under foreign load is suspect."""

    def __init__(self, args, label: str):
        self.root = Path(args.root).resolve()
        self.keep = args.keep_logs
        self.quiet_before = wait_quiet()
        self.calibration_ms = calibrate()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
        (self.dir / "no.env").write_text("")
        self.sims: list[Sim] = []
        self.bridge: BridgeProc | None = None
        self.others: list[Proc] = []   # further processes of the run (added with `add`), stopped first
        self._t0 = time.monotonic()
        self._machine0 = machine_jiffies()
        self._self0 = process_jiffies(os.getpid())
        self.foreign_cores: float | None = None

    def _own_jiffies(self) -> int:
        total = 0
        for proc in [*self.sims, *([self.bridge] if self.bridge else []), *self.others]:
            proc.sample_cpu()
            total += sum(getattr(proc, "jiffies", {}).values())
        return total

    def sim(self, name: str, tick_seconds: float = 0.05, timeline: bool = False) -> Sim:
        sim = Sim(self.root, self.dir, name, tick_seconds, timeline)
        self.sims.append(sim)
        return sim

    def add(self, proc: "Proc") -> "Proc":
        """A further process of this run: its CPU counts as the run's own, `stop` ends it."""
        self.others.append(proc)
        return proc

    def start_bridge(self, settings: dict | None = None, profile: Path | None = None) -> BridgeProc:
        for sim in self.sims:
            sim.wait_ready()
        self.bridge = BridgeProc(self.root, self.dir, self.sims, settings, profile)
        self.bridge.wait_ready()
        return self.bridge

    def stop(self) -> None:
        if self.foreign_cores is None:
            busy1, total1 = machine_jiffies()
            own = self._own_jiffies() + process_jiffies(os.getpid()) - self._self0
            busy0, total0 = self._machine0
            cores = os.cpu_count() or 1
            self.foreign_cores = max(0.0, cores * (busy1 - busy0 - own) / max(1, total1 - total0))
            FOREIGN.append(self.foreign_cores)
        for proc in self.others:
            proc.stop()
        if self.bridge is not None:
            self.bridge.stop()
        for sim in self.sims:
            sim.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        if not self.keep:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"(logs kept in {self.dir})", file=sys.stderr)
        return False


FOREIGN: list[float] = []    # foreign load of every Stack of this process, in cores
ACCEPTED: list[float] = []   # the same, of the runs whose figures were kept
DISCARDED: list[float] = []
MAX_FOREIGN = 0.3            # cores; a run with more foreign load is repeated


def quiet_run(run, attempts: int = 3):
    """Call `run()` (one measured run, one or more Stacks); when other processes used more than
    MAX_FOREIGN cores meanwhile, throw its figures away and run it again (at most `attempts`)."""
    for attempt in range(attempts):
        mark = len(FOREIGN)
        result = run()
        foreign = max(FOREIGN[mark:], default=0.0)
        if foreign <= MAX_FOREIGN or attempt == attempts - 1:
            ACCEPTED.append(foreign)
            return result
        DISCARDED.append(foreign)
        print(f"(run discarded: processes this bench did not start used {foreign:.2f} cores meanwhile; "
              "running it again)", file=sys.stderr, flush=True)


def foreign_note() -> str:
    kept = ACCEPTED or FOREIGN
    if not kept:
        return "foreign load not measured"
    flag = (" - SUSPECT: other work shared the machine" if max(kept) > MAX_FOREIGN else "")
    dropped = (f"; {len(DISCARDED)} run(s) discarded and repeated for foreign load above {MAX_FOREIGN} cores"
               if DISCARDED else "")
    return (f"CPU used by processes this bench did not start, per kept run: "
            f"{', '.join(f'{x:.2f}' for x in kept)} cores (of {os.cpu_count()}){flag}{dropped}")


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- HTTP client

class HttpConn:
    """One keep-alive HTTP/1.1 connection over asyncio streams. Deliberately minimal: the load
    generator shares two cores with the bridge, so it must cost far less per request."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "HttpConn":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            await self.open()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        got = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            got[name.strip().lower()] = value.strip()
        if "content-length" in got:
            data = await self.reader.readexactly(int(got["content-length"]))
        elif got.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = b""
        if got.get("connection", "").lower() == "close":
            self.close()
        return status, got, data


def multipart(field: str, filename: str, data: bytes, ctype: str = "image/png",
              fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = os.urandom(12).hex()
    out = []
    for name, value in (fields or {}).items():
        out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
               f"Content-Type: {ctype}\r\n\r\n".encode())
    out.append(data)
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    from io import BytesIO
    from PIL import Image
    out = BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- statistics

def percentile(values, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values) -> float:
    return percentile(values, 50)


def spread(values) -> dict:
    """Median over runs and its spread: min, max, and the per-run values."""
    vals = list(values)
    return {"median": median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def fmt_spread(s: dict, unit: str = "", digits: int = 2) -> str:
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'])}{unit} (min {f.format(s['min'])}, max {f.format(s['max'])}; "
            f"runs: {', '.join(f.format(v) for v in s['runs'])})")


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import tornado
        tornado_version = tornado.version
    except ImportError:
        tornado_version = "?"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "tornado": tornado_version,
            "kernel": platform.release()}


def code_version(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{root} (not a git checkout)"
    if not commit:
        return f"{root} (not a git checkout)"
    return f"{root} @ {commit}" + (" with uncommitted changes" if dirty else "")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        rel = script.relative_to(REPO)
    except ValueError:
        rel = script
    return f"cd {REPO} && .venv/bin/python {rel} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def report(title: str, args, rows: list[dict], notes: list[str] = (), extra: dict | None = None) -> None:
    """rows: {"figure", "goal", "value" (text), "met" (bool|None)}; printed, and written as JSON."""
    info = machine()
    print()
    print(f"== {title} ==")
    print(f"machine: nproc={info['nproc']}, cpu={info['cpu']}, {info['memory_gb']} GB, python {info['python']}, "
          f"tornado {info['tornado']}, linux {info['kernel']}")
    print(f"code:    {code_version(Path(args.root))}")
    if args.set:
        print(f"bridge settings: {' '.join(args.set)}")
    print(f"command: {command_line()}")
    width = max(len(r["figure"]) for r in rows)
    for r in rows:
        met = {True: "MET ", False: "MISS", None: "    "}[r.get("met")]
        print(f"  {met} {r['figure']:<{width}}  {r['value']}   [goal {r['goal']}]")
    notes = [*notes, foreign_note()]
    if CALIBRATIONS:
        notes.append(f"machine speed: a fixed Python workload took {median(CALIBRATIONS):.1f} ms (min "
                     f"{min(CALIBRATIONS):.1f}, max {max(CALIBRATIONS):.1f}) at the start of the runs; "
                     "lower is faster, compare figures of different days through it")
    for note in notes:
        print(f"  note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "title": title, "machine": info, "code": code_version(Path(args.root)), "command": command_line(),
            "rows": rows, "notes": list(notes), "calibration_ms": CALIBRATIONS, "foreign_cores": ACCEPTED,
            **(extra or {})}, indent=2, default=str))


IDLE_LEAVES = ("EpollSelector.select (", "select (selectors.py", "_worker (concurrent/futures/thread.py",
               "wait (threading.py")


def summarize_profile(path: Path, top: int = 25) -> str:
    """py-spy raw (collapsed) stacks -> the functions with the most samples, self and total."""
    if not path.exists():
        return f"(no profile written to {path})"
    self_count: dict[str, int] = {}
    total_count: dict[str, int] = {}
    samples = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n  # a thread waiting (py-spy cannot tell idle threads apart here)
            continue
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
        for frame in set(frames):
            total_count[frame] = total_count.get(frame, 0) + n
    if not samples:
        return "(empty profile)"
    samples -= idle
    out = [f"py-spy: {samples} samples of the bridge's busy time ({idle} samples of threads waiting in "
           "select() or for executor work left out)",
           "  self%  total%  function (file:line)"]
    for frame, n in sorted(self_count.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / samples:5.1f}  {100 * total_count[frame] / samples:6.1f}  {frame}")
    return "\n".join(out)


def profile_path(args) -> Path | None:
    return Path(args.profile).resolve() if args.profile else None
