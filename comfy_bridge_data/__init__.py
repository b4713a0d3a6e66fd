"""Where the bridge's own data files are: the test page (`static/`) and the example workflows
(`workflows/`).

In a source checkout they are the folders at the top of the repository. `pip install .` puts
them inside this package (pyproject.toml maps `comfy_bridge_data.static` to `static/` and
`comfy_bridge_data.workflows` to `workflows/`), since an installed `bridge.py` sits in
site-packages, where no `static/` folder is beside it.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """The folder `name` ("static" or "workflows"): the installed copy, else the checkout's."""
    installed = resources.files(__package__) / name
    if installed.is_dir():
        return Path(str(installed))
    checkout = CHECKOUT / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"the bridge's '{name}' folder is missing: neither {installed} "
                            f"nor {checkout} exists; reinstall the package")


def static_dir() -> Path:
    return data_dir("static")


def workflows_dir() -> Path:
    return data_dir("workflows")


def is_checkout() -> bool:
    """True when running from a source checkout (its data folders are not inside this package)."""
    return not (resources.files(__package__) / "static").is_dir()
