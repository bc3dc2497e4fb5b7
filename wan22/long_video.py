"""Chained long videos (docs/long_video.md): `segments` clips of `frame_num` frames, each starting from the last
frame of the clip before, each join shown once, colours matched to the first clip.

The chain calls one clip's generation (Wan22I2VPipeline.generate_clip) per segment and keeps only the uint8 frames
between them, on the host, so the GPU holds one clip at a time: a chained video's GPU peak is one clip's. Colour
matching runs on the pipeline's device, CHUNK_FRAMES frames at a time (on this project's 2-core CPU, 15.3 s for a
720p/81-frame clip; on a GPU expected far less, not yet measured: bench/long_video.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .request.params import GenerationParams
from .request.spec import MAX_SEED

ColourStats = Tuple[torch.Tensor, torch.Tensor]  # per-channel mean and standard deviation in CIELAB, [3] each
CHUNK_FRAMES = 8  # frames converted to CIELAB at a time: about 0.5 GB of floats at 720p


def segment_seed(seed: int, index: int) -> int:
    """The seed of segment `index` (0-based): the video's seed for the first, then the next ones."""
    return (seed + index) % (MAX_SEED + 1)


def _lab_chunks(frames: torch.Tensor, device=None):
    """[F, H, W, 3] uint8 -> CIELAB [f, 3, H, W] float chunks of at most CHUNK_FRAMES frames, on `device`."""
    from kornia.color import rgb_to_lab

    for start in range(0, frames.shape[0], CHUNK_FRAMES):
        chunk = frames[start:start + CHUNK_FRAMES].to(device)
        yield start, rgb_to_lab(chunk.permute(0, 3, 1, 2).float().div(255.0))


def colour_stats(frames: torch.Tensor, device=None) -> ColourStats:
    """Per-channel mean and standard deviation of uint8 frames [F, H, W, 3], in CIELAB (computed on `device`)."""
    total = torch.zeros(3, dtype=torch.float64, device=device)
    squares = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    for _, lab in _lab_chunks(frames, device):
        flat = lab.transpose(0, 1).reshape(3, -1).double()
        total += flat.sum(1)
        squares += flat.square().sum(1)
        count += flat.shape[1]
    mean = total / count
    return mean.float().cpu(), (squares / count - mean.square()).clamp_min(0).sqrt().float().cpu()


def match_colour(frames: torch.Tensor, reference: ColourStats, device=None) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] with each CIELAB channel's mean and spread moved to `reference`'s (Reinhard's
    transfer), computed on `device`; a new tensor beside `frames`."""
    from kornia.color import lab_to_rgb

    mean, std = colour_stats(frames, device)
    shift = [t.view(1, 3, 1, 1).to(device) for t in (mean, reference[1] / std.clamp_min(1e-3), reference[0])]
    out = torch.empty_like(frames)
    for start, lab in _lab_chunks(frames, device):
        rgb = lab_to_rgb((lab - shift[0]) * shift[1] + shift[2], clip=True)
        out[start:start + lab.shape[0]] = rgb.mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).to(out.device)
    return out


def frame_image(frames: torch.Tensor, index: int = -1) -> Image.Image:
    return Image.fromarray(frames[index].numpy())


@dataclasses.dataclass
class Segment:
    """What one clip of a chain did."""

    seed: int
    frames: int  # frames it added to the video (its first, the join, is the clip before's last)
    timings: dict
    colour_s: float = 0.0  # matching its colours to the first clip's

    def as_dict(self) -> dict:
        return {"seed": self.seed, "frames": self.frames, "colour_s": round(self.colour_s, 4),
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


ClipFn = Callable[..., "object"]  # Wan22I2VPipeline.generate_clip: (image, embeds, params, on_step, should_cancel, last_image)


def _clip_from(generate_clip: ClipFn, start: Image.Image, embeds, params: GenerationParams,
               reference: Optional[ColourStats], device, **run):
    """One clip of `params` from `start`, its colours matched to `reference` (None: as made): (its VideoResult, its
    frames, its Segment, which counts the frames it adds after the join)."""
    result = generate_clip(start, embeds, dataclasses.replace(params, segments=1), **run)
    clip, started = result.frames, time.perf_counter()
    if params.color_match and reference is not None:
        clip = match_colour(clip, reference, device)
    return result, clip, Segment(params.seed, clip.shape[0] - 1, dict(result.timings), time.perf_counter() - started)


def generate_chain(generate_clip: ClipFn, image: Image.Image, embeds: Sequence, params: GenerationParams,
                   on_step: Optional[Callable[[int, int], None]] = None, should_cancel=None,
                   last_image: Optional[Image.Image] = None, device=None):
    """`params.segments` clips joined into one video (params validated, seed resolved). `embeds`: one prompt's
    embeddings per segment. Progress counts the steps of every segment; colours are matched on `device`. Returns
    the last clip's VideoResult with the whole video's frames and `segments` filled in."""
    steps, count = params.sample_steps, params.segments
    frames: List[torch.Tensor] = []
    done: List[Segment] = []
    reference: Optional[ColourStats] = None
    start, result = image, None
    for index in range(count):
        progress = None if on_step is None else (lambda step, _total, base=index * steps: on_step(base + step, count * steps))
        result, clip, segment = _clip_from(generate_clip, start, embeds[index],
                                           dataclasses.replace(params, seed=segment_seed(params.seed, index)),
                                           reference, device, on_step=progress, should_cancel=should_cancel,
                                           last_image=last_image if index == count - 1 else None)
        if index == 0:
            segment.frames += 1  # the first clip's first frame is the video's own
            if params.color_match:
                t0 = time.perf_counter()
                reference = colour_stats(clip, device)
                segment.colour_s += time.perf_counter() - t0
        frames.append(clip if index == 0 else clip[1:])
        done.append(segment)
        start = frame_image(clip)
        if index < count - 1:
            result = None  # its float video and latent: the host holds only the frames between clips
    video = torch.cat(frames)
    timings = {key: sum(s.timings.get(key, 0.0) for s in done) for key in done[0].timings}
    timings["colour_s"] = sum(s.colour_s for s in done)
    return dataclasses.replace(result, frames=video, video=None, seed=params.seed, timings=timings,
                               segments=[s.as_dict() for s in done])


def extend_video(generate_clip: ClipFn, video: torch.Tensor, embeds, params: GenerationParams,
                 on_step: Optional[Callable[[int, int], None]] = None, should_cancel=None,
                 last_image: Optional[Image.Image] = None, device=None):
    """`video` (uint8 [F, H, W, 3]) with one more clip of `params.frame_num` frames from its last frame, the join
    shown once, its colours matched to the video's first clip (its first `frame_num` frames). Returns the clip's
    VideoResult with the whole video's frames and the clip in `segments`."""
    from .request.errors import InvalidParameter
    from .request.params import image_size_for_area

    height, width = video.shape[1:3]
    clip_h, clip_w = image_size_for_area(height, width, params.max_area)[2:]
    if (clip_h, clip_w) != (height, width):
        raise InvalidParameter("size", f"the video is {width}x{height} and {params.size} makes {clip_w}x{clip_h} clips "
                                       f"of it: give the size the video was made with")
    reference = colour_stats(video[:params.frame_num], device) if params.color_match else None
    result, clip, segment = _clip_from(generate_clip, frame_image(video), embeds, params, reference, device,
                                       on_step=on_step, should_cancel=should_cancel, last_image=last_image)
    return dataclasses.replace(result, frames=torch.cat([video, clip[1:]]), video=None,
                               timings={**result.timings, "colour_s": segment.colour_s}, segments=[segment.as_dict()])
