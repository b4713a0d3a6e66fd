"""Everything that knows ComfyUI's protocol: the per-server client (`Backend`), its transport,
the calls by meaning (`api`), file transfers, answer parsers and a prompt's event watch.
Nothing outside this package builds a ComfyUI request or knows a ComfyUI route."""
from .backend import Backend, BackendStats
from .http import BackendRejected, BackendUnavailable

__all__ = ["Backend", "BackendStats", "BackendRejected", "BackendUnavailable"]
