"""A stand-in for chained Wan clips that drift in colour (issue 27): each clip gets warmer and flatter towards its end,
as chained clips do (Wan2.2 #172, ComfyUI #9975). tests/engine/test_long_video.py and bench/long_video.py measure
colour matching on it."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

WARMER = (14.0, 2.0, -10.0)  # RGB added by a clip's end
FLATTER = 0.12  # contrast a clip's end loses


def drifting_clip(start: Image.Image, frames: int) -> torch.Tensor:
    """[frames, H, W, 3] uint8 from `start`, drifting linearly to WARMER and FLATTER at its last frame."""
    base = torch.from_numpy(np.array(start.convert("RGB"))).float()
    clip = [((base - 128) * (1 - FLATTER * t) + 128 + torch.tensor(WARMER) * t).clamp(0, 255).round().to(torch.uint8)
            for t in np.linspace(0, 1, frames)]
    return torch.stack(clip)


def drifting_generate(image, embeds, params, on_step=None, should_cancel=None, last_image=None):
    """Wan22I2VPipeline.generate_clip's signature, drifting_clip's frames."""
    from ..pipeline import VideoResult

    return VideoResult(frames=drifting_clip(image, params.frame_num), video=None, latent=torch.zeros(1),
                       seed=params.seed, timings={"denoise_s": 0.0})


def gradient_image(width: int = 64, height: int = 48) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 3 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8))


def last_clip_shift(colour_match: bool, segments: int = 6, frame_num: int = 9) -> float:
    """CIELAB distance between the mean colours of the first and of the last clip of a drifting chain."""
    from ..long_video import colour_stats, generate_chain
    from ..request.params import GenerationParams

    params = GenerationParams(size="64*48", frame_num=frame_num, segments=segments, color_match=colour_match, seed=0)
    video = generate_chain(drifting_generate, gradient_image(), [None] * segments, params).frames
    first = colour_stats(video[:frame_num])[0]
    last = colour_stats(video[-(frame_num - 1):])[0]
    return float((first - last).norm())
