"""Generation parameters with upstream Wan2.2 I2V-A14B defaults, validated before any heavy work."""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Tuple

from .errors import InvalidParameter

# wan/configs/shared_config.py: sample_neg_prompt
UPSTREAM_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SOLVERS = ("unipc", "dpm++")
UPSTREAM_SIZES = ("720*1280", "1280*720", "480*832", "832*480")
MAX_SEED = 2**63 - 1
MAX_FRAMES = 1001
MAX_STEPS = 1000
MAX_AREA = 1920 * 1088
MAX_GUIDE = 100.0
MAX_SHIFT = 100.0
MAX_FPS = 120


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """What one image-to-video run needs besides the image and the prompts.

    guide_scale is ordered (low_noise, high_noise) as upstream's `sample_guide_scale`.
    """

    size: str = "1280*720"
    frame_num: int = 81
    sample_steps: int = 40
    guide_scale: Tuple[float, float] = (3.5, 3.5)
    sample_shift: float = 5.0
    sample_solver: str = "unipc"
    seed: int = -1
    boundary: float = 0.900
    fps: int = 16

    def validated(self) -> "GenerationParams":
        """Return a copy with every field checked; raise InvalidParameter naming the first bad one."""
        parse_size(self.size)
        _check_int("frame_num", self.frame_num, 1, MAX_FRAMES)
        if (self.frame_num - 1) % 4:
            raise InvalidParameter("frame_num", self.frame_num, "4n+1 (e.g. 5, 33, 49, 81)")
        _check_int("sample_steps", self.sample_steps, 1, MAX_STEPS)
        if not isinstance(self.guide_scale, (tuple, list)) or len(self.guide_scale) != 2:
            raise InvalidParameter("guide_scale", self.guide_scale, "a pair (low_noise, high_noise) of numbers >= 0")
        for name, value in zip(("guide_scale_low", "guide_scale_high"), self.guide_scale):
            _check_float(name, value, 0.0, MAX_GUIDE)
        _check_float("sample_shift", self.sample_shift, 0.0, MAX_SHIFT)
        if self.sample_solver not in SOLVERS:
            raise InvalidParameter("sample_solver", self.sample_solver, " or ".join(SOLVERS))
        _check_int("seed", self.seed, -1, MAX_SEED)
        _check_float("boundary", self.boundary, 0.0, 1.0)
        _check_int("fps", self.fps, 1, MAX_FPS)
        return dataclasses.replace(self, guide_scale=(float(self.guide_scale[0]), float(self.guide_scale[1])))

    def with_resolved_seed(self) -> "GenerationParams":
        """seed=-1 means random, as upstream; the returned copy carries the seed actually used."""
        if self.seed >= 0:
            return self
        return dataclasses.replace(self, seed=random.randint(0, MAX_SEED))

    @property
    def max_area(self) -> int:
        width, height = parse_size(self.size)
        return width * height


def parse_size(size: str) -> Tuple[int, int]:
    """'1280*720' -> (1280, 720). For I2V it is an area; the image gives the aspect ratio."""
    match = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", str(size))
    allowed = "'W*H' with W and H multiples of 16, area at most 1920*1088 (upstream sizes: " + ", ".join(UPSTREAM_SIZES) + ")"
    if not match:
        raise InvalidParameter("size", size, allowed)
    width, height = int(match.group(1)), int(match.group(2))
    if width < 16 or height < 16 or width % 16 or height % 16 or width * height > MAX_AREA:
        raise InvalidParameter("size", size, allowed)
    return width, height


def _check_int(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameter(field, value, f"an integer from {low} to {high}")


def _check_float(field: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise InvalidParameter(field, value, f"a number from {low:g} to {high:g}")


def image_size_for_area(image_height: int, image_width: int, max_area: int, stride: int = 8, patch: int = 2) -> Tuple[int, int, int, int]:
    """Upstream's max-area resize (wan/image2video.py): returns (lat_h, lat_w, pixel_h, pixel_w)."""
    import numpy as np

    aspect_ratio = image_height / image_width
    lat_h = round(np.sqrt(max_area * aspect_ratio) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InvalidParameter("size", f"area {max_area} for a {image_width}x{image_height} image", "an area giving at least 16 pixels on each side")
    return lat_h, lat_w, lat_h * stride, lat_w * stride
