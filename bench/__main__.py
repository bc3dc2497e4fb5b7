"""`make bench` (PYTHONPATH=. .venv/bin/python -m bench): the CPU benchmarks of issue 6, one run, one machine.

  loader      synthetic upstream-layout expert (fp32 shards, 2.33 GB) -> bf16: streaming loader vs plain state dict
              vs raw read, seconds and peak RSS, each in a fresh subprocess (cold and warm page cache)
  diffusers   the same tiny generation through diffusers' WanImageToVideoPipeline and our engine
  lora        the same tiny generation at 40 steps + CFG vs the 4-step recipe vs 4step_motion; applying / changing a LoRA vs
              loading the experts again
  paths       the same tiny generation by the engine, through ComfyUI + shipped workflow (headless client) and
              through the RunPod worker's local API; plus warm vs cold through the worker
  fidelity    one expert forward at the real A14B width (2 of 40 blocks) in bf16 against fp32: diffusers' bf16
              residual stream vs upstream's fp32 one (the fp32_residual option)
  t5          one request's prompt encoding at full UMT5-XXL width (2 of 24 blocks, scaled): ours (real tokens only,
              cached negative prompt, the CPU's fast dtype) vs upstream's way (padded to 512, bf16), on this CPU and
              on the CPU classes it can emulate (oneDNN capped below AMX, below BF16)
  long_video  a chain of 3 tiny clips vs the same clips one by one; colour matching of a 720p/81-frame clip as a
              share of a clip's time measured on the H200; the colour drift of a chain without and with matching

Prints the ratios and writes bench/results/<name>.json (plus summary.json). Benchmarks report; they never fail
because a machine is slow. `--quick` is the smoke-test size (tiny loader, one repetition, no servers).

    python -m bench [--quick] [--only loader,diffusers,lora,paths] [--reps N] [--loader-gb 2.2] [--results DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from .common import RESULTS, log, machine_info, write_result

BENCHMARKS = ("loader", "diffusers", "lora", "paths", "t5", "fidelity", "long_video")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke size: 16 MB loader expert (warm cache), 1 repetition, 8 instead of 40 steps, no ComfyUI/worker servers")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per path (default 10; quick 1)")
    ap.add_argument("--loader-gb", type=float, default=None, help="fp32 size of the synthetic expert (default 2.2)")
    ap.add_argument("--no-servers", action="store_true", help="paths: engine only (skip ComfyUI and the worker)")
    ap.add_argument("--results", type=Path, default=None, help=f"results folder (default {RESULTS}; --quick writes quick_*.json)")
    args = ap.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    reps = args.reps or (1 if args.quick else 10)
    results_dir = args.results or RESULTS
    if args.quick:
        from . import common

        common.NAME_PREFIX = "quick_"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    machine = machine_info()
    log(f"machine: {machine.get('nproc')} cores, {machine.get('ram_gib')} GiB RAM, {machine.get('cpu_model')}, "
        f"load average {machine.get('loadavg')}")
    lines, summary, failed = [], {}, []
    for name in BENCHMARKS:
        if name not in only:
            continue
        t = time.perf_counter()
        try:
            if name == "loader":
                from . import loader

                if args.quick:
                    data = loader.run(args.loader_gb or 0.016, shards=2, dim=256, ffn=512, results_dir=results_dir,
                                      modes=["warm"])
                else:
                    data = loader.run(args.loader_gb or 2.2, results_dir=results_dir)
                lines += loader.report(data)
                summary["loader"] = data["summary"]
            elif name == "diffusers":
                from . import diffusers_ref

                data = diffusers_ref.run(reps=reps, results_dir=results_dir)
                lines += diffusers_ref.report(data)
                summary["diffusers_reference"] = data["summary"]
            elif name == "lora":
                from . import lora

                data = lora.run(reps=min(reps, 3), results_dir=results_dir, full_steps=8 if args.quick else 40)
                lines += lora.report(data)
                summary["lora"] = data["summary"]
            elif name == "paths":
                from . import paths

                data = paths.run(reps=reps, servers=not (args.quick or args.no_servers), results_dir=results_dir)
                lines += paths.report(data)
                summary.update({k: v["summary"] for k, v in data.items()})
            elif name == "t5":
                from . import t5

                data = t5.run(blocks=1 if args.quick else 2, results_dir=results_dir, quick=args.quick)
                lines += t5.report(data)
                summary["t5_encode"] = data["summary"]
            elif name == "long_video":
                from . import long_video

                data = long_video.run(reps=min(reps, 3), results_dir=results_dir, quick=args.quick)
                lines += long_video.report(data)
                summary["long_video"] = data["summary"]
            elif name == "fidelity":
                from . import fidelity

                data = fidelity.run(blocks=2, quick=args.quick, results_dir=results_dir)
                lines += fidelity.report(data)
                summary["fidelity"] = data["summary"]
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            traceback.print_exc()
            failed.append(name)
            lines.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
        log(f"{name} done in {time.perf_counter() - t:.1f} s")
    total = time.perf_counter() - started
    path = write_result("summary", {"command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    "total_s": round(total, 1), "summary": summary, "failed": failed,
                                    "lines": lines}, results_dir)
    print("\n==== Wan2.2 I2V benchmarks ====")
    print("\n".join(lines))
    print(f"(total {total:.0f} s; results in {path.parent})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
