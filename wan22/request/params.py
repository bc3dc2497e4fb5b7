"""Generation parameters with upstream Wan2.2 I2V-A14B defaults (from wan22.request.spec), validated before any heavy work."""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Mapping, Tuple

from . import spec
from .errors import InvalidParameter
from .spec import MAX_SEED, parse_size

SOLVERS = spec.SPEC["sample_solver"].choices
GUIDE_SCALE = ("guide_scale_low", "guide_scale_high")  # one field, guide_scale, ordered as upstream's pair
# the parameters that feed GenerationParams (wan22.request.spec), each a field of the same name but the guide scales
_FIELDS = tuple(name for name in spec.fed("generation") if name not in GUIDE_SCALE)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """What one image-to-video run needs besides the image and the prompts (defaults: wan22.request.spec).

    guide_scale is ordered (low_noise, high_noise) as upstream's `sample_guide_scale`.
    """

    size: str = spec.default("size")
    frame_num: int = spec.default("frame_num")
    sample_steps: int = spec.default("sample_steps")
    guide_scale: Tuple[float, float] = (spec.default("guide_scale_low"), spec.default("guide_scale_high"))
    sample_shift: float = spec.default("sample_shift")
    sample_solver: str = spec.default("sample_solver")
    seed: int = spec.default("seed")
    boundary: float = spec.default("boundary")
    segments: int = spec.default("segments")
    color_match: bool = spec.default("color_match")
    motion_steps: int = spec.default("motion_steps")
    motion_guide_scale: float = spec.default("motion_guide_scale")
    fps: int = spec.default("fps")

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "GenerationParams":
        """From canonical parameter values (wan22.request.spec names); missing ones keep their defaults."""
        guide = tuple(values.get(name, spec.default(name)) for name in GUIDE_SCALE)
        return cls(guide_scale=guide, **{k: values[k] for k in _FIELDS if k in values})

    def validated(self) -> "GenerationParams":
        """Return a copy with every field checked by the spec; raise InvalidParameter listing every bad one."""
        if not isinstance(self.guide_scale, (tuple, list)) or len(self.guide_scale) != 2:
            raise InvalidParameter("guide_scale", "must be a pair (low_noise, high_noise) of numbers")
        given = {name: getattr(self, name) for name in _FIELDS}
        given.update(zip(GUIDE_SCALE, self.guide_scale))
        checked, problems = {}, []
        for name, value in given.items():
            try:
                checked[name] = spec.check(name, value)
            except InvalidParameter as exc:
                problems += exc.problems
        if not problems:
            problems = (spec.video_frames_problems(checked["frame_num"], checked["segments"])
                        + spec.motion_steps_problems(checked["motion_steps"], checked["sample_steps"]))
        if problems:
            raise InvalidParameter.from_problems(problems)
        return GenerationParams.from_values(checked)

    def with_resolved_seed(self) -> "GenerationParams":
        """seed=-1 means random, as upstream; the returned copy carries the seed actually used."""
        if self.seed >= 0:
            return self
        return dataclasses.replace(self, seed=random.randint(0, MAX_SEED))

    @property
    def video_frames(self) -> int:
        """The frames of the whole video, its segments joined."""
        return spec.video_frames(self.frame_num, self.segments)

    @property
    def max_area(self) -> int:
        width, height = parse_size(self.size)
        return width * height


spec.require_fields(GenerationParams, _FIELDS, own=("guide_scale",))


def image_size_for_area(image_height: int, image_width: int, max_area: int, stride: int = 8, patch: int = 2) -> Tuple[int, int, int, int]:
    """Upstream's max-area resize (wan/image2video.py): returns (lat_h, lat_w, pixel_h, pixel_w)."""
    import numpy as np

    aspect_ratio = image_height / image_width
    lat_h = round(np.sqrt(max_area * aspect_ratio) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InvalidParameter("size", f"area {max_area} gives less than 16 pixels on a side for a {image_width}x{image_height} image")
    return lat_h, lat_w, lat_h * stride, lat_w * stride
