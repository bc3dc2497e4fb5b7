"""Worker settings, read from the environment once per job (so tests and operators can change them).

Every variable is documented in docs/runpod.md; `.runpod/hub.json` lists the same names.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Tuple

VOLUME = "/runpod-volume"


def _int(name: str, default: int, low: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    return max(low, value)


def _float(name: str, default: float, low: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    return max(low, value)


def env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


def default_output_dir() -> Path:
    """`$WAN_OUTPUT_DIR`, else `/runpod-volume/outputs` when a network volume is mounted, else `/workspace/outputs`.

    On serverless `/workspace` is local to one worker: only a shared volume lets any worker answer `status`.
    """
    explicit = os.environ.get("WAN_OUTPUT_DIR", "").strip()
    if explicit:
        return Path(explicit)
    if os.path.isdir(VOLUME):
        return Path(VOLUME) / "outputs"
    return Path("/workspace/outputs")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    output_dir: Path
    input_roots: Tuple[str, ...]
    max_inline_bytes: int
    job_timeout_s: float
    max_image_bytes: int
    max_image_pixels: int
    url_timeout_s: float
    url_max_redirects: int
    url_allow_hosts: Tuple[str, ...]
    max_prompt_chars: int
    max_workflow_images: int
    bucket_endpoint_url: Optional[str]
    bucket_name: Optional[str]

    @classmethod
    def from_env(cls) -> "WorkerConfig":
        roots = os.environ.get("WAN_INPUT_ROOTS", f"/workspace:{VOLUME}")
        inline_mb = _float("WAN_MAX_INLINE_MB", 15.0)
        allow = os.environ.get("WAN_URL_ALLOW_HOSTS", "")
        return cls(
            output_dir=default_output_dir(),
            input_roots=tuple(r for r in roots.split(":") if r.strip()),
            max_inline_bytes=int(inline_mb * 1024 * 1024),
            job_timeout_s=_float("WAN_JOB_TIMEOUT_S", 1800.0),
            max_image_bytes=int(_float("WAN_MAX_IMAGE_MB", 20.0) * 1024 * 1024),
            max_image_pixels=_int("WAN_MAX_IMAGE_PIXELS", 40_000_000, low=1),
            url_timeout_s=_float("WAN_URL_TIMEOUT_S", 30.0, low=0.1),
            url_max_redirects=_int("WAN_URL_MAX_REDIRECTS", 5),
            url_allow_hosts=tuple(h.strip().lower() for h in allow.split(",") if h.strip()),
            max_prompt_chars=_int("WAN_MAX_PROMPT_CHARS", 5000, low=1),
            max_workflow_images=_int("WAN_MAX_WORKFLOW_IMAGES", 16, low=0),
            bucket_endpoint_url=os.environ.get("BUCKET_ENDPOINT_URL") or None,
            bucket_name=os.environ.get("BUCKET_NAME") or None,
        )


def max_concurrency() -> int:
    """`RUNPOD_MAX_CONCURRENCY` (default 1): jobs this worker takes at once (ComfyUI runs them in turn)."""
    return _int("RUNPOD_MAX_CONCURRENCY", 1, low=1)
