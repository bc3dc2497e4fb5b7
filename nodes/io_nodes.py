"""Image input for scripted runs and MP4 output into ComfyUI's output folder."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import numpy as np
import torch
from PIL import Image

from ..wan22.params import MAX_FPS, GenerationParams
from ..wan22.video import write_mp4
from . import comfy_bridge
from .model_nodes import CATEGORY


class Wan22LoadImage:
    """The seed's reference_image_url | reference_image_base64 | reference_image_path, with the worker's limits."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_url": ("STRING", {"default": "", "tooltip": "http(s) URL of the image (size, time and redirects bounded)."}),
                "image_base64": ("STRING", {"default": "", "multiline": True, "tooltip": "The image as base64 or a data: URI (size bounded)."}),
                "image_path": ("STRING", {"default": "", "tooltip": "Absolute path under WAN_INPUT_ROOTS (default /workspace:/runpod-volume) or ComfyUI's input folder."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, image_url="", image_base64="", image_path=""):
        given = [name for name, value in (("image_url", image_url), ("image_base64", image_base64), ("image_path", image_path)) if value and value.strip()]
        if len(given) != 1:
            return f"give exactly one of image_url, image_base64, image_path (got {', '.join(given) or 'none'})"
        return True

    @classmethod
    def IS_CHANGED(cls, image_url="", image_base64="", image_path=""):
        if image_path.strip() and os.path.exists(image_path.strip()):
            return os.path.getmtime(image_path.strip())
        return hashlib.sha256((image_url + "\n" + image_base64).encode()).hexdigest()

    def load(self, image_url, image_base64, image_path):
        from ..runpod_worker.images import load_reference_image
        from ..runpod_worker.config import WorkerConfig
        from ..runpod_worker.errors import RequestError

        config = WorkerConfig.from_env()
        config = dataclasses.replace(config, input_roots=tuple(comfy_bridge.input_roots()))
        for kind, field, value in (("url", "image_url", image_url), ("base64", "image_base64", image_base64), ("path", "image_path", image_path)):
            if value.strip():
                try:
                    checked = load_reference_image(kind, value.strip(), field, config)
                except RequestError as exc:
                    raise ValueError(exc.message) from None
                picture = Image.open(io.BytesIO(checked.png)).convert("RGB")
                return (torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None],)
        raise ValueError("give exactly one of image_url, image_base64, image_path")


class Wan22SaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames to encode, e.g. the sampler's output."}),
                "filename_prefix": ("STRING", {"default": "Wan22/i2v", "tooltip": "Under ComfyUI's output folder; %width% and %height% are replaced."}),
                "fps": ("INT", {"default": GenerationParams.fps, "min": 1, "max": MAX_FPS, "tooltip": "Frames per second (Wan2.2: 16)."}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "H.264 MP4 (yuv420p) into ComfyUI's output folder, written to a temporary file and renamed when complete."

    def save(self, images, filename_prefix, fps):
        frames = (images.clamp(0, 1) * 255.0).round().to(torch.uint8)
        height, width = frames.shape[1:3]
        folder, filename, counter, subfolder, _ = comfy_bridge.save_path(filename_prefix, width, height)
        name = f"{filename}_{counter:05}_.mp4"
        path = write_mp4(frames, os.path.join(folder, name), fps=fps)
        entry = {"filename": name, "subfolder": subfolder, "type": "output", "format": "video/h264-mp4", "frame_rate": fps}
        return {"ui": {"images": [entry], "animated": (True,)}, "result": (str(path),)}
