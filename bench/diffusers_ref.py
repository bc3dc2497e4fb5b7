"""diffusers reference: the same tiny generation through diffusers' own WanImageToVideoPipeline and through our engine.

Both read the same tiny weights (wan22.testing.tiny builds every layout from one seed): the engine from the upstream
layout (as in production), diffusers from the diffusers layout with `WanImageToVideoPipeline.from_pretrained`
(Wan2.2: image_encoder/image_processor None, transformer + transformer_2, boundary_ratio 0.9; guidance_scale drives
the high-noise expert, guidance_scale_2 the low-noise one). Same dtypes: transformers and UMT5 in bf16, VAE in
float32. Same work: prompt encoding (the upstream negative prompt, 512 tokens), VAE encode of the conditioning,
4 UniPC steps with shift 5.0 and CFG 3.5 on both experts, VAE decode; no MP4 writing on either side.
Both are warmed once; then they alternate, so load swings on a shared machine hit both alike.
"""
from __future__ import annotations

import time
from typing import Dict, List

from .common import PROMPT, TINY_GEN, fmt, input_image, log, ratio, stats, tiny_models, write_result


def _ftfy_shim() -> None:
    """diffusers' Wan prompt cleaning calls ftfy.fix_text and fails without ftfy (not a pinned dependency); the
    engine skips fix_text when ftfy is missing, so give diffusers the same identity (a no-op for ASCII prompts)."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    try:
        import ftfy  # noqa: F401
    except ImportError:
        if not hasattr(pipeline_wan_i2v, "ftfy"):
            pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def run(reps: int = 3, results_dir=None) -> Dict[str, object]:
    import numpy as np
    import torch
    from diffusers import WanImageToVideoPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    from PIL import Image

    from wan22.request.params import GenerationParams
    from wan22.request.spec import UPSTREAM_NEGATIVE_PROMPT
    from wan22.pipeline import LoadOptions
    from wan22.loader import load_pipeline

    image = Image.open(input_image()).convert("RGB")
    width, height = image.size
    params = GenerationParams(seed=1, **TINY_GEN)
    guide_low, guide_high = params.guide_scale

    t = time.perf_counter()
    engine = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="bf16"))
    engine_load_s = time.perf_counter() - t
    _ftfy_shim()
    t = time.perf_counter()
    ref = WanImageToVideoPipeline.from_pretrained(str(tiny_models("diffusers")),
                                                  dtype={"default": torch.bfloat16, "vae": torch.float32})
    ref.set_progress_bar_config(disable=True)
    diffusers_load_s = time.perf_counter() - t
    if ref.config.boundary_ratio != params.boundary:
        raise RuntimeError(f"diffusers boundary_ratio {ref.config.boundary_ratio} != engine boundary {params.boundary}")
    ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config, flow_shift=params.sample_shift)

    def run_engine():
        t = time.perf_counter()
        embeds = engine.encode_prompt(PROMPT, "")
        result = engine.generate(image, embeds, params)
        return time.perf_counter() - t, result.frames.numpy()

    def run_diffusers():
        t = time.perf_counter()
        out = ref(image=image, prompt=PROMPT, negative_prompt=UPSTREAM_NEGATIVE_PROMPT, height=height, width=width,
                  num_frames=params.frame_num, num_inference_steps=params.sample_steps, guidance_scale=guide_high,
                  guidance_scale_2=guide_low, generator=torch.Generator("cpu").manual_seed(params.seed),
                  output_type="np", max_sequence_length=512)
        return time.perf_counter() - t, (np.asarray(out.frames[0]) * 255.0).round().astype(np.uint8)

    log("diffusers reference: warm-up of both")
    engine_warm, engine_frames = run_engine()
    diffusers_warm, diffusers_frames = run_diffusers()
    engine_times, diffusers_times = [], []
    for _ in range(reps):
        engine_times.append(run_engine()[0])
        diffusers_times.append(run_diffusers()[0])
    e, d = stats(engine_times), stats(diffusers_times)
    same_shape = tuple(engine_frames.shape) == tuple(diffusers_frames.shape)
    diff = float(np.abs(engine_frames.astype(np.float32) - diffusers_frames.astype(np.float32)).mean()) if same_shape else None
    data = {"generation": {**TINY_GEN, "width": width, "height": height, "guide_scale": list(params.guide_scale),
                           "shift": params.sample_shift, "solver": params.sample_solver, "seed": params.seed},
            "reps": reps, "engine": {"load_s": round(engine_load_s, 3), "warmup_s": round(engine_warm, 3), "request_s": e},
            "diffusers": {"load_s": round(diffusers_load_s, 3), "warmup_s": round(diffusers_warm, 3), "request_s": d,
                          "pipeline": "diffusers.WanImageToVideoPipeline", "scheduler": type(ref.scheduler).__name__,
                          "dtypes": {"transformer": str(ref.transformer.dtype), "transformer_2": str(ref.transformer_2.dtype),
                                     "text_encoder": str(ref.text_encoder.dtype), "vae": str(ref.vae.dtype)}},
            "output": {"engine_shape": list(engine_frames.shape), "diffusers_shape": list(diffusers_frames.shape),
                       "mean_abs_diff_uint8": round(diff, 3) if diff is not None else None},
            "summary": {"engine_s": e["median"], "diffusers_s": d["median"], "engine_over_diffusers": ratio(e["median"], d["median"]),
                        "engine_min_s": e["min"], "diffusers_min_s": d["min"],
                        "engine_over_diffusers_min": ratio(e["min"], d["min"])},
            "note": "encode prompt + generate (no MP4 write) per request, medians after one warm-up each"}
    data["path"] = str(write_result("diffusers_reference", data, results_dir))
    return data


def report(data: Dict[str, object]) -> List[str]:
    s = data["summary"]
    return [f"diffusers reference (same tiny generation, median of {data['reps']}): engine {fmt(s['engine_s'], ' s')} | "
            f"diffusers WanImageToVideoPipeline {fmt(s['diffusers_s'], ' s')} | engine/diffusers "
            f"{fmt(s['engine_over_diffusers'], 'x', 2)} (fastest: {fmt(s['engine_min_s'], ' s')} vs {fmt(s['diffusers_min_s'], ' s')}, "
            f"{fmt(s['engine_over_diffusers_min'], 'x', 2)}; mean |frame diff| {data['output']['mean_abs_diff_uint8']} of 255)"]
