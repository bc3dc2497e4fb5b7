"""Chained long videos (issue 27), measured side by side in one run:

  chain    the same tiny generation (engine, CPU, fp32) as 3 separate clips, each from the last frame of the one
           before, and as one chain of 3 segments: seconds and the ratio, and the chain's colour matching and joins
           as a share of one clip's time.
  colour   colour matching of one full-size clip (81 frames of 1280x720) on this CPU: seconds, as a share of a 720p
           clip's time measured on the H200 (bench/measured: 40 steps projected 1006.6 s, the 4-step recipe 72.2 s
           with its prompt encoding and VAE).
  drift    wan22.testing.drift's chain of 6 clips that drift: the last clip's mean CIELAB shift from the first's,
           without and with matching.
  memory   (simulated, full size; not with --quick) the GPU and host peaks of one 480p/81-frame clip and of two
           chained, on a simulated 80 GB card (wan22.testing.simulated_machine).
"""
from __future__ import annotations

import json
import time
from typing import Dict, List

from .common import PROMPT, REPO, fmt, input_image, log, ratio, stats, tiny_models, write_result

MEASURED = REPO / "bench" / "measured" / "h200_2026-12-04_gpu.json"
SEGMENTS = 3


def _clip_seconds_720p() -> Dict[str, float]:
    """One 720p/81-frame clip on the H200, measured (bench/measured): 40 steps and the 4-step recipe."""
    run = json.loads(MEASURED.read_text())["results"]["720p"]
    whole = run["whole_4step"]
    fixed = whole["t5_s"] + whole["prepare_s"] + whole["decode_s"]
    return {"40 steps": run["engine"]["projected_40_steps_s"] + fixed, "4-step recipe": whole["projected_video_s"]}


def run(reps: int = 3, results_dir=None, quick: bool = False) -> Dict[str, object]:
    import dataclasses

    import torch
    from PIL import Image

    from wan22.loader import load_pipeline
    from wan22.long_video import colour_stats, frame_image, match_colour
    from wan22.pipeline import LoadOptions
    from wan22.request.params import GenerationParams
    from wan22.testing.drift import last_clip_shift

    pipe = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu"))
    image = Image.open(input_image())
    embeds = pipe.encode_prompt(PROMPT, "")
    clip = GenerationParams(size="96*64", frame_num=9, sample_steps=4, seed=3)
    chain = dataclasses.replace(clip, segments=SEGMENTS)

    separate, chained, colour_share = [], [], []
    for rep in range(reps):
        log(f"long_video: chain of {SEGMENTS} vs {SEGMENTS} clips, repetition {rep + 1}/{reps}")
        t0 = time.perf_counter()
        start = image
        for index in range(SEGMENTS):
            frames = pipe.generate(start, embeds, dataclasses.replace(clip, seed=clip.seed + index)).frames
            start = frame_image(frames)
        separate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = pipe.generate(image, embeds, chain)
        chained.append(time.perf_counter() - t0)
        colour_share.append(result.timings["colour_s"] / (SEGMENTS - 1) / (chained[-1] / SEGMENTS))

    frames = torch.randint(0, 256, (81 if not quick else 9, 720, 1280, 3), dtype=torch.uint8)
    reference = colour_stats(frames[:9])
    t0 = time.perf_counter()
    match_colour(frames, reference)
    colour_s = time.perf_counter() - t0
    clip_s = _clip_seconds_720p()
    per_clip = {name: colour_s * (81 / frames.shape[0]) / seconds for name, seconds in clip_s.items()}

    on_gpu = None
    if torch.cuda.is_available():
        match_colour(frames[:8], reference, "cuda")  # kornia's kernels load
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        match_colour(frames, reference, "cuda")
        torch.cuda.synchronize()
        on_gpu = round((time.perf_counter() - t0) * 81 / frames.shape[0], 3)

    without, with_matching = last_clip_shift(False), last_clip_shift(True)
    simulated = None if quick else _simulated_peaks()
    data = {"segments": SEGMENTS, "clip": dataclasses.asdict(clip),
            "separate_clips_s": stats(separate), "chain_s": stats(chained),
            "colour_share_of_a_tiny_clip": stats(colour_share),
            "colour_full_clip_cpu_s": round(colour_s * 81 / frames.shape[0], 3), "colour_frames_timed": frames.shape[0],
            "colour_full_clip_gpu_s": on_gpu, "simulated_memory": simulated,
            "h200_720p_clip_s": clip_s, "colour_share_of_a_720p_clip": per_clip,
            "drift_last_clip_shift": {"without": round(without, 2), "with": round(with_matching, 2)}}
    data["summary"] = {"chain_over_clips": ratio(data["chain_s"]["median"], data["separate_clips_s"]["median"]),
                       "colour_share_720p_4step": round(per_clip["4-step recipe"], 4),
                       "colour_share_720p_40_steps": round(per_clip["40 steps"], 4),
                       "drift_without_over_with": ratio(without, with_matching)}
    write_result("long_video", data, results_dir)
    return data


def _simulated_peaks() -> Dict[str, Dict[str, float]]:
    from wan22.testing.simulated_machine import simulate

    peaks = {}
    for segments in (1, 2):
        log(f"long_video: simulating {segments} chained 480p clip(s) at full size")
        result = simulate(80, 128, "832*480", 81, steps=1, segments=segments)
        peaks[str(segments)] = {"gpu_gib": result["peak_gpu_gib"], "host_gib": result["peak_host_gib"],
                                "error": result["error"]}
    return peaks


def report(data: Dict[str, object]) -> List[str]:
    s = data["summary"]
    share = data["colour_share_of_a_720p_clip"]
    sim = data.get("simulated_memory")
    extra = [] if not sim else [
        f"long video (simulated, full size, 480p/81 frames on 80 GB): GPU peak one clip {sim['1']['gpu_gib']} GiB, two "
        f"chained {sim['2']['gpu_gib']} GiB; host peak {sim['1']['host_gib']} -> {sim['2']['host_gib']} GiB"]
    if data.get("colour_full_clip_gpu_s") is not None:
        extra.append(f"long video: colour matching of a 720p/81-frame clip on the GPU {data['colour_full_clip_gpu_s']} s")
    return extra + [
        f"long video: a chain of {data['segments']} tiny clips {fmt(data['chain_s']['median'], 's')} vs the same clips "
        f"one by one {fmt(data['separate_clips_s']['median'], 's')} (chain/clips {s['chain_over_clips']}x); colour "
        f"matching {100 * data['colour_share_of_a_tiny_clip']['median']:.1f} % of a tiny clip",
        f"long video: colour matching of a 720p/81-frame clip on this CPU {data['colour_full_clip_cpu_s']} s = "
        f"{100 * share['40 steps']:.2f} % of a 40-step clip, {100 * share['4-step recipe']:.2f} % of a 4-step clip "
        f"(the clips' times measured on the H200)",
        f"long video: drift of the last of 6 drifting clips, mean CIELAB shift {data['drift_last_clip_shift']['without']} "
        f"without matching, {data['drift_last_clip_shift']['with']} with ({s['drift_without_over_with']}x less)",
    ]
