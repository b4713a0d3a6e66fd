"""The documentation as a new user meets it in a fresh clone.

- Every Markdown link in the repository's .md files resolves inside a clone: a relative link
  names a file or folder that a clone has (git's tracked files, plus new ones not ignored), never
  a place outside the repository, and a `#anchor` names a heading of its target. Web links
  (http, https, mailto) are not followed.
- What the README's and the scripts' examples write lands in a folder git ignores.
- The quick start's client command works as written and saves the result image as a file.
- Client commands in the docs use the venv's Python (the system's lacks the packages).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from .conftest import ROOT
from .test_clients import assert_inverted, run

WEB = ("http://", "https://", "mailto:")
LINK = re.compile(r"(?<!\!)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?")


def clone_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=30).stdout.decode()
    return {name for name in listed.split("\0") if name and (ROOT / name).is_file()}


@pytest.fixture(scope="module")
def files() -> set[str]:
    return clone_files()


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def prose_lines(path: Path) -> list[str]:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.S | re.M).splitlines()


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return LINK.findall(text) + IMAGE.findall(text)


def check_link(source: str, target: str, files: set[str]) -> str | None:
    """None when `target` (a link in the file `source`) resolves inside the clone, else why not."""
    if target.startswith(WEB):
        return None
    target, _, anchor = target.partition("#")
    if not target:
        resolved = source
    else:
        if target.startswith("/"):
            return "an absolute path: use one relative to the file"
        path = (ROOT / source).parent / unquote(target)
        try:
            resolved = path.resolve().relative_to(ROOT.resolve()).as_posix()
        except ValueError:
            return "points outside the repository"
        is_dir = any(name.startswith(resolved.rstrip("/") + "/") for name in files)
        if resolved not in files and not is_dir:
            return "no such file in a clone"
        if is_dir:
            return None if not anchor else "an anchor on a folder"
    if anchor and resolved.endswith(".md") and anchor not in anchors(ROOT / resolved):
        return f"no heading '#{anchor}' in {resolved}"
    return None


def test_every_link_in_the_docs_resolves_inside_a_clone(files):
    documents = sorted(name for name in files if name.endswith(".md"))
    assert {"README.md", "docs/API.md", "docs/OPERATIONS.md", "docs/ARCHITECTURE.md"} <= set(documents)
    broken, count = [], 0
    for name in documents:
        for target in links(ROOT / name):
            count += 1
            reason = check_link(name, target, files)
            if reason:
                broken.append(f"{name}: ({target}) {reason}")
    assert not broken, "\n".join(broken)
    assert count >= 30  # the parser finds the links at all


def test_the_link_check_catches_what_a_clone_lacks(files):
    assert check_link("README.md", "../shared/API.md", files) == "points outside the repository"
    assert check_link("README.md", "docs/NOPE.md", files) == "no such file in a clone"
    assert check_link("README.md", "docs/API.md#no-such-heading", files).startswith("no heading")
    assert check_link("README.md", "docs/API.md#post-upload", files) is None
    assert check_link("docs/API.md", "../README.md#monitoring", files) is None
    assert check_link("docs/API.md", "#get-docs", files) is None
    assert check_link("docs/OPERATIONS.md", "../deploy", files) is None
    assert check_link("README.md", "https://example.org/x", files) is None
    assert links_in("see [x](a.md) and `[y](b.md)` and ![i](c.png)") == ["a.md", "c.png"]
    assert slug("POST /generate-based-workflow") == "post-generate-based-workflow"
    assert slug("nginx: TLS and the websocket") == "nginx-tls-and-the-websocket"
    assert slug("Backups of DATA_DIR") == "backups-of-data_dir"


def links_in(text: str) -> list[str]:
    text = prose(text)
    return LINK.findall(text) + IMAGE.findall(text)


def test_docs_point_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "(docs/API.md)" in readme and "(docs/OPERATIONS.md)" in readme
    assert "(docs/ARCHITECTURE.md)" in readme and "(LICENSE)" in readme


# ------------------------------------------------------------ where the examples write

def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, timeout=30).returncode == 0


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def written_paths(block: str) -> list[str]:
    """Files or folders a shell example writes: curl -o/--output, --out, history.sh's OUTPUT."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0]
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for i, word in enumerate(words[:-1]):
            if word in ("-o", "--output", "--out"):
                found.append(words[i + 1])
        if words[:1] == ["scripts/history.sh"] and len(words) >= 3:
            found.append(words[2])
    return found


def test_the_examples_write_into_an_ignored_folder():
    assert ignored("out/result.multipart") and ignored("out/bridge_invert_00001_.png")
    assert ignored("results/x.png") and ignored("data/demo/jobs.sqlite3")
    assert not ignored("docs/API.md")
    written = []
    for name in ("README.md", "docs/API.md", "scripts/README.md", "clients/README.md"):
        for block in code_blocks(ROOT / name):
            written += [(name, path) for path in written_paths(block)]
    assert ("README.md", "out/result.multipart") in written
    not_ignored = [(name, path) for name, path in written if not path.startswith("/") and not ignored(path)]
    assert not not_ignored, not_ignored
    # The defaults of what writes without being told where: the clients and history.sh.
    assert 'DEFAULT_OUT = "out"' in (ROOT / "clients" / "bridge_client.py").read_text()
    assert "out=${2:-out/history-$1.multipart}" in (ROOT / "scripts" / "history.sh").read_text()


def test_client_commands_in_the_docs_use_the_venv_python():
    for name in ("README.md", "clients/README.md", "scripts/README.md", "docs/API.md", "scripts/ws.sh"):
        text = (ROOT / name).read_text()
        bare = re.findall(r"(?m)^\s*python3? clients/", text) + re.findall(r"(?<!run )(?<![/\w.])python3? clients/", text)
        assert not bare, f"{name}: {bare} (use .venv/bin/python)"
    assert ".venv/bin/python clients/ws_example.py" in (ROOT / "clients" / "README.md").read_text()


def quick_start_client_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [line] = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
              for line in block.splitlines() if line.startswith(".venv/bin/python clients/")]
    return shlex.split(line.split(" #", 1)[0])


async def test_the_quick_start_client_command_saves_the_image(bridge, tmp_path):
    command = quick_start_client_command()
    assert command[:2] == [".venv/bin/python", "clients/ws_example.py"]
    # Run as written from a folder laid out like the clone (so out/ lands in tmp_path).
    (tmp_path / "clients").symlink_to(ROOT / "clients")
    (tmp_path / "workflows").symlink_to(ROOT / "workflows")
    code, out, err = await run(sys.executable, *command[1:], "--server", bridge.url, cwd=tmp_path)
    assert code == 0, (out, err)
    saved = re.findall(r"^saved (\S+)$", out, flags=re.M)
    assert saved and all(path.startswith("out/") and path.endswith(".png") for path in saved), out
    assert_inverted(tmp_path / saved[0], (ROOT / "workflows" / "example.png").read_bytes())
