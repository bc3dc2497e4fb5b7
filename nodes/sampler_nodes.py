"""The image-to-video sampler node: ComfyUI IMAGE in, frames (IMAGE) and the seed used out."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..wan22.errors import InvalidParameter
from ..wan22.params import MAX_FRAMES, MAX_GUIDE, MAX_SEED, MAX_SHIFT, MAX_STEPS, SOLVERS, GenerationParams
from . import comfy_bridge
from .model_nodes import CATEGORY, LoadedModels

DEFAULTS = GenerationParams()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """First image of a ComfyUI IMAGE batch [B, H, W, C] in [0, 1]."""
    array = (image[0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


def params_from_inputs(size, frame_num, sample_steps, guide_scale_low, guide_scale_high, sample_shift, sample_solver, seed, boundary):
    return GenerationParams(size=size, frame_num=frame_num, sample_steps=sample_steps,
                            guide_scale=(guide_scale_low, guide_scale_high), sample_shift=sample_shift,
                            sample_solver=sample_solver, seed=seed, boundary=boundary)


class Wan22ImageToVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WAN22_MODEL",),
                "text": ("WAN22_TEXT",),
                "image": ("IMAGE", {"tooltip": "The first frame; only its aspect ratio is kept (max-area resize, as upstream)."}),
                "size": ("STRING", {"default": DEFAULTS.size, "tooltip": "Target area W*H (upstream: 1280*720, 720*1280, 832*480, 480*832); W and H multiples of 16."}),
                "frame_num": ("INT", {"default": DEFAULTS.frame_num, "min": 1, "max": MAX_FRAMES, "step": 4, "tooltip": "Frames, 4n+1 (81 = 5 s at 16 fps)."}),
                "sample_steps": ("INT", {"default": DEFAULTS.sample_steps, "min": 1, "max": MAX_STEPS, "tooltip": "Denoising steps (upstream: 40)."}),
                "guide_scale_low": ("FLOAT", {"default": DEFAULTS.guide_scale[0], "min": 0.0, "max": MAX_GUIDE, "step": 0.1, "tooltip": "CFG of the low-noise expert (1 skips the unconditional pass)."}),
                "guide_scale_high": ("FLOAT", {"default": DEFAULTS.guide_scale[1], "min": 0.0, "max": MAX_GUIDE, "step": 0.1, "tooltip": "CFG of the high-noise expert."}),
                "sample_shift": ("FLOAT", {"default": DEFAULTS.sample_shift, "min": 0.0, "max": MAX_SHIFT, "step": 0.1, "tooltip": "Flow shift (upstream: 5.0; 3.0 suggested for 480p)."}),
                "sample_solver": (list(SOLVERS), {"default": DEFAULTS.sample_solver, "tooltip": "Flow solver."}),
                "seed": ("INT", {"default": DEFAULTS.seed, "min": -1, "max": MAX_SEED, "control_after_generate": True, "tooltip": "-1 draws a random seed; the seed used is an output."}),
                "boundary": ("FLOAT", {"default": DEFAULTS.boundary, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Steps with timestep >= boundary*1000 use the high-noise expert (upstream: 0.900)."}),
            }
        }

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("frames", "seed")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Wan2.2 I2V-A14B sampling with both experts, exactly as upstream generate.py."

    @classmethod
    def VALIDATE_INPUTS(cls, size=None, frame_num=None, sample_steps=None, guide_scale_low=None, guide_scale_high=None,
                        sample_shift=None, sample_solver=None, seed=None, boundary=None, **_):
        """Reject bad values at /prompt time (a validation error naming the input), before anything runs."""
        given = dict(size=size, frame_num=frame_num, sample_steps=sample_steps, guide_scale_low=guide_scale_low,
                     guide_scale_high=guide_scale_high, sample_shift=sample_shift, sample_solver=sample_solver,
                     seed=seed, boundary=boundary)
        values = {k: (v if v is not None else _default(k)) for k, v in given.items()}
        try:
            params_from_inputs(**values).validated()
        except InvalidParameter as exc:
            return str(exc)
        return True

    @classmethod
    def IS_CHANGED(cls, seed=None, **_):
        # seed -1 draws a new one each run: never reuse a cached result
        return float("nan") if seed == -1 else seed

    def sample(self, model, text, image, size, frame_num, sample_steps, guide_scale_low, guide_scale_high,
               sample_shift, sample_solver, seed, boundary):
        params = params_from_inputs(size, frame_num, sample_steps, guide_scale_low, guide_scale_high,
                                    sample_shift, sample_solver, seed, boundary)
        result = model.generate(tensor_to_pil(image), text, params,
                                on_step=comfy_bridge.progress_reporter(sample_steps),
                                should_cancel=comfy_bridge.raise_if_interrupted)
        frames = result.frames.float().div(255.0)
        info = {"seed": result.seed, "frames": result.num_frames, "width": result.width, "height": result.height,
                "model_loads": LoadedModels.loads, "timings": {k: round(v, 3) for k, v in result.timings.items()}}
        return {"ui": {"wan22": [info]}, "result": (frames, result.seed)}


def _default(name):
    return {"guide_scale_low": DEFAULTS.guide_scale[0], "guide_scale_high": DEFAULTS.guide_scale[1]}.get(name, getattr(DEFAULTS, name, None))
