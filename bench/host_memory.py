"""Host memory and unseen GPU costs on a real GPU (about a minute): what the memory plan cannot see without one.

  free memory   torch.cuda.mem_get_info right after the CUDA context, then after the first bf16 matmul (cuBLAS
                workspace, kernels loaded) and the first fused attention call: what a plan made before those loses
  pin_memory    one A14B block (real shapes, bf16) pinned the way the engine did before, tensor by tensor with
                Tensor.pin_memory(): bytes asked, bytes torch's caching host allocator holds (host_memory_stats),
                the power-of-two model of it (wan22.memory.pinned_host.torch_pinned_bytes), RSS growth
  locked slab   the same block through wan22.memory.pinned_host.pin_module (one buffer, cudaHostRegister in place):
                bytes locked, RSS growth, whether torch sees the views as pinned
  copy speed    the block copied to the GPU tensor by tensor (as block streaming does), from pageable memory,
                from pin_memory copies and from the locked slab: GB/s of each, side by side
  modes agree   memory_mode full, offload and stream give the same latents, bitwise, on a 2-block expert

    python -m bench.host_memory [--out FILE]      # CUDA required; JSON written after every part
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import RESULTS, _status_kb, log, write_result

GIB = 1024**3


def rss_bytes() -> int:
    return int((_status_kb("VmRSS") or 0) * 1024)


def free_and_reserved(torch, device) -> dict:
    free, total = torch.cuda.mem_get_info(device)
    return {"free_gib": round(free / GIB, 3), "total_gib": round(total / GIB, 3),
            "reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 3)}


def unseen_costs(torch, device) -> dict:
    """Device memory that leaves mem_get_info's free figure without showing in torch's reserved memory."""
    import torch.nn.functional as F

    out = {"after_context": free_and_reserved(torch, device)}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    out["after_first_matmul"] = free_and_reserved(torch, device)
    q = torch.randn(1, 40, 8192, 128, device=device, dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q).sum().item()
    out["after_first_attention"] = free_and_reserved(torch, device)
    del a, q
    torch.cuda.empty_cache()
    out["after_empty_cache"] = free_and_reserved(torch, device)
    first = out["after_context"]
    last = out["after_empty_cache"]
    out["unseen_gib"] = round(first["free_gib"] - last["free_gib"] - last["reserved_gib"] + first["reserved_gib"], 3)
    return out


def a14b_block(torch):
    from wan22.checkpoints.configs import load_config
    from wan22.checkpoints.modules import build_transformer

    from .gpu import random_module

    config = load_config("wan22_i2v_a14b_transformer.json")
    config["num_layers"] = 1
    model = random_module(build_transformer(config), torch.device("cpu"), torch.bfloat16)
    return model.blocks[0]


def modes_agree(torch, device) -> dict:
    """Two denoising steps of a 2-block A14B-shaped expert at 480p/5 frames under memory_mode full, offload and
    stream (its host tensors page-locked in place, copies on a side stream): the latents, compared bitwise."""
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.request.params import GenerationParams
    from wan22.runtime.text_encoder import PromptEmbeds

    from .gpu import build_random_expert, latent_inputs, model_config

    expert = build_random_expert(model_config(2, False), torch.device("cpu"), torch.bfloat16)
    noise, y, context, context_null, _ = latent_inputs(832, 480, 5)
    params = GenerationParams(size="832*480", frame_num=5, sample_steps=2, seed=1, boundary=0.0)
    latents, out = {}, {}
    for mode in ("full", "offload", "stream"):
        pipe = Wan22I2VPipeline(expert, expert, None, None, LoadOptions(dtype="bf16", device=str(device),
                                                                        memory_mode=mode))
        plan = pipe.plan(params)
        with torch.no_grad():
            latents[mode] = pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params,
                                         plan=plan).float().cpu()
        pipe.residency.evict()
        out[mode] = {"plan": plan.mode, "resident_blocks": plan.resident_blocks}
    out["offload_equals_full"] = bool(torch.equal(latents["offload"], latents["full"]))
    out["stream_equals_full"] = bool(torch.equal(latents["stream"], latents["full"]))
    out["pinned_after"] = all(t.is_pinned() for t in expert.parameters())
    return out


def host_stats(torch) -> dict:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return {}
    return {k: v for k, v in stats().items() if "bytes" in k and ("current" in k or "peak" in k)}


def copy_speed(torch, tensors, device, repeats: int = 3) -> float:
    """GB/s of copying `tensors` to the GPU one by one (non_blocking), the best of `repeats`."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        copies = [x.to(device, non_blocking=True) for x in tensors]
        torch.cuda.synchronize(device)
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
        del copies
    return round(best, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/host_memory.json)")
    args = ap.parse_args(argv)

    import torch

    from wan22.memory import pinned_host

    if not torch.cuda.is_available():
        print("python -m bench.host_memory: no CUDA device here; it measures what only a GPU machine shows")
        return 2
    device = torch.device("cuda")
    out = args.out or RESULTS / "host_memory.json"
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name(device)}

    def save(part: str, value) -> None:
        data[part] = value
        write_result(out.stem, data, out.parent)
        log(f"{part}: {value}")

    save("free_memory", unseen_costs(torch, device))

    block = a14b_block(torch)
    tensors = [t for t in (*block.parameters(), *block.buffers())]
    sizes = [t.numel() * t.element_size() for t in tensors]
    pageable_speed = copy_speed(torch, tensors, device)

    before, rss = host_stats(torch), rss_bytes()
    copies = [t.pin_memory() for t in tensors]
    after, rss_after = host_stats(torch), rss_bytes()
    save("pin_memory", {
        "tensors": len(tensors), "bytes_asked": sum(sizes),
        "bytes_predicted": sum(pinned_host.torch_pinned_bytes(n) for n in sizes),
        "host_memory_stats_before": before, "host_memory_stats_after": after, "rss_growth": rss_after - rss,
        "all_pinned": all(c.is_pinned() for c in copies)})
    pinned_speed = copy_speed(torch, copies, device)
    del copies, tensors  # the block's own tensors are all that is left: locking replaces them
    import gc

    gc.collect()
    rss = rss_bytes()
    t = time.perf_counter()
    locked = pinned_host.pin_module(block, device)
    lock_s = time.perf_counter() - t
    views = [t for t in (*block.parameters(), *block.buffers())]
    save("locked_slab", {"bytes_locked": locked, "rss_growth": rss_bytes() - rss, "seconds": round(lock_s, 3),
                         "all_pinned": all(v.is_pinned() for v in views)})
    save("copy_speed_gb_s", {"pageable": pageable_speed, "pin_memory": pinned_speed,
                             "locked_slab": copy_speed(torch, views, device)})
    del views, block
    gc.collect()
    save("after_release", {"host_memory_stats": host_stats(torch)})
    save("modes_agree", modes_agree(torch, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
