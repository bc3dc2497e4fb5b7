"""One call from an image and a prompt to an MP4 on disk, with everything validated up front.

    python -m wan22 --model-dir /workspace/models --image in.png --prompt "..." --out out.mp4
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

from .discover import default_model_root, discover_model_set
from .errors import Wan22Error
from .images import load_image
from .params import GenerationParams
from .pipeline import CancelCheck, LoadOptions, StepCallback, VideoResult, load_pipeline
from .video import write_mp4


@dataclasses.dataclass
class Mp4Result:
    path: Path
    seed: int
    frames: int
    width: int
    height: int
    timings: dict


def generate_mp4(image, prompt: str, out: Path, params: GenerationParams = GenerationParams(), negative_prompt: str = "",
                 model_dir=None, options: LoadOptions = LoadOptions(), pipeline=None,
                 on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None) -> Mp4Result:
    """Validate, load (unless `pipeline` is given), generate and write the MP4 atomically."""
    params = params.validated()
    options = options.validated()
    picture = load_image(image) if not hasattr(image, "convert") else image
    timings = {}
    if pipeline is None:
        model_set = discover_model_set(model_dir or default_model_root())
        start = time.perf_counter()
        pipeline = load_pipeline(model_set, options)
        timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    embeds = pipeline.encode_prompt(prompt, negative_prompt)
    timings["encode_prompt_s"] = time.perf_counter() - start
    result: VideoResult = pipeline.generate(picture, embeds, params, on_step=on_step, should_cancel=should_cancel)
    timings.update(result.timings)
    start = time.perf_counter()
    path = write_mp4(result.frames, out, fps=params.fps)
    timings["write_s"] = time.perf_counter() - start
    return Mp4Result(path, result.seed, result.num_frames, result.width, result.height, timings)


def main(argv=None) -> int:
    defaults = GenerationParams()
    parser = argparse.ArgumentParser(prog="python -m wan22", description="Wan2.2 I2V-A14B straight from the engine (no ComfyUI).")
    parser.add_argument("--model-dir", default=None, help="model set folder (default: $WAN_CKPT_DIR, /workspace/models, /runpod-volume)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative-prompt", default="", help="empty: upstream's default negative prompt")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default=defaults.size)
    parser.add_argument("--frame-num", type=int, default=defaults.frame_num)
    parser.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    parser.add_argument("--guide-scale-low", type=float, default=defaults.guide_scale[0])
    parser.add_argument("--guide-scale-high", type=float, default=defaults.guide_scale[1])
    parser.add_argument("--sample-shift", type=float, default=defaults.sample_shift)
    parser.add_argument("--sample-solver", default=defaults.sample_solver)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    params = GenerationParams(size=args.size, frame_num=args.frame_num, sample_steps=args.sample_steps,
                              guide_scale=(args.guide_scale_low, args.guide_scale_high), sample_shift=args.sample_shift,
                              sample_solver=args.sample_solver, seed=args.seed, fps=args.fps)

    def progress(step, total):
        print(f"\rstep {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    try:
        result = generate_mp4(args.image, args.prompt, args.out, params, args.negative_prompt, args.model_dir,
                              LoadOptions(dtype=args.dtype, device=args.device), on_step=progress)
    except Wan22Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.path} seed={result.seed} frames={result.frames} {result.width}x{result.height}")
    return 0
