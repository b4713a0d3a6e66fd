"""Version profiles: which ComfyUI the simulator imitates.

A profile is a set of switches read by the handlers, the queue and the executor. The
facts behind each switch (and the ComfyUI version that introduced it) are listed in the
package docstring; the 0.3.64 profile is the one the captures were taken from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import protocol


@dataclass(frozen=True)
class Profile:
    name: str
    comfyui_version: str
    #: how POST /prompt treats a client "prompt_id": "ignored" (always minted by the
    #: server), "any" (kept as str(value), even null -> "None"), "uuid" (must be a
    #: canonical lowercase hyphenated UUID, else 400 invalid_prompt_id; null = minted)
    prompt_ids: str
    #: execution_success is sent and stored in history (with timestamps)
    execution_success: bool
    #: progress_state websocket events
    progress_state: bool
    #: GET /features and the websocket feature_flags handshake (and so binary type 4 previews)
    feature_flags: bool
    #: POST /interrupt {"prompt_id"} only interrupts that prompt; else the body is ignored
    targeted_interrupt: bool
    #: GET /api/jobs, GET /api/jobs/{id}, POST /api/jobs/{id}/cancel, POST /api/jobs/cancel
    jobs_api: bool
    #: sensitive extra_data keys (SENSITIVE_EXTRA_DATA_KEYS): "kept" everywhere, stripped from
    #: "history" only (/queue shows them), or "split" off at submission (never shown anywhere)
    sensitive: str
    #: POST /prompt records extra_data.create_time (ms) and the Comfy-Usage-Source header
    create_time: bool
    #: validation texts for a missing/unknown class_type: "invalid_prompt" or "missing_node_type"
    node_type_errors: str
    #: output cache between prompts: "classic" keeps only what the last prompt used,
    #: "ram_pressure" keeps everything (the simulator bounds it at RAM_CACHE_ENTRIES)
    cache: str
    #: flags advertised by /features and the feature_flags answer (max_upload_size added)
    features: dict = field(default_factory=dict)

    def server_features(self, max_upload_size) -> dict:
        """What GET /features and the websocket feature_flags answer send."""
        out = dict(self.features)
        if "max_upload_size" in out:
            out["max_upload_size"] = max_upload_size
        return out


# The sensitive extra_data keys (API keys of paid API nodes), ComfyUI's SENSITIVE_EXTRA_DATA_KEYS.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

# How many output-cache entries the "ram_pressure" cache keeps before it drops the least
# recently used (ComfyUI evicts under RAM pressure; the simulator has no such pressure).
RAM_CACHE_ENTRIES = 512

# Only the protocol differences are modelled for "legacy": its /system_stats is 0.3.64's.
LEGACY = Profile(
    name="legacy", comfyui_version="0.3.64", prompt_ids="ignored", execution_success=False,
    progress_state=False, feature_flags=False, targeted_interrupt=False, jobs_api=False,
    sensitive="kept", create_time=False, node_type_errors="invalid_prompt", cache="classic")

V0_3_64 = Profile(
    name="0.3.64", comfyui_version="0.3.64", prompt_ids="any", execution_success=True,
    progress_state=True, feature_flags=True, targeted_interrupt=True, jobs_api=False,
    sensitive="history", create_time=False, node_type_errors="invalid_prompt", cache="classic",
    features={"supports_preview_metadata": True, "max_upload_size": protocol.DEFAULT_MAX_UPLOAD_SIZE})

CURRENT = Profile(
    name="current", comfyui_version="0.38.1", prompt_ids="uuid", execution_success=True,
    progress_state=True, feature_flags=True, targeted_interrupt=True, jobs_api=True,
    sensitive="split", create_time=True, node_type_errors="missing_node_type", cache="ram_pressure",
    features={"supports_preview_metadata": True, "supports_model_type_tags": True,
              "max_upload_size": protocol.DEFAULT_MAX_UPLOAD_SIZE,
              "extension": {"manager": {"supports_v4": True}}, "node_replacements": True,
              "assets": False})  # as started with --disable-assets: uploads carry no "asset"

PROFILES = {p.name: p for p in (LEGACY, V0_3_64, CURRENT)}
DEFAULT_PROFILE = CURRENT.name


def resolve(profile: str | Profile | None, legacy: bool = False) -> Profile:
    """The profile for SimulatedComfy(profile=..., legacy=...); legacy=True means "legacy"."""
    if isinstance(profile, Profile):
        chosen = profile
    else:
        name = profile if profile is not None else ("legacy" if legacy else DEFAULT_PROFILE)
        if name not in PROFILES:
            raise ValueError(f"unknown comfysim profile {name!r}; known: {', '.join(PROFILES)}")
        chosen = PROFILES[name]
    if legacy and chosen.name != "legacy":
        raise ValueError(f"legacy=True contradicts profile={chosen.name!r}")
    return chosen
