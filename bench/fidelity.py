"""bf16 fidelity of an expert forward at the real A14B width (CPU), both ways against an fp32 reference:

  diffusers  diffusers' WanTransformerBlock as the engine runs it: bf16 weights, bf16 activations, the residual
             stream rounded to bf16 after each sub-layer (its `.type_as(hidden_states)`)
  upstream   upstream's way: the same bf16 weights and bf16 matmuls (autocast), the residual stream kept in fp32
             (upstream's blocks add under fp32 autocast, so x is fp32 from the first block on)

The weights are random (normal, std 0.02; norms 1) at A14B's shapes (dim 5120, 40 heads, ffn 13824) with `blocks`
of the 40 blocks; the input is one 832*480 latent of 5 frames (3120 tokens) and a 512-token context. Rounding
errors grow with depth, so these are a lower bound of the 40-block figures. Writes bench/results/fidelity.json.

    python -m bench.fidelity [--blocks 2] [--quick]
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

from .common import log, write_result


def _errors(out, reference) -> Dict[str, float]:
    diff = (out.float() - reference).flatten()
    return {"max_abs": float(diff.abs().max()), "rel_l2": float(diff.norm() / reference.flatten().norm())}


def run(blocks: int = 2, quick: bool = False, results_dir=None) -> Dict[str, object]:
    import torch

    from wan22.checkpoints import key_maps
    from wan22.checkpoints.tensors import fill_module
    from wan22.checkpoints.modules import build_transformer

    from .gpu import SMOKE_MODEL, build_random_expert, model_config

    config = model_config(blocks, smoke=False)
    if quick:
        config.update(SMOKE_MODEL, num_layers=blocks)
    log(f"fidelity: {blocks} blocks at dim {config['num_attention_heads'] * config['attention_head_dim']}, fp32 reference")
    reference_model = build_random_expert(config, "cpu", torch.float32)
    state = reference_model.state_dict()
    bf16_model = fill_module(build_transformer(config), ((k, (lambda v=v: v)) for k, v in state.items()),
                             key_maps.identity, torch.bfloat16, "cpu", "bf16 copy")  # the engine's bf16 load
    gen = torch.Generator().manual_seed(3)
    lat_f, lat_h, lat_w = (2, 16, 16) if quick else (2, 60, 104)
    latent = torch.randn(1, 36, lat_f, lat_h, lat_w, generator=gen)
    context = torch.randn(1, 512, 4096, generator=gen) * 0.1
    timestep = torch.tensor([500.0])

    def forward(model, dtype, fp32_residual=False):
        handles = []
        if fp32_residual:  # upstream: x turns fp32 at the first residual add and stays so
            handles = [block.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
                       for block in model.blocks]
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp32_residual):
                return model(hidden_states=latent.to(dtype), timestep=timestep, encoder_hidden_states=context.to(dtype),
                             return_dict=False)[0].float()
        finally:
            for handle in handles:
                handle.remove()

    timings = {}
    start = time.perf_counter()
    reference = forward(reference_model, torch.float32)
    timings["fp32_s"] = time.perf_counter() - start
    start = time.perf_counter()
    diffusers_way = forward(bf16_model, torch.bfloat16)
    timings["diffusers_s"] = time.perf_counter() - start
    start = time.perf_counter()
    upstream_way = forward(bf16_model, torch.bfloat16, fp32_residual=True)
    timings["upstream_s"] = time.perf_counter() - start
    summary = {"diffusers": _errors(diffusers_way, reference), "upstream": _errors(upstream_way, reference),
               "blocks": blocks, "tokens": lat_f * (lat_h // 2) * (lat_w // 2), "quick": quick,
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    summary["diffusers_over_upstream_rel_l2"] = round(summary["diffusers"]["rel_l2"] / summary["upstream"]["rel_l2"], 3)
    data = {"summary": summary, "note": __doc__.split("\n\n", 1)[0]}
    write_result("fidelity", data, results_dir)
    return data


def report(data) -> List[str]:
    s = data["summary"]
    return [f"bf16 fidelity ({s['blocks']} blocks, {s['tokens']} tokens, vs fp32): diffusers' bf16 residual rel L2 "
            f"{s['diffusers']['rel_l2']:.2e} (max {s['diffusers']['max_abs']:.2e}), upstream's fp32 residual rel L2 "
            f"{s['upstream']['rel_l2']:.2e} (max {s['upstream']['max_abs']:.2e}): "
            f"{s['diffusers_over_upstream_rel_l2']:.2f}x"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny width (the code path only)")
    args = ap.parse_args(argv)
    print("\n".join(report(run(args.blocks, args.quick))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
