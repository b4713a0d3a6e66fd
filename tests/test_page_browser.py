"""The test page, and the API reference at /docs, in a real browser: Playwright (async API)
driving Debian's Chromium.

Needs `pip install -r requirements-browser.txt` and `/usr/bin/chromium` (Debian package
`chromium`); never a browser downloaded by `playwright install`. Without them the tests are
skipped locally; under CI (CI=true) they fail instead, so a green CI cannot hide a missing
install step.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import ujson
from PIL import Image

from comfy_bridge_version import __version__

from .conftest import ROOT, png_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
STEP_TIMEOUT = 15_000  # ms, for each wait in the page

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None


def _missing() -> str | None:
    if async_playwright is None:
        return "playwright is not installed (pip install -r requirements-browser.txt)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


@pytest.fixture
async def browser():
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                   headless=True, timeout=30_000)
        try:
            yield browser
        finally:
            await browser.close()


class PageWatch:
    """Collects what the page logs, so uncaught script errors fail the test."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        # Chromium logs every 4xx response as a console error; those are the flow under test.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)


async def new_page(browser, **context_options):
    context = await browser.new_context(**context_options)
    context.set_default_timeout(STEP_TIMEOUT)
    page = await context.new_page()
    return context, page, PageWatch(page)


def field(page, key: str, control: str = "input"):
    return page.locator(f'.field[data-key="{key}"] {control}')


async def no_horizontal_scroll(page) -> bool:
    return await page.evaluate(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")


async def result_image_size(page) -> tuple[int, int]:
    handle = await page.wait_for_function(
        """() => {
            const img = document.querySelector('.result img');
            return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;
        }""")
    return tuple(await handle.json_value())


async def test_page_runs_a_job_with_upload_and_live_progress(browser, sim_factory, bridge_factory):
    sim = await sim_factory(name="sim-a", tick_seconds=0.05)
    running = await bridge_factory([sim])
    context, page, watch = await new_page(browser, viewport={"width": 1100, "height": 900})
    await page.goto(running.url + "/")

    await expect(page.locator("#workflow")).to_be_enabled()
    await page.select_option("#workflow", "slow-progress")
    await expect(field(page, "2/steps")).to_have_value("20")
    await expect(field(page, "2/steps")).to_have_attribute("step", "1")
    assert await page.locator('label[for]').count() >= 3  # every control has a label

    await field(page, "1/image").set_input_files(
        {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(96, 64, seed=7)})
    await expect(page.locator('.field[data-key="1/image"] .hint')).to_contain_text("Uploaded photo.png as")
    await field(page, "2/steps").fill("40")  # 40 ticks of 0.05 s: two seconds of progress

    await page.click("#generate")
    await expect(page.locator("#cancel")).to_be_enabled()
    # The bar moves while the job runs, not only at the end.
    await page.wait_for_function(
        "() => { const p = document.getElementById('progress'); return p.value > 0 && p.value < 100; }",
        polling=20)
    await expect(page.locator("#status")).to_contain_text("Running")

    assert await result_image_size(page) == (96, 64)
    await expect(page.locator("#status")).to_have_text("Done: 1 file.")
    assert await page.locator("#progress").evaluate("p => p.value") == 100
    await expect(page.locator("#error")).to_be_hidden()
    await expect(page.locator(".result figcaption")).to_contain_text("image/png")
    await expect(page.locator("#count")).to_contain_text("1 generation")
    assert sim.executed_prompts, "the job never reached the simulated backend"
    assert await no_horizontal_scroll(page)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    assert watch.errors == []
    await context.close()


async def test_page_at_phone_width(browser, sim, bridge):
    context, page, watch = await new_page(
        browser, viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True)
    await page.goto(bridge.url + "/")
    await page.select_option("#workflow", "blank-image")
    await expect(field(page, "1/width")).to_have_value("512")
    assert await no_horizontal_scroll(page), "horizontal scroll at 375 px before a job"

    await field(page, "1/width").fill("640")
    await field(page, "1/height").fill("200")
    await page.click("#generate")
    assert await result_image_size(page) == (640, 200)
    # A result wider than the screen is scaled down, not scrolled.
    assert await no_horizontal_scroll(page), "horizontal scroll at 375 px with a result shown"
    shown = await page.locator(".result img").evaluate("img => img.getBoundingClientRect().right")
    assert shown <= 375

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    assert watch.errors == []
    await context.close()


async def test_page_shows_errors_plainly(browser, sim, bridge):
    context, page, watch = await new_page(browser)
    await page.goto(bridge.url + "/")
    await page.select_option("#workflow", "blank-image")
    await expect(field(page, "1/width")).to_be_visible()

    # Caught in the page: a fraction for an int input.
    await field(page, "1/width").fill("2.5")
    await page.click("#generate")
    await expect(page.locator("#error")).to_have_text("1/width must be a whole number")

    # Refused by the upload endpoint: not a media file. The bridge's detail is shown as is.
    await page.select_option("#workflow", "invert")
    await field(page, "1/image").set_input_files(
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"this is not an image at all"})
    hint = page.locator('.field[data-key="1/image"] .hint')
    await expect(hint).to_contain_text("Upload failed:")
    await page.click("#generate")
    await expect(page.locator("#error")).to_contain_text("upload of notes.png failed")
    await expect(page.locator("#generate")).to_be_enabled()
    assert "Traceback" not in await page.locator("#error").inner_text()
    assert watch.errors == []
    await context.close()


async def test_page_cancel(browser, sim_factory, bridge_factory):
    sim = await sim_factory(name="sim-a", tick_seconds=0.2)
    running = await bridge_factory([sim])
    context, page, watch = await new_page(browser)
    await page.goto(running.url + "/")
    await page.select_option("#workflow", "slow-progress")
    await field(page, "1/image").set_input_files(
        {"name": "in.png", "mimeType": "image/png", "buffer": png_bytes()})
    await expect(page.locator('.field[data-key="1/image"] .hint')).to_contain_text("Uploaded")
    await field(page, "2/steps").fill("200")
    await page.click("#generate")
    await page.wait_for_function("() => document.getElementById('progress').value > 0", polling=20)
    await page.click("#cancel")
    await expect(page.locator("#status")).to_have_text("Cancelled.")
    await expect(page.locator("#generate")).to_be_enabled()
    await expect(page.locator(".result")).to_have_count(0)
    assert watch.errors == []
    await context.close()


async def test_page_asks_for_the_api_key(browser, sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_key="k")
    context, page, watch = await new_page(browser)
    await page.goto(running.url + "/")

    panel = page.locator("#key-panel")
    await expect(panel).to_be_visible()
    await expect(page.locator("#key-reason")).to_have_text("This bridge asks for an API key.")
    await page.fill("#api-key", "wrong")
    await page.press("#api-key", "Enter")
    await expect(page.locator("#key-reason")).to_contain_text("not accepted")
    await expect(panel).to_be_visible()

    await page.get_by_role("textbox", name="API key").fill("k")
    await page.click("#key-form button")
    await expect(panel).to_be_hidden()
    await page.select_option("#workflow", "invert")
    source = png_bytes(20, 10, seed=3)
    await field(page, "1/image").set_input_files({"name": "in.png", "mimeType": "image/png", "buffer": source})
    await expect(page.locator('.field[data-key="1/image"] .hint')).to_contain_text("Uploaded")
    await page.click("#generate")  # fetches carry the Bearer header, the websocket ?token=
    assert await result_image_size(page) == (20, 10)
    await expect(page.locator("#status")).to_have_text("Done: 1 file.")

    # The result really is the inverted upload.
    data = await page.locator(".result img").evaluate(
        "async img => Array.from(new Uint8Array(await (await fetch(img.src)).arrayBuffer()))")
    result = Image.open(io.BytesIO(bytes(data))).convert("RGB")
    original = Image.open(io.BytesIO(source)).convert("RGB")
    assert result.getpixel((5, 5)) == tuple(255 - c for c in original.getpixel((5, 5)))

    # Remembered: a reload goes straight to the workflows.
    assert await page.evaluate("() => localStorage.getItem('comfy-bridge.api-key')") == "k"
    await page.reload()
    await expect(page.locator("#workflow")).to_be_enabled()
    await expect(panel).to_be_hidden()
    await expect(page.locator("#forget-key")).to_be_visible()
    assert watch.errors == []
    await context.close()


def test_requirements_browser_pins_playwright():
    lines = (ROOT / "requirements-browser.txt").read_text().splitlines()
    assert "-r requirements-dev.txt" in lines
    assert any(line.startswith("playwright==") for line in lines)
    assert Path(ROOT / "static" / "index.html").is_file()


# ----------------------------------------------------------------------- /docs

class RequestLog:
    """Every request the browser makes for the pages of a context (documents, scripts, fetches)."""

    def __init__(self, context):
        self.urls: list[str] = []
        context.on("request", lambda request: self.urls.append(request.url))

    def off_host(self, base: str) -> list[str]:
        origin = urlsplit(base)
        return [url for url in self.urls
                if urlsplit(url).scheme not in ("data", "blob")
                and (urlsplit(url).scheme, urlsplit(url).netloc) != (origin.scheme, origin.netloc)]


def described_operations() -> int:
    document = ujson.loads((ROOT / "handlers" / "openapi.json").read_text())
    # Swagger UI shows the webhooks (events the bridge sends) as operations too.
    items = [*document["paths"].values(), *document.get("webhooks", {}).values()]
    return sum(1 for item in items for method in item
               if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"))


async def test_docs_page_renders_the_reference_with_no_request_to_another_host(browser, sim, bridge_factory):
    running = await bridge_factory([sim], bridge_api_key="docs-key")
    context, page, watch = await new_page(browser, viewport={"width": 1200, "height": 900})
    requests = RequestLog(context)

    # A browser without the key gets the form; the key it sends opens the reference.
    await page.goto(running.url + "/docs")
    await expect(page.locator("h1")).to_have_text("API key needed")
    await page.get_by_label("API key").fill("docs-key")
    await page.get_by_role("button", name="Open the API reference").click()

    await expect(page.locator(".opblock")).to_have_count(described_operations())
    await expect(page.locator(".info .title")).to_contain_text("ComfyUI bridge")
    await expect(page.locator(".info .title .version").first).to_have_text(__version__)
    await expect(page.locator(".info__license")).to_contain_text("MIT")
    assert urlsplit(page.url).query == "", "the key stays in the address bar"
    await expect(page.locator(".errors-wrapper")).to_have_count(0)

    # "Try it out" reaches this bridge with the key, filled in by the page.
    operation = page.locator("#operations-workflows-listWorkflows")
    await operation.locator(".opblock-summary").click()
    await operation.get_by_role("button", name="Try it out").click()
    await operation.get_by_role("button", name="Execute").click()
    live = operation.locator(".live-responses-table tbody .response-col_status")
    await expect(live).to_have_text("200")
    await expect(operation.locator(".live-responses-table tbody .response-col_description")).to_contain_text("invert")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=False)
    assert requests.urls, "no request recorded"
    assert requests.off_host(running.url) == []
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in requests.urls)
    assert any(url.endswith("/openapi.json") for url in requests.urls)
    assert watch.errors == []  # a Content-Security-Policy violation would be logged here
    await context.close()
