"""Image input for scripted runs and MP4 output into ComfyUI's output folder."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from ..wan22.request import spec
from ..wan22.request.intake import read_image
from ..wan22.request.settings import Limits
from ..wan22.video import write_mp4
from . import comfy_bridge
from .model_nodes import CATEGORY
from .spec_inputs import node_inputs, spec_validator


def _exactly_one_image(values):
    given = [name for name, value in values.items() if value and value.strip()]
    if len(given) != 1:
        return [("image", f"give exactly one of image_url, image_base64, image_path (got {', '.join(given) or 'none'})")]
    return []


class Wan22LoadImage:
    """The seed's reference_image_url | reference_image_base64 | reference_image_path, with the request limits."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": node_inputs(spec.LOAD_IMAGE)}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    VALIDATE_INPUTS = spec_validator(spec.LOAD_IMAGE, also=_exactly_one_image)

    @classmethod
    def IS_CHANGED(cls, image_url="", image_base64="", image_path=""):
        if image_path.strip() and os.path.exists(image_path.strip()):
            return os.path.getmtime(image_path.strip())
        return hashlib.sha256((image_url + "\n" + image_base64).encode()).hexdigest()

    def load(self, **sources):
        problems = _exactly_one_image(sources)
        if problems:
            raise ValueError(f"{problems[0][0]}: {problems[0][1]}")
        [(name, value)] = [(n, v.strip()) for n, v in sources.items() if v and v.strip()]
        limits = Limits.from_env().with_roots(comfy_bridge.input_roots())
        checked = read_image(name.split("_", 1)[1], value, name, limits)
        picture = np.asarray(checked.picture, dtype=np.float32) / 255.0
        return (torch.from_numpy(picture)[None],)


class Wan22SaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames to encode, e.g. the sampler's output."}),
                **node_inputs(spec.SAVE),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "H.264 MP4 (yuv420p) into ComfyUI's output folder, written to a temporary file and renamed when complete."
    VALIDATE_INPUTS = spec_validator(spec.SAVE)

    def save(self, images, filename_prefix, fps):
        frames = (images.clamp(0, 1) * 255.0).round().to(torch.uint8)
        height, width = frames.shape[1:3]
        folder, filename, counter, subfolder, _ = comfy_bridge.save_path(filename_prefix, width, height)
        name = f"{filename}_{counter:05}_.mp4"
        path = write_mp4(frames, os.path.join(folder, name), fps=fps)
        entry = {"filename": name, "subfolder": subfolder, "type": "output", "format": "video/h264-mp4", "frame_rate": fps}
        return {"ui": {"images": [entry], "animated": (True,)}, "result": (str(path),)}
