"""One call from an image and a prompt to an MP4 on disk, with everything validated up front.

    python -m wan22 --model-dir /workspace/models --image in.png --prompt "..." --out out.mp4

Its flags are the spec's (wan22.request.spec), as the CLI's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

from .request.model_sets import default_model_root, discover_model_set
from .request import spec
from .request.errors import InvalidParameter, Wan22Error
from .request.intake import open_image
from .request.params import GenerationParams
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
    picture = open_image(image) if not hasattr(image, "convert") else image
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


ENGINE_IGNORES = ("image_url", "image_base64", "image_path", "filename_prefix", "model_set", "model_path")


def main(argv=None) -> int:
    flags = [p for p in spec.cli_params() if p.name not in ENGINE_IGNORES]
    parser = argparse.ArgumentParser(prog="python -m wan22", description="Wan2.2 I2V-A14B straight from the engine (no ComfyUI).")
    parser.add_argument("--model-dir", default=None, help="model set folder (default: $WAN_CKPT_DIR, /workspace/models, /runpod-volume)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    spec.add_flags(parser, flags)
    args = parser.parse_args(argv)
    try:
        request = spec.normalize(spec.flag_values(args, flags), "cli")
        if "image_path" not in request.values:
            raise InvalidParameter("image", "required: --image PATH (a local file)")
        values = request.values
        params = GenerationParams.from_values(values)
        options = LoadOptions.from_values(values, device=args.device)
    except Wan22Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in request.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    def progress(step, total):
        end = "" if step < total and sys.stderr.isatty() else "\n"
        print(f"\rstep {step}/{total}" if sys.stderr.isatty() else f"step {step}/{total}", end=end, file=sys.stderr, flush=True)

    try:
        result = generate_mp4(values["image_path"], values.get("prompt", spec.default("prompt")), args.out, params,
                              values.get("negative_prompt", ""), args.model_dir, options, on_step=progress)
    except Wan22Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{result.path} seed={result.seed} frames={result.frames} {result.width}x{result.height}")
    return 0
