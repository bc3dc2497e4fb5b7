"""The 4-step recipe and LoRA swaps on the tiny models (CPU), side by side in one process:

  recipe   the same tiny generation (engine, prompt encoded once) at upstream's 40 UniPC steps with CFG 3.5 vs the
           4-step recipe (euler, shift 5, guidance 1, a LoRA on each expert): seconds and the ratio. On A14B the
           ratio of forwards is 80 : 4; here the VAE and the fixed costs of a tiny run weigh more.
  motion   the 4step_motion preset (6 euler steps, the first 2 without the LoRAs at guidance 3.5: 8 forwards) vs
           the 4-step recipe (4 forwards): what the motion steps cost, switching the LoRAs off and on included.
  swap     applying a LoRA, and changing its strength, to loaded experts (Wan22I2VPipeline.sync_loras) vs loading
           the experts again (load_pipeline): seconds and ratios.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from .common import PROMPT, fmt, input_image, log, ratio, stats, tiny_models, write_result


def run(reps: int = 3, results_dir=None, full_steps: int = 40) -> Dict[str, object]:
    from PIL import Image

    from wan22.request import spec
    from wan22.runtime.lora import LoraChoice
    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions
    from wan22.loader import load_pipeline
    from wan22.testing.tiny import write_tiny_lora

    folder = tiny_models("upstream")
    options = LoadOptions(dtype="bf16", device="cpu")
    image = Image.open(input_image())
    scratch = Path(tempfile.mkdtemp(prefix="wan22-bench-lora-"))
    high, low = (write_tiny_lora(scratch / f"{name}.safetensors", seed=seed) for seed, name in enumerate(("high", "low")))
    common = dict(size="96*64", frame_num=9, seed=3)
    full = GenerationParams(sample_steps=full_steps, guide_scale=(3.5, 3.5), sample_solver="unipc", **common)
    recipe = GenerationParams(sample_steps=4, guide_scale=(1.0, 1.0), sample_solver="euler", sample_shift=5.0, **common)
    preset = spec.PRESETS["4step_motion"]
    motion = dataclasses.replace(recipe, sample_steps=preset["sample_steps"], motion_steps=preset["motion_steps"],
                                 motion_guide_scale=preset["motion_guide_scale"])

    pipe = load_pipeline(folder, options)
    turbo = pipe.with_loras([LoraChoice(high, 1.0, 0.0), LoraChoice(low, 0.0, 1.0)])
    embeds = pipe.encode_prompt(PROMPT, "")

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    log(f"lora: warm-up of the {full_steps}-step and the 4-step generation")
    pipe.generate(image, embeds, full)
    turbo.generate(image, embeds, recipe)
    turbo.generate(image, embeds, motion)
    full_s, recipe_s, motion_s = [], [], []
    for _ in range(reps):
        full_s.append(timed(lambda: pipe.with_loras([]).generate(image, embeds, full)))
        recipe_s.append(timed(lambda: turbo.generate(image, embeds, recipe)))
        motion_s.append(timed(lambda: turbo.generate(image, embeds, motion)))

    log("lora: applying / changing a LoRA vs loading the experts again")
    apply_s, change_s, reload_s = [], [], []
    for index in range(reps):
        pipe.with_loras([]).sync_loras()
        apply_s.append(timed(lambda: pipe.with_loras([LoraChoice(high, 1.0, 1.0)]).sync_loras()))
        change_s.append(timed(lambda: pipe.with_loras([LoraChoice(high, 0.5 + index, 1.0)]).sync_loras()))
        reload_s.append(timed(lambda: load_pipeline(folder, options).release()))
    f, r, a, c, lo = stats(full_s), stats(recipe_s), stats(apply_s), stats(change_s), stats(reload_s)
    m = stats(motion_s)
    data = {"generation": {**common, "full_steps": full_steps, "full": f"{full_steps} unipc steps, CFG 3.5 ({2 * full_steps} forwards)",
                           "recipe": "4 euler steps, shift 5, guidance 1, one LoRA per expert (4 forwards)",
                           "motion": "4step_motion: 6 euler steps, the first 2 without the LoRAs at guidance 3.5 (8 forwards)"},
            "reps": reps, "full_s": f, "recipe_s": r, "motion_s": m, "apply_s": a, "change_s": c, "reload_s": lo,
            "summary": {"full_s": f["median"], "recipe_s": r["median"], "full_over_recipe": ratio(f["median"], r["median"]),
                        "motion_s": m["median"], "motion_over_recipe": ratio(m["median"], r["median"]),
                        "apply_s": a["median"], "change_s": c["median"], "reload_s": lo["median"],
                        "reload_over_apply": ratio(lo["median"], a["median"]),
                        "reload_over_change": ratio(lo["median"], c["median"])},
            "note": "tiny random-weight models on the CPU, bf16; medians after one warm-up (the LoRA file read is cached "
                    "after the first apply, as in a server)"}
    data["path"] = str(write_result("lora", data, results_dir))
    return data


def report(data: Dict[str, object]) -> List[str]:
    s = data["summary"]
    steps = data["generation"]["full_steps"]
    return [f"4-step recipe (same tiny generation, median of {data['reps']}): {steps} steps + CFG {fmt(s['full_s'], ' s')} | "
            f"4-step + LoRAs {fmt(s['recipe_s'], ' s')} | {steps}-step/4-step {fmt(s['full_over_recipe'], 'x', 2)}",
            f"4step_motion (8 forwards) {fmt(s['motion_s'], ' s')} vs 4-step (4 forwards) {fmt(s['recipe_s'], ' s')}: "
            f"{fmt(s['motion_over_recipe'], 'x', 2)}",
            f"LoRA swap: apply {fmt(s['apply_s'], ' s')}, change strength {fmt(s['change_s'], ' s')} vs loading the "
            f"experts again {fmt(s['reload_s'], ' s')} (reload/apply {fmt(s['reload_over_apply'], 'x', 1)}, "
            f"reload/change {fmt(s['reload_over_change'], 'x', 1)})"]
