"""The image-to-video sampler node (ComfyUI IMAGE in, frames and the seed used out) and the node that extends a
video by one clip (frames in, the longer video out)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..wan22.request import spec
from ..wan22.request.errors import InvalidParameter
from ..wan22.request.params import GenerationParams
from . import comfy_bridge
from .model_nodes import CATEGORY
from .spec_inputs import node_inputs, spec_validator
from .warm_models import WARM


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """First image of a ComfyUI IMAGE batch [B, H, W, C] in [0, 1]."""
    array = (image[0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


def _across(rule, *names):
    """A rule across inputs (a spec function of their values, returning problems), checked once every one of them
    is a widget: a linked input is None when ComfyUI validates."""
    def problems(values):
        if any(values.get(name) is None for name in names):
            return []
        return rule(*(values[name] for name in names))
    return problems


_motion_steps_problems = _across(spec.motion_steps_problems, "motion_steps", "sample_steps")
_video_frames_problems = _across(spec.video_frames_problems, "frame_num", "segments")


def _sampler_problems(values):
    return _video_frames_problems(values) + _motion_steps_problems(values)


def _inputs(node: str, source: str, tooltip: str) -> dict:
    """A sampling node's inputs: the model, the text, its `source` IMAGE, its spec inputs and optional images."""
    return {"required": {"model": ("WAN22_MODEL",), "text": ("WAN22_TEXT",), source: ("IMAGE", {"tooltip": tooltip}),
                         **node_inputs(node)},
            "optional": {name: ("IMAGE", {"tooltip": tip}) for name, tip in spec.OPTIONAL_IMAGES[node]}}


class Wan22ImageToVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return _inputs(spec.I2V, "image", "The first frame; only its aspect ratio is kept (max-area resize, as upstream).")

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("frames", "seed")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    DESCRIPTION = "Wan2.2 I2V-A14B sampling with both experts, exactly as upstream generate.py."
    VALIDATE_INPUTS = spec_validator(spec.I2V, also=_sampler_problems)

    @classmethod
    def IS_CHANGED(cls, seed=None, **_):
        # seed -1 draws a new one each run: never reuse a cached result
        return float("nan") if seed == -1 else seed

    def sample(self, model, text, image, last_image=None, **values):
        params = GenerationParams.from_values(values)
        comfy_bridge.make_room()
        result = model.generate(tensor_to_pil(image), text, params,
                                on_step=comfy_bridge.progress_reporter(params.sample_steps * params.segments),
                                should_cancel=comfy_bridge.raise_if_interrupted,
                                last_image=None if last_image is None else tensor_to_pil(last_image))
        return _answer(result)


class Wan22ExtendVideo:
    """One more clip from a video's last frame, joined once, colours matched to its first clip: chain it after the
    sampler, or after another extend node, each with its own prompt (docs/long_video.md)."""

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs(spec.EXTEND_VIDEO, "frames", "The video so far (the sampler's frames, or another extend node's).")

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("frames", "seed")
    CATEGORY = CATEGORY
    FUNCTION = "extend"
    DESCRIPTION = "Extends a Wan2.2 video by one clip of frame_num frames, from its last frame."
    VALIDATE_INPUTS = spec_validator(spec.EXTEND_VIDEO, also=_motion_steps_problems)
    IS_CHANGED = Wan22ImageToVideo.IS_CHANGED

    def extend(self, model, text, frames, last_image=None, **values):
        params = GenerationParams.from_values(values)
        if isinstance(text, list):
            if len(text) != 1:
                raise InvalidParameter("segment_prompts", f"this node adds one clip: give its text encoder one prompt, "
                                                          f"not {len(text)}")
            text = text[0]
        comfy_bridge.make_room()
        video = frames[..., :3].clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu()
        result = model.extend(video, text, params, on_step=comfy_bridge.progress_reporter(params.sample_steps),
                              should_cancel=comfy_bridge.raise_if_interrupted,
                              last_image=None if last_image is None else tensor_to_pil(last_image))
        return _answer(result)


def _answer(result) -> dict:
    """The node's outputs (frames as a float IMAGE, the seed) and its `wan22` ui entry."""
    frames = result.frames.float().div(255.0)
    info = {"seed": result.seed, "frames": result.num_frames, "width": result.width, "height": result.height,
            "model_loads": WARM.loads, "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "memory": result.plan, "loras": result.loras, "kernels": result.kernels, "segments": result.segments}
    return {"ui": {"wan22": [info]}, "result": (frames, result.seed)}

