"""The bridge's version, in one place: pyproject.toml, `--version` and /openapi.json read it here."""

__version__ = "1.0.0"
