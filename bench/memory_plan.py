"""Peak GPU and host memory of a full-size Wan2.2 I2V-A14B run, simulated: the real pipeline code (loading,
memory plan, T5, VAE encode, both experts, decode) runs on fake tensors, which have shapes, dtypes and devices
but no storage, and a dispatch mode sums the bytes of every live tensor per device.

    python -m bench.memory_plan --gpu-gib 24 --host-gib 128 --size 1280*720 --frame-num 81 \\
        [--mode auto|full|offload|stream] [--weight-dtype auto|bf16|fp16|fp8_e4m3fn_scaled] [--steps 4]

prints one JSON line with `simulated: true`, the plan (`mode`, `resident_blocks`, ...), its expected peaks and the
measured `peak_gpu_bytes` / `peak_host_bytes` (and per stage). The model set is a ComfyUI split-file layout written
from the full-size key manifests in ../shared/reference as sparse files (headers only; nothing is read from them):
fp16 experts, or fp8_scaled ones for `--weight-dtype fp8_e4m3fn_scaled`.

What is simulated rather than run: the GPU itself (a fake "cuda" device, with the budget given), and attention,
which counts as FlashAttention's memory (the output and a log-sum-exp per query; the math kernel would hold the
tokens x tokens scores), as SDPA on the seed's GPUs uses.
"""
from __future__ import annotations

import argparse
import json
import sys

from wan22.testing.simulated_machine import simulate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_plan", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, required=True, help="free GPU memory of the simulated card")
    parser.add_argument("--host-gib", type=float, default=128.0, help="host RAM of the simulated machine")
    parser.add_argument("--size", default="1280*720")
    parser.add_argument("--frame-num", type=int, default=81)
    parser.add_argument("--mode", default="auto", choices=("auto", "full", "offload", "stream"))
    parser.add_argument("--weight-dtype", default="auto", choices=("auto", "bf16", "fp16", "fp8_e4m3fn_scaled"))
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (the peak is per step; 4 reach both experts)")
    parser.add_argument("--t5-gpu", action="store_true", help="encode the prompt on the GPU (t5_cpu false)")
    args = parser.parse_args(argv)
    result = simulate(args.gpu_gib, args.host_gib, args.size, args.frame_num, args.mode, args.weight_dtype, args.steps,
                      t5_cpu=not args.t5_gpu)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
