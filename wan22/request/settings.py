"""Environment settings, each declared once with its default and meaning (no torch, no ComfyUI).

`LIMITS` are read wherever a request is checked (node, CLI, worker), so one limit holds on every surface;
the worker's own settings are declared the same way in ``runpod_worker.config``. The docs tables of both are
generated from these declarations (``python -m scripts.regenerate``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Setting:
    """One environment variable: `kind` is int | float | text | flag | choice | list (`sep`-separated)."""

    name: str
    field: str
    kind: str
    default: Any
    doc: str
    low: Optional[float] = None
    choices: Tuple[str, ...] = ()
    sep: str = ":"
    scale: float = 1  # e.g. MiB -> bytes: the value is stored as int(value * scale)
    shown_default: Optional[str] = None  # for the docs, where the default is computed

    def read(self, environ: Optional[Mapping[str, str]] = None) -> Any:
        raw = (os.environ if environ is None else environ).get(self.name, "").strip()
        if not raw:
            value = self.default
        elif self.kind in ("int", "float"):
            try:
                value = int(raw) if self.kind == "int" else float(raw)
            except ValueError:
                raise ValueError(f"environment variable {self.name}={raw!r} is not {'an integer' if self.kind == 'int' else 'a number'}") from None
            if self.low is not None and value < self.low:
                raise ValueError(f"environment variable {self.name}={raw!r} must be at least {self.low:g}")
        elif self.kind == "flag":
            lowered = raw.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"environment variable {self.name}={raw!r} must be 1/true/yes/on or 0/false/no/off")
            value = lowered in ("1", "true", "yes", "on")
        elif self.kind == "choice":
            if raw.lower() not in self.choices:
                raise ValueError(f"environment variable {self.name}={raw!r} must be one of {', '.join(self.choices)}")
            value = raw.lower()
        elif self.kind == "list":
            value = tuple(part.strip() for part in raw.split(self.sep) if part.strip())
        else:
            value = raw
        if self.scale != 1 and value is not None:
            value = int(value * self.scale)
        return value

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.kind == "list":
            return self.sep.join(self.default) if self.default else "empty"
        if self.kind == "flag":
            return "on" if self.default else "off"
        if self.default is None or self.default == "":
            return "empty"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


MIB = 1024 * 1024

LIMIT_SETTINGS: Tuple[Setting, ...] = (
    Setting("WAN_MAX_PROMPT_CHARS", "max_prompt_chars", "int", 5000, "longest `prompt` / `negative_prompt` in characters (UMT5 reads at most 512 tokens)", low=1),
    Setting("WAN_UNKNOWN_PARAMS", "unknown_params", "choice", "error", "a parameter name that is not in the spec: `error` refuses the request listing the known names, `warn` ignores it with a warning", choices=("error", "warn")),
    Setting("WAN_MAX_IMAGE_MB", "max_image_bytes", "float", 20.0, "largest input image in MiB (URL body, decoded base64, file)", low=0, scale=MIB),
    Setting("WAN_MAX_IMAGE_PIXELS", "max_image_pixels", "int", 40_000_000, "largest input image in pixels, checked before decoding", low=1),
    Setting("WAN_URL_TIMEOUT_S", "url_timeout_s", "float", 30.0, "whole-download limit of an image URL (connect, redirects and body)", low=0.1),
    Setting("WAN_URL_MAX_REDIRECTS", "url_max_redirects", "int", 5, "redirects followed for an image URL; each target is checked like the first", low=0),
    Setting("WAN_URL_ALLOW_HOSTS", "url_allow_hosts", "list", (), "comma-separated `host` or `host:port` that an image URL of a node or worker request may resolve to a private address (by default only public addresses are fetched)", sep=","),
    Setting("WAN_MAX_SEGMENTS", "max_segments", "int", 8, "most `segments` of one chained video (each costs a whole clip's generation time; docs/long_video.md)", low=1),
    Setting("WAN_MAX_VIDEO_FRAMES", "max_video_frames", "int", 641, "most frames of a chained video (segments above 1), its segments joined: segments x (frame_num - 1) + 1 (host RAM holds them all: 641 frames of 1280x720 are 1.8 GB, 7 GB as ComfyUI's float IMAGE)", low=1),
    Setting("WAN_INPUT_ROOTS", "input_roots", "list", ("/workspace", "/runpod-volume"), "colon-separated folders an `image_path` of a node or worker request may point into (symlinks and `..` resolved first); the node also allows ComfyUI's input folder"),
)


# The operator's word on memory, read by the engine when it loads and plans (the ComfyUI nodes, the CLI's and the
# worker's ComfyUI): docs/memory.md.
MEMORY_SETTINGS: Tuple[Setting, ...] = (
    Setting("WAN_HOST_EXPERTS", "host_experts", "choice", "auto", "how many experts host RAM holds: `both`, `one` (the other is read back from its file when its turn comes, twice per video) or `auto` (both where they fit in the RAM free when loading, else one, else the loader refuses saying what would fit)", choices=("auto", "both", "one")),
    Setting("WAN_GPU_RESERVE_GIB", "gpu_reserve_gib", "float", None, "GPU memory (GiB) the memory plan leaves free for what torch does not count: CUDA context growth, cuBLAS/cuDNN workspaces, allocator fragmentation", low=0, shown_default="the larger of 2 and 10 % of the free memory"),
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The limits every surface applies to a request (see LIMIT_SETTINGS for their meaning and defaults)."""

    max_prompt_chars: int
    unknown_params: str
    max_image_bytes: int
    max_image_pixels: int
    url_timeout_s: float
    url_max_redirects: int
    url_allow_hosts: Tuple[str, ...]
    max_segments: int
    max_video_frames: int
    input_roots: Tuple[str, ...]

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Limits":
        return cls(**read_settings(LIMIT_SETTINGS, environ))

    @classmethod
    def defaults(cls) -> "Limits":
        return cls.from_env({})

    def with_roots(self, roots: Sequence[str]) -> "Limits":
        return dataclasses.replace(self, input_roots=tuple(roots))


def read_settings(settings: Sequence[Setting], environ: Optional[Mapping[str, str]] = None) -> dict:
    return {s.field: s.read(environ) for s in settings}
