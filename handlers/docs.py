"""GET /docs: the interactive API reference, Swagger UI on the bridge's own /openapi.json.

Swagger UI's files come from the package swagger-ui-py and are served by the bridge itself at
/docs/assets/ (a fixed list of files); the page starts it with /static/docs.js. Nothing is
loaded from another host, and the page's Content-Security-Policy says so to the browser.

/docs is behind the API key like /openapi.json. A browser cannot send a header when it opens a
page, so /docs also takes the key as `?token=<key>` (as /ws does); docs.js then drops it from
the address bar and sends it as `Authorization: Bearer` on the page's own requests. A browser
without the key gets the 401 as a small page with a form asking for it; other clients get
the usual JSON. The assets need no key: they are Swagger UI's, nothing of this bridge's.
"""
from __future__ import annotations

import html
import importlib.util
from pathlib import Path

from comfy_bridge_version import __version__

from .base import ApiError, JsonHandler
from .server import PageHandler

# The files the page uses, out of the ~30 swagger-ui-py ships (editor bundles, source maps...).
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png", "LICENSE")
# Everything from this origin; inline styles only because Swagger UI sets some. URLs in the pages
# are relative to /docs, so they also work under a proxy's path prefix.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
MISSING = "the API reference needs the package swagger-ui-py (pip install -r requirements.txt)"

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ComfyUI bridge {__version__}: API reference</title>
<link rel="icon" type="image/png" sizes="32x32" href="docs/assets/favicon-32x32.png">
<link rel="icon" type="image/png" sizes="16x16" href="docs/assets/favicon-16x16.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<noscript>The API reference needs JavaScript. The same description is at /openapi.json.</noscript>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="static/docs.js"></script>
</body>
</html>
"""

KEY_FORM = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ComfyUI bridge: API key needed</title>
<link rel="icon" type="image/png" sizes="32x32" href="docs/assets/favicon-32x32.png">
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; padding: 0 1rem; }}
input {{ font: inherit; width: 100%; box-sizing: border-box; padding: .4rem; margin: .3rem 0 .8rem; }}
button {{ font: inherit; padding: .4rem 1rem; }}
</style>
</head>
<body>
<h1>API key needed</h1>
<p id="reason">{reason}</p>
<form method="get" action="docs">
<label for="token">API key</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Open the API reference</button>
</form>
</body>
</html>
"""


def swagger_ui_dir() -> Path | None:
    """swagger-ui-py's folder of Swagger UI files, found without importing the package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in ASSETS) else None


class DocsHandler(JsonHandler):
    buffers_body = False  # GET only: a body, if any, is not kept

    def initialize(self, assets: Path | None) -> None:
        self.assets = assets

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            self.check_access(self.get_query_argument("token", None))

    def get(self) -> None:
        if self.assets is None:
            raise ApiError(503, MISSING)
        self._page_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)

    def _page_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if status_code != 401 or "text/html" not in self.request.headers.get("Accept", ""):
            return super().write_error(status_code, **kwargs)
        for name, value in getattr(exc, "headers", {}).items():
            self.set_header(name, value)
        wrong = self.get_query_argument("token", None) is not None
        reason = ("That key was not accepted; try again." if wrong else
                  "This bridge asks for an API key (BRIDGE_API_KEY) for its API reference.")
        self._page_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(KEY_FORM.format(reason=html.escape(reason)))


class DocsAssetHandler(PageHandler):
    """Only the files in ASSETS; anything else is a JSON 404, like the test page's files."""

    def initialize(self, path: str | None, **kwargs) -> None:
        super().initialize(path=path or "", **kwargs)
        self.missing = path is None

    async def get(self, path: str, include_body: bool = True) -> None:
        if self.missing or path not in ASSETS:
            self.send_error(404)
            return
        await super().get(path, include_body)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")  # revalidated (ETag): new files after an upgrade
        self.set_header("X-Content-Type-Options", "nosniff")


def routes() -> list:
    assets = swagger_ui_dir()
    return [
        (r"/docs", DocsHandler, {"assets": assets}),
        (r"/docs/assets/(.*)", DocsAssetHandler, {"path": str(assets) if assets else None}),
    ]
