"""The package: `pip install .` into a fresh venv gives a `comfy-bridge` command that runs the
demo from the installed files (modules, the test page, the workflows, Swagger UI), not from
this checkout; pyproject.toml pins what requirements.txt pins; one version everywhere.

The install is built from a copy of the files a clone would have (tracked, or new and not
ignored), without build isolation and with --no-deps: the fresh venv sees the project's .venv
packages through a .pth file, so no download is needed and the test takes seconds.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ujson

from comfy_bridge_version import __version__

from .conftest import ROOT

pytestmark = pytest.mark.timeout(120)
DEADLINE = 30.0


def poll(check, timeout: float = DEADLINE, what: str = "it"):
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the bridge's clean stop), then SIGKILL if it has not ended by the deadline."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(DEADLINE)


def clone_files() -> list[str]:
    """The files a clone of this work would hold: tracked ones, and new ones not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=30).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=ujson.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with `pip install --no-deps .` done from a copy of the clone's files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout (the files of a clone are listed with git ls-files)")
    base = tmp_path_factory.mktemp("package")
    source = base / "src"
    for name in clone_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    # The dependencies: this test run's own packages, seen by the new venv (no download).
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_test_dependencies.pth").write_text("\n".join(sorted(parents)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-q", str(source)],
        capture_output=True, text=True, timeout=90, cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def test_installed_modules_and_data_come_from_the_venv(installed, tmp_path):
    code = ("import bridge, comfy_bridge_data, handlers.docs as d; "
            "print(bridge.__file__); print(comfy_bridge_data.static_dir()); "
            "print(comfy_bridge_data.workflows_dir()); print(comfy_bridge_data.is_checkout())")
    result = subprocess.run([str(installed / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=30, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    module, static, workflows, checkout = result.stdout.split()
    for path in (module, static, workflows):
        assert Path(path).resolve().is_relative_to(installed.resolve()), path
    assert checkout == "False"
    assert (Path(static) / "index.html").read_bytes() == (ROOT / "static" / "index.html").read_bytes()
    assert (Path(workflows) / "aliases.json").is_file() and (Path(workflows) / "example.png").is_file()


def test_comfy_bridge_version(installed, tmp_path):
    result = subprocess.run([str(installed / "bin" / "comfy-bridge"), "--version"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"comfy-bridge {__version__}"
    help_text = subprocess.run([str(installed / "bin" / "comfy-bridge"), "--help"], capture_output=True,
                               text=True, cwd=tmp_path, timeout=30).stdout
    assert help_text.startswith("usage: comfy-bridge ") and "--demo" in help_text and "--bridge-api-key" in help_text


def test_comfy_bridge_demo_runs_a_job_from_the_installed_files(installed, tmp_path):
    work = tmp_path / "work"  # an empty folder: nothing of the checkout is beside it
    work.mkdir()
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "BRIDGE_API_KEY", "PYTHONPATH")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(installed / "bin" / "comfy-bridge"), "--demo", "--port", "0", "--env-file", str(tmp_path / "none")],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        def ready():
            assert process.poll() is None, log.read_text()
            return re.search(r"open http://127\.0\.0\.1:(\d+)/", log.read_text())
        base = f"http://127.0.0.1:{poll(ready, what='the demo to start').group(1)}"
        assert "Listening on 127.0.0.1 only" in log.read_text()

        def backends_up():
            code, body = get(base + "/healthz")
            return code == 200 and ujson.loads(body)["backends_up"] == 2
        poll(backends_up, what="both simulated backends")

        code, page = get(base + "/")
        assert code == 200 and page == (ROOT / "static" / "index.html").read_bytes()
        code, aliases = get(base + "/workflow-list")
        assert code == 200 and "invert" in ujson.loads(aliases)
        code, docs = get(base + "/docs")
        assert code == 200 and b"docs/assets/swagger-ui-bundle.js" in docs
        code, bundle = get(base + "/docs/assets/swagger-ui-bundle.js")
        assert code == 200 and len(bundle) > 100_000
        code, document = get(base + "/openapi.json")
        assert code == 200 and ujson.loads(document)["info"]["version"] == __version__

        # A job on an installed workflow file.
        code, body = post_json(base + "/generate-based-workflow?clientId=pkg-1",
                               {"workflow": "blank-image", "1/width": 32, "1/height": 8})
        assert code == 200, body

        def finished():
            code, body = get(base + "/execution-info?clientId=pkg-1")
            return code == 200 and ujson.loads(body)["status"] == "closed"
        poll(finished, what="the job to finish")
        code, results = get(base + "/history?clientId=pkg-1")
        assert code == 200 and b"\x89PNG" in results
        # The demo's data went under the current folder, not into site-packages.
        assert (work / "data" / "demo" / "jobs.sqlite3").is_file()
    finally:
        stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]


# --------------------------------------------------------------------- metadata, no install

def requirement_pins(path: Path) -> list[str]:
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            pins.append(line)
    return pins


def test_pyproject_pins_what_requirements_txt_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(project["project"]["dependencies"]) == sorted(requirement_pins(ROOT / "requirements.txt"))
    assert all("==" in pin for pin in project["project"]["dependencies"])
    # The build backend pinned in pyproject.toml is the one the dev requirements install.
    [setuptools] = project["build-system"]["requires"]
    assert setuptools in requirement_pins(ROOT / "requirements-dev.txt")


def test_pyproject_lists_every_module_package_and_data_file_of_the_repository():
    """A module added later (a top-level .py, a sub-package) must be added to pyproject.toml too."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = {path.stem for path in ROOT.glob("*.py")}
    assert top_level == set(tool["py-modules"])
    not_installed = {"tests", "bench", "clients"}  # run from a checkout only
    tops = [top for top in ROOT.iterdir() if (top / "__init__.py").is_file() and top.name not in not_installed]
    packages = {str(path.parent.relative_to(ROOT)).replace("/", ".") for top in tops for path in top.rglob("__init__.py")}
    assert packages == {name for name in tool["packages"] if not name.startswith("comfy_bridge_data.")} | {
        "comfy_bridge_data"}
    for package in packages:  # files other than code that a package reads at run time
        data = {path.name for path in (ROOT / package.replace(".", "/")).iterdir()
                if path.is_file() and path.suffix not in (".py", ".pyc")}
        assert data <= set(tool.get("package-data", {}).get(package, [])), (package, data)


def test_one_version_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "comfy_bridge_version.__version__"}
    assert project["project"]["scripts"] == {"comfy-bridge": "bridge:main"}
    assert project["project"]["license"] == "MIT"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    result = subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--version"], capture_output=True,
                            text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"bridge.py {__version__}"
