"""GPU benchmark (one H100/H200, about 5-8 minutes): seconds per denoising step (cond + uncond) of Wan2.2 I2V-A14B at
480p (832*480) and 720p (1280*720) with 81 frames, bf16, random weights at the real A14B shapes, and peak VRAM, for

  engine     wan22.pipeline.Wan22I2VPipeline.denoise (our call path: input casts, CFG, UniPC flow solver)
  diffusers  diffusers.WanImageToVideoPipeline.__call__ with the same transformer (its denoising loop, CFG and
             UniPCMultistepScheduler, output_type="latent")
  4step      the engine with the distilled recipe: euler, guidance 1 (one forward per step) and a random rank-64 LoRA
             on every linear layer of the blocks (the runtime adapters), projected to 4 steps
  engine_cfg_batch, engine_compiled, engine@BACKEND
             the engine path with cfg_batch, compile=blocks, or one attention backend (native, cudnn, flash, flash3,
             sage; one the GPU cannot run is reported, not failed): speedups over `engine` (attention auto)
  whole, whole_4step
             a whole video through the engine's generate(): random UMT5-XXL-shaped T5 on the GPU, random Wan2.1 VAE
             (encode and decode at the real size), the steps; each stage timed, projected to 40 / 4 steps;
             `whole@offload` etc.: the same under one memory mode, with a second, distinct expert

in one process, on the same weights. The expert is built the engine's way (meta device, then filled tensor by
tensor straight on the GPU) with all 40 blocks by default (28.6 GB in bf16); both experts of A14B have this shape,
so one module serves as high- and low-noise expert (the step cost is the same; VRAM for the second resident expert
is not counted: add 28.6 GB, or use offload_model as upstream does). `--blocks N` builds N of the 40 blocks and
scales the step time by 40/N (the blocks are >99% of the compute) when memory or time is short; the result says so.

The step paths time the denoising only (random conditioning and prompt embeddings stand in); the whole paths add
the text encoder and the VAE; the published upstream figures (H100: 327.8 s at 480p, 1055.9 s at 720p for 40 steps) are
whole runs, so the projection (40 x the step time) is a lower bound to compare with them.

    python -m bench.gpu                 # the GPU run (cuda required unless --device cpu)
    python -m bench.gpu --smoke         # CPU-sized: tiny model and sizes, proves the code path (CI)
    python -m bench.gpu --resolutions 480p --steps 2 --warmup 1 --blocks 20
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Dict, List, Optional

from wan22.request.errors import InvalidParameter

from .common import RESULTS, log, peak_rss_since_reset_mb, reset_peak_rss, write_result

A14B_BLOCKS = 40
FULL_STEPS = 40
PUBLISHED_H100_S = {"480p": 327.8, "720p": 1055.9}  # upstream Wan2.2 README, I2V-A14B, one H100
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
SMOKE_RESOLUTIONS = {"480p": (96, 64), "720p": (128, 80)}  # same names, tiny sizes
SMOKE_MODEL = {"num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 512, "num_layers": 2}
PROMPT_TOKENS, NEGATIVE_TOKENS = 24, 126  # real lengths of a short prompt and upstream's negative prompt


def model_config(blocks: int, smoke: bool) -> dict:
    from wan22.checkpoints.configs import load_config

    config = load_config("wan22_i2v_a14b_transformer.json")
    if smoke:
        config.update(SMOKE_MODEL)
    else:
        config["num_layers"] = blocks
    return config


def build_random_expert(config: dict, device, dtype, seed: int = 0):
    """The engine's load path (meta-built WanTransformer3DModel, filled tensor by tensor) with random tensors made
    directly on `device`: no host copy of 28 GB."""
    import torch

    from wan22.checkpoints.modules import build_transformer

    torch.manual_seed(seed)
    # fill_module places parameters; the RoPE tables are non-persistent buffers made on the host by __init__
    # (the engine moves the expert with .to(device) when it offloads): random_module moves them too
    return random_module(build_transformer(config), device, dtype)


class Clock:
    """Per-step wall times (synchronizing the device first)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.marks: List[float] = []

    def start(self) -> None:
        self.sync()
        self.marks = [time.perf_counter()]

    def tick(self, step: int = -1, *_args, **_kw):
        if step == 0:  # the engine's "sampling has begun": the clock starts there
            self.start()
            return
        self.sync()
        self.marks.append(time.perf_counter())

    def steps(self) -> List[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def latent_inputs(width: int, height: int, frames: int, seed: int = 1):
    import torch

    from wan22.pipeline import Wan22I2VPipeline

    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    noise = Wan22I2VPipeline.prepare_noise(seed, frames, lat_h, lat_w)  # [16, F, h, w], CPU generator
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.cat([torch.ones(4, lat_f, lat_h, lat_w), torch.randn(16, lat_f, lat_h, lat_w, generator=gen)])
    context = torch.randn(PROMPT_TOKENS, 4096, generator=gen) * 0.1
    context_null = torch.randn(NEGATIVE_TOKENS, 4096, generator=gen) * 0.1
    return noise, y, context, context_null, (lat_f, lat_h, lat_w)


ENGINE_VARIANTS = {  # path -> LoadOptions fields (wan22.request.spec) on top of the engine's defaults
    "engine": {},
    "engine_cfg_batch": {"cfg_batch": True},
    "engine_compiled": {"compile": "blocks"},
}


def engine_options(path: str) -> dict:
    """`engine@BACKEND` runs the engine with that attention backend; the others are ENGINE_VARIANTS."""
    name, _, backend = path.partition("@")
    if name not in ENGINE_VARIANTS:
        raise ValueError(f"unknown path {path}")
    return {**ENGINE_VARIANTS[name], **({"attention_backend": backend} if backend else {})}


def run_engine(model, device, dtype_name: str, width, height, frames, steps, inputs, path: str = "engine"):
    """Seconds per step and what the run used (wan22.runtime.kernels: backend, compile, cfg_batch)."""
    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.runtime.text_encoder import PromptEmbeds

    noise, y, context, context_null, _ = inputs
    options = LoadOptions(dtype=dtype_name, offload_model=False, t5_cpu=True, device=str(device),
                          **engine_options(path)).validated()
    pipe = Wan22I2VPipeline(model, model, None, None, options)
    params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=steps, seed=1)
    clock = Clock(device)
    clock.start()
    pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params, on_step=clock.tick)  # the next path runs eager: a run's kernels last for the run
    return clock.steps(), pipe.last_kernels


LORA_RANK = 64


def add_random_lora(model, device, rank: int = LORA_RANK):
    """A rank-`rank` LoRA on every linear layer of the blocks, applied as the engine applies LoRAs (adapters)."""
    import torch
    from torch import nn

    from wan22.runtime.lora import LoraFile, Patch, apply_loras

    gen = torch.Generator().manual_seed(7)
    patches = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and (isinstance(module, nn.Linear) or hasattr(module, "scale_weight")):
            out_features, in_features = module.weight.shape
            patches[name] = Patch(down=(torch.randn(rank, in_features, generator=gen) * 0.01).to(device, torch.bfloat16),
                                  up=(torch.randn(out_features, rank, generator=gen) * 0.01).to(device, torch.bfloat16))
    return apply_loras(model, [(LoraFile(Path("random.safetensors"), patches, []), 1.0)], torch.bfloat16, ("bench",))


def run_engine_4step(model, device, dtype_name: str, width, height, frames, steps, inputs) -> List[float]:
    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.runtime.text_encoder import PromptEmbeds

    noise, y, context, context_null, _ = inputs
    applied = add_random_lora(model, device)
    try:
        options = LoadOptions(dtype=dtype_name, offload_model=False, t5_cpu=True, device=str(device))
        pipe = Wan22I2VPipeline(model, model, None, None, options)
        params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=steps, seed=1,
                                  sample_solver="euler", sample_shift=5.0, guide_scale=(1.0, 1.0))
        clock = Clock(device)
        clock.start()
        pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params, on_step=clock.tick)
        return clock.steps()
    finally:
        applied.remove()


def random_module(module, device, dtype):
    """A meta-built module filled with random tensors (normal, std 0.02; norm weights 1) made directly on `device`
    in `dtype` (None: fp32, the module's own kept dtypes), then its buffers moved there too."""
    import torch

    from wan22.checkpoints import key_maps
    from wan22.checkpoints.tensors import fill_module

    def getter(key, shape):
        def get():
            t = torch.empty(shape, device=device, dtype=torch.float32 if dtype is None else dtype)
            return t.fill_(1.0) if len(shape) == 1 and "norm" in key else t.normal_(0.0, 0.02)
        return get

    shapes = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    return fill_module(module, ((k, getter(k, s)) for k, s in shapes), key_maps.identity, dtype, device, "random").to(device)


def whole_pipeline(model, device, dtype_name: str, smoke: bool):
    """The engine's whole pipeline around `model` (both experts): a random UMT5-XXL-shaped T5 (bf16, on the GPU:
    t5_cpu=false) with UMT5-sized token counts, and a random VAE of the real Wan2.1 config (fp32, as upstream)."""
    import torch
    from transformers import UMT5Config

    from wan22.checkpoints.configs import load_config
    from wan22.checkpoints.modules import build_t5_encoder, build_vae
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.runtime.text_encoder import PromptEncoder

    from .t5 import EstimatedTokenizer

    t5_config = load_config("umt5_xxl_encoder.json")
    t5_config.update(vocab_size=4096)  # the lookup costs the same at any vocabulary size
    if smoke:
        t5_config.update(d_kv=16, num_heads=4, d_ff=128, num_layers=1, num_decoder_layers=1)  # d_model: the experts' text_dim
    t5 = random_module(build_t5_encoder(UMT5Config(**t5_config)), device, torch.bfloat16).eval()
    vae_config = {k: v for k, v in load_config("wan21_vae.json").items() if not k.startswith("_")}
    if smoke:
        vae_config["base_dim"] = 8
    vae = random_module(build_vae(vae_config), device, None).eval()
    options = LoadOptions(dtype=dtype_name, offload_model=False, t5_cpu=False, device=str(device)).validated()
    return Wan22I2VPipeline(model, model, PromptEncoder(EstimatedTokenizer(t5_config["vocab_size"]), t5, device), vae, options)


def run_whole(pipe, device, width, height, frames, steps, four_step: bool) -> dict:
    """One whole video (T5 encode, VAE encode, `steps` denoising steps, VAE decode), each stage timed."""
    from PIL import Image

    from wan22.request import spec
    from wan22.request.params import GenerationParams

    image = Image.new("RGB", (width, height), (90, 120, 160))
    clock = Clock(device)
    clock.start()
    embeds = pipe.encode_prompt(spec.default("prompt") + f" ({time.perf_counter()})")  # never a cached prompt
    clock.tick()
    recipe = dict(sample_solver="euler", sample_shift=5.0, guide_scale=(1.0, 1.0)) if four_step else {}
    params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=steps, seed=1, **recipe)
    result = pipe.generate(image, embeds, params)
    return {"t5_s": round(clock.steps()[0], 3), **{k: round(v, 3) for k, v in result.timings.items()},
            "kernels": result.kernels, "memory_mode": result.plan["mode"]}


def same_backend_as_engine(model, device) -> str:
    """diffusers' pipeline runs the same module: give it the kernel the engine's `auto` picks here."""
    from wan22.runtime import kernels

    backend, _ = kernels.resolve("auto", kernels.device_capability(device))
    kernels.apply(model, backend)
    return backend


def placeholder_vae(device):
    """A tiny Wan VAE (the real config, base_dim 8): the pipeline reads its z_dim and scale factors; it never runs
    (prepare_latents is replaced, output_type is "latent")."""
    from diffusers import AutoencoderKLWan

    from wan22.checkpoints.configs import load_config

    config = {k: v for k, v in load_config("wan21_vae.json").items() if not k.startswith("_")}
    return AutoencoderKLWan(**{**config, "base_dim": 8}).to(device).eval()


def run_diffusers(model, device, dtype, width, height, frames, steps, inputs) -> List[float]:
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from PIL import Image

    from wan22.request.params import GenerationParams
    from wan22.runtime.text_encoder import pad_context

    noise, y, context, context_null, _ = inputs
    defaults = GenerationParams()
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=defaults.sample_shift)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=placeholder_vae(device), scheduler=scheduler,
                                   transformer=model, transformer_2=model, boundary_ratio=defaults.boundary)
    pipe.set_progress_bar_config(disable=True)
    latents = noise[None].to(device, torch.float32)
    condition = y[None].to(device, torch.float32)
    # the conditioning VAE encode is outside what we time (the engine side gets y ready-made too)
    pipe.prepare_latents = lambda *args, **kwargs: (latents, condition)
    clock = Clock(device)

    def on_step(_pipe, _i, _t, kwargs):
        clock.tick()
        return kwargs

    image = Image.new("RGB", (width, height))
    clock.start()
    pipe(image=image, prompt_embeds=pad_context([context]).to(device, dtype),
         negative_prompt_embeds=pad_context([context_null]).to(device, dtype), height=height, width=width,
         num_frames=frames, num_inference_steps=steps, guidance_scale=defaults.guide_scale[1],
         guidance_scale_2=defaults.guide_scale[0], output_type="latent", callback_on_step_end=on_step)
    return clock.steps()


def to_fp8(model) -> None:
    """Quantize the block linears of a built expert in place, as weight_dtype fp8_e4m3fn_scaled loads them."""
    from wan22.runtime.fp8 import ScaledFP8Linear, is_fp8_layer, quantize

    for name, module in [(n, m) for n, m in model.named_modules() if is_fp8_layer(n, m)]:
        layer = ScaledFP8Linear.like(module)
        weight, scale = quantize(module.weight.data)
        layer.weight.data, layer.scale_weight = weight, scale
        if module.bias is not None:
            layer.bias.data = module.bias.data
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def memory_sweep(args, device, sizes, names, frames, out: Optional[Path] = None) -> dict:
    """The memory plan on a real GPU, emulating smaller cards: for each budget (torch's per-process memory
    fraction, and the plan's gpu_memory_gib) and weight storage, the plan the engine picks, its expected peak,
    and the measured peak and step time of `--steps` denoising steps (all on the high-noise expert)."""
    import torch

    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.memory import pinned_host
    from wan22.runtime.text_encoder import PromptEmbeds

    from .host_memory import host_stats

    blocks = SMOKE_MODEL["num_layers"] if args.smoke else A14B_BLOCKS
    if device.type == "cuda" and device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    budgets = [float(b) for b in args.budgets.split(",")]
    runs = []
    for weights in args.weights.split(","):
        # built (and quantized) on the GPU, then moved to the host the plans start from: random bf16 fills on the
        # host took over 3 minutes for the 28.6 GB on the H200 machine's 16 cores (2026-12-04), on the GPU 18 s.
        # Each storage gets its own expert, so the locked host bytes measured are that storage's alone.
        model = pipe = None
        gc.collect()
        if total:  # the budget emulates the card the plans run on, not the machine that builds the expert
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        log(f"building the {weights} expert ({blocks} blocks) on {device}, then moving it to the host")
        model = build_random_expert(model_config(blocks, args.smoke), device, torch.bfloat16)
        if weights.startswith("fp8"):
            to_fp8(model)
        model = model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log("built")
        for budget in budgets:
            if total:
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total), device)
            for res in names:
                width, height = sizes[res]
                noise, y, context, context_null, _ = latent_inputs(width, height, frames)
                options = LoadOptions(dtype="bf16", device=str(device), gpu_memory_gib=budget)
                pipe = Wan22I2VPipeline(model, model, None, None, options)
                params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=args.steps, seed=1,
                                          boundary=0.0)  # every step on one expert: one module stands for it
                entry = {"budget_gib": budget, "weights": weights, "resolution": res}
                try:
                    plan = pipe.plan(params)
                    entry.update(mode=plan.mode, resident_blocks=plan.resident_blocks,
                                 expected_peak_gib=round(plan.peak_gpu_bytes / 2**30, 2))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    reset_peak_rss()
                    clock = Clock(device)
                    clock.start()
                    with torch.no_grad():
                        pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params, on_step=clock.tick,
                                     plan=plan)
                    entry["host_locked_gib"] = round(pinned_host.locked_bytes() / 2**30, 2)
                    pipe.residency.evict()
                    entry["step_s"] = [round(t, 3) for t in clock.steps()]
                    if device.type == "cuda":
                        entry["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                        entry["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
                        torch_pinned = host_stats(torch).get("allocated_bytes.current", 0)
                        entry["torch_pinned_gib"] = round(torch_pinned / 2**30, 2)
                except Exception as exc:  # noqa: BLE001 - out of memory is a result here
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                entry["out_of_memory"] = "out of memory" in entry.get("error", "").lower()
                entry["peak_rss_gib"] = round(peak_rss_since_reset_mb() / 1024, 2)
                log(f"sweep {weights} {budget:g} GiB {res}: {entry}")
                runs.append(entry)
                if out is not None:  # after every run: a kill at the slot's limit loses one
                    write_result(out.stem, {"memory_sweep": runs, "simulated": False}, out.parent)
    if total:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"memory_sweep": runs, "simulated": False}


def modes_agree(args, device, sizes, names, frames, out: Optional[Path] = None) -> dict:
    """memory_mode full against stream (planned for the first of --budgets) on one random A14B-shaped expert and the
    same inputs: the latents after --steps denoising steps, compared bit for bit."""
    import torch

    from wan22.memory.placement import empty_cache
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.request.params import GenerationParams
    from wan22.runtime.text_encoder import PromptEmbeds

    blocks = SMOKE_MODEL["num_layers"] if args.smoke else A14B_BLOCKS
    budget = float(args.budgets.split(",")[0])
    model = build_random_expert(model_config(blocks, args.smoke), device, torch.bfloat16)
    runs = []
    for res in names:
        width, height = sizes[res]
        noise, y, context, context_null, _ = latent_inputs(width, height, frames)
        params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=args.steps, seed=1, boundary=0.0)
        entry, latents = {"resolution": res, "steps": args.steps}, {}
        for mode, cap in (("full", None), ("stream", budget)):
            pipe = Wan22I2VPipeline(model, model, None, None, LoadOptions(dtype="bf16", device=str(device), memory_mode=mode,
                                                                         gpu_memory_gib=cap))
            plan = pipe.plan(params)
            started = time.perf_counter()
            with torch.no_grad():
                latents[mode] = pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params, plan=plan).float().cpu()
            entry[mode] = {"plan": plan.mode, "resident_blocks": plan.resident_blocks, "budget_gib": cap,
                           "seconds": round(time.perf_counter() - started, 2)}
            pipe.residency.evict()
            model = model.to("cpu")  # stream starts from the host, as a loaded model does
            empty_cache(device)
        entry["bitwise_equal"] = torch.equal(latents["full"], latents["stream"])
        entry["max_abs_diff"] = float((latents["full"] - latents["stream"]).abs().max())
        log(f"modes {res}: {entry}")
        runs.append(entry)
        if out is not None:
            write_result(out.stem, {"modes_agree": runs, "simulated": False}, out.parent)
        model = model.to(device)
    return {"modes_agree": runs, "simulated": False}


def sharded_agree(args, device, sizes, names, frames, out: Optional[Path] = None) -> dict:
    """The several-GPU path on this machine's GPUs (one rank per GPU; NCCL, or one gloo rank with --smoke): each
    rank builds the same random expert, runs it whole (memory_mode full), then the same expert sharded over the ranks
    with dit_fsdp (and Ulysses over them when there are several: wan22.parallel.RankContext, as a rank of the pack
    runs it); rank 0 reports whether the latents agree, the GPU peak while sharding (the expert arrives one block at
    a time, never whole), what the shards hold, and what is left after the release. On one GPU the layout is a
    sharding over one rank, which the parameter checks do not offer: it runs every line of the code path."""
    import torch

    world = args.ranks or (torch.cuda.device_count() if device.type == "cuda" else 1)
    if world == 1:
        return _sharded_rank(0, 1, _free_port(), args, device.type, sizes, names, frames, out)
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_sharded_rank_to_queue, args=(world, _free_port(), args, device.type, sizes, names, frames, out, results),
                       nprocs=world, start_method="spawn")
    return results.get()


def _free_port() -> int:
    from wan22.request.processes import free_port

    return free_port()


def _sharded_rank_to_queue(rank, world, port, args, device_type, sizes, names, frames, out, results) -> None:
    data = _sharded_rank(rank, world, port, args, device_type, sizes, names, frames, out)
    if rank == 0:
        results.put(data)


def _sharded_rank(rank, world, port, args, device_type, sizes, names, frames, out) -> dict:
    import torch

    from wan22.memory.placement import empty_cache
    from wan22.parallel.context import RankContext
    from wan22.parallel.group import join_group, rank_device
    from wan22.pipeline import LoadOptions, Wan22I2VPipeline
    from wan22.request.parallel_layout import ParallelLayout
    from wan22.request.params import GenerationParams
    from wan22.runtime.text_encoder import PromptEmbeds

    device = rank_device(rank, torch.device(device_type))
    join_group(rank, world, port, device, 600.0)
    cuda = device.type == "cuda"
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    blocks = SMOKE_MODEL["num_layers"] if args.smoke else A14B_BLOCKS
    layout = ParallelLayout(ulysses_size=world, dit_fsdp=True)
    runs = []
    try:
        high = build_random_expert(model_config(blocks, args.smoke), device, torch.bfloat16)
        low = build_random_expert(model_config(1, args.smoke), device, torch.bfloat16, seed=1)  # unused: boundary 0
        block_bytes = sum(p.numel() * p.element_size() for p in high.blocks[0].parameters())
        options = LoadOptions(dtype="bf16", device=str(device), memory_mode="full")
        references = {}
        for res in names:
            width, height = sizes[res]
            noise, y, context, context_null, _ = latent_inputs(width, height, frames)
            params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=args.steps, seed=1, boundary=0.0)
            with torch.no_grad():
                references[res] = Wan22I2VPipeline(high, low, None, None, options).denoise(
                    noise, y, PromptEmbeds(context, context_null, "p", "n"), params).float().cpu()
        high.to("cpu"), low.to("cpu")  # as loaded: on the host
        empty_cache(device)
        pipe = Wan22I2VPipeline(high, low, None, None, options)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        pipe.ranks.context = RankContext(layout, device)
        pipe.ranks.context.prepare(pipe)
        shard = {"seconds": round(time.perf_counter() - started, 1), "block_gib": gib(block_bytes),
                 "shards_gib": gib(sum(getattr(p, "_local_tensor", p).numel() * p.element_size()
                                       for m in (high, low) for p in m.parameters()))}
        if cuda:
            shard.update(peak_gib=gib(torch.cuda.max_memory_allocated(device)), held_gib=gib(torch.cuda.memory_allocated(device)))
        for res in names:
            width, height = sizes[res]
            noise, y, context, context_null, _ = latent_inputs(width, height, frames)
            params = GenerationParams(size=f"{width}*{height}", frame_num=frames, sample_steps=args.steps, seed=1, boundary=0.0)
            plan = pipe.plan(params)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with torch.no_grad():
                latent = pipe.denoise(noise, y, PromptEmbeds(context, context_null, "p", "n"), params).float().cpu()
            entry = {"resolution": res, "steps": args.steps, "seconds": round(time.perf_counter() - started, 2),
                     "plan": plan.mode,
                     "bitwise_equal": torch.equal(latent, references[res]),
                     "max_abs_diff": float((latent - references[res]).abs().max())}
            if cuda:
                entry["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
            runs.append(entry)
            if rank == 0:
                log(f"sharded {res}: {entry}")
        pipe.release()
        del high, low
        gc.collect()
        released = gib(torch.cuda.memory_allocated(device)) if cuda else None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    data = {"sharded": runs, "layout": layout.describe(), "ranks": world, "shard": shard, "after_release_gib": released,
            "simulated": False}
    if rank == 0:
        log(f"sharded: {data}")
        if out is not None:
            write_result(out.stem, data, out.parent)
    return data


def gpu_at_start(device) -> dict:
    """The GPU's free and total memory before anything of ours is on it, and the SDPA backends torch may pick."""
    import torch

    if device.type != "cuda":
        return {"device": str(device)}
    free, total = torch.cuda.mem_get_info(device)
    backends = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in ("flash", "mem_efficient", "cudnn", "math")
                if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
    return {"free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2), "sdpa_enabled": backends,
            "capability": list(torch.cuda.get_device_capability(device))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run (tiny model, tiny sizes, 5 frames)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    ap.add_argument("--resolutions", default="480p,720p")
    ap.add_argument("--frames", type=int, default=None, help="default 81 (5 with --smoke)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per path and resolution (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (kernel selection, allocator)")
    ap.add_argument("--blocks", type=int, default=A14B_BLOCKS, help="transformer blocks to build (default all 40)")
    ap.add_argument("--paths", default="engine,engine_cfg_batch,diffusers,4step,whole,whole_4step",
                    help="engine, engine_cfg_batch, engine_compiled, engine@BACKEND (native, cudnn, flash, flash3, sage), "
                         "diffusers, 4step; whole / whole_4step: a whole video through the engine (T5 and VAE on the "
                         "GPU, random weights), each stage timed, the steps projected to 40 / 4; whole@MODE, "
                         "whole_4step@MODE: with memory_mode MODE (full, offload, stream) and two distinct experts")
    ap.add_argument("--backends", default="native,cudnn,flash,flash3",
                    help="also run engine@BACKEND for each (a backend this GPU cannot run is reported, not run)")
    ap.add_argument("--max-seconds", type=float, default=540.0,
                    help="skip a run that would end past this many seconds from the start (estimated from the runs "
                         "before it; default 540, to fit a 10-minute slot)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/gpu[_smoke].json)")
    ap.add_argument("--memory-sweep", action="store_true",
                    help="instead: the memory plan under emulated budgets (--budgets), bf16 and fp8 weights")
    ap.add_argument("--weights", default="bf16,fp8_e4m3fn_scaled", help="weight storages of --memory-sweep")
    ap.add_argument("--modes-agree", action="store_true",
                    help="instead: memory_mode full against stream (at the first of --budgets), latents bit for bit")
    ap.add_argument("--sharded", action="store_true",
                    help="the several-GPU path (dit_fsdp, Ulysses over the GPUs) against one process, on this machine's GPUs")
    ap.add_argument("--ranks", type=int, default=0, help="ranks of --sharded (default: the GPUs here; 1 on the CPU)")
    ap.add_argument("--budgets", default="23.4,21.9",
                    help="GiB budgets of --memory-sweep: the free memory of the cards to emulate (default 23.4,21.9: "
                         "an RTX 4090 and an L4/A10 after the CUDA context)")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench.gpu: no CUDA device here; run it on an H100/H200, or use --smoke on a CPU")
        return 2
    at_start = gpu_at_start(device)
    log(f"at start: {at_start}")
    dtype, dtype_name = torch.bfloat16, "bf16"
    frames = args.frames or (5 if args.smoke else 81)
    sizes = SMOKE_RESOLUTIONS if args.smoke else RESOLUTIONS
    names = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    paths += [f"engine@{b.strip()}" for b in args.backends.split(",") if b.strip() and f"engine@{b.strip()}" not in paths]
    if args.modes_agree:
        out = args.out or (RESULTS / ("gpu_modes_smoke.json" if args.smoke else "gpu_modes.json"))
        data = modes_agree(args, device, sizes, names, frames, out)
        data["at_start"] = at_start
        data["path"] = str(write_result(out.stem, data, out.parent))
        return 0 if all(run["bitwise_equal"] for run in data["modes_agree"]) else 1
    if args.sharded:
        out = args.out or (RESULTS / ("gpu_sharded_smoke.json" if args.smoke else "gpu_sharded.json"))
        data = sharded_agree(args, device, sizes, names, frames, out)
        data["at_start"] = at_start
        data["path"] = str(write_result(out.stem, data, out.parent))
        return 0 if all(run["max_abs_diff"] < 1e-2 for run in data["sharded"]) else 1
    if args.memory_sweep:
        out = args.out or (RESULTS / ("gpu_memory_smoke.json" if args.smoke else "gpu_memory.json"))
        data = memory_sweep(args, device, sizes, names, frames, out)
        data["at_start"] = at_start
        data["path"] = str(write_result(out.stem, data, out.parent))
        for run in data["memory_sweep"]:
            print(run)
        return 0
    blocks = SMOKE_MODEL["num_layers"] if args.smoke else max(1, min(args.blocks, A14B_BLOCKS))
    scale = 1.0 if args.smoke else A14B_BLOCKS / blocks

    config = model_config(blocks, args.smoke)
    log(f"building a random {'smoke-sized' if args.smoke else 'A14B-shaped'} expert ({blocks} blocks, dim "
        f"{config['num_attention_heads'] * config['attention_head_dim']}, ffn {config['ffn_dim']}) on {device}, bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = reset_peak_rss()
    t = time.perf_counter()
    model = build_random_expert(config, device, dtype)
    build_s = time.perf_counter() - t
    params_n = sum(p.numel() for p in model.parameters())
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    log(f"  {params_n / 1e9:.2f} B parameters, {weights_gb:.2f} GB, built in {build_s:.1f} s")

    results: Dict[str, Dict[str, dict]] = {}
    out = args.out or (RESULTS / ("gpu_smoke.json" if args.smoke else "gpu.json"))

    def snapshot() -> dict:
        """The result file as it stands: written after every path, so a run killed at its limit loses one path."""
        data = {"smoke": args.smoke, "device": str(device), "total_s": round(time.perf_counter() - began, 1),
                "dtype": dtype_name, "blocks_built": blocks,
                "blocks_scaled_to": A14B_BLOCKS if not args.smoke else blocks, "step_time_scale": scale,
                "parameters": params_n, "weights_gb": round(weights_gb, 2), "build_s": round(build_s, 2),
                "build_peak_rss_mb": round(peak_rss_since_reset_mb() - rss0, 1) if device.type == "cpu" else None,
                "config": {k: v for k, v in config.items() if not k.startswith("_")}, "results": results,
                "published_h100_s": PUBLISHED_H100_S,
                "note": ("engine/diffusers: one step = cond + uncond forward (CFG 3.5 on both experts) + the UniPC "
                         "update; 4step: one forward (guidance 1) with a rank-64 LoRA on every block linear + the "
                         "euler update; one module stands for both experts; text encoding and VAE are not timed")}
        if device.type == "cuda":
            data["gpu"] = torch.cuda.get_device_name(device)
        data["at_start"] = at_start
        data["path"] = str(write_result(out.stem, data, out.parent))
        return data

    whole = None  # the whole pipeline (T5 + VAE around the expert), built at its first use
    began = time.perf_counter() - build_s
    last: Optional[tuple] = None  # (tokens, seconds per step) of the latest run, for the time estimate
    for res in names:
        width, height = sizes[res]
        inputs = latent_inputs(width, height, frames)
        lat_f, lat_h, lat_w = inputs[4]
        tokens = lat_f * (lat_h // 2) * (lat_w // 2)
        results[res] = {"width": width, "height": height, "frames": frames, "tokens": tokens}
        for path in paths:
            if results[res]:
                snapshot()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            total = args.warmup + args.steps
            if time.perf_counter() - began > args.max_seconds:
                results[res][path] = {"error": f"skipped: --max-seconds {args.max_seconds:g} has passed"}
                log(f"  {path} skipped ({results[res][path]['error']})")
                continue
            if last is not None:
                estimate = (last[1] / scale) * (tokens / last[0]) ** 1.5 * (total + 1)
                if time.perf_counter() - began + estimate > args.max_seconds:
                    results[res][path] = {"error": f"skipped: about {estimate:.0f} s more would pass --max-seconds "
                                                   f"{args.max_seconds:g} (use fewer --steps or --blocks)"}
                    log(f"  {path} skipped ({results[res][path]['error']})")
                    continue
            log(f"{res} ({width}*{height}, {frames} frames, {tokens} tokens): {path}, {total} steps "
                f"({args.warmup} warm-up)")
            t = time.perf_counter()
            used = {}
            kind, _, mode = path.partition("@")
            if kind in ("whole", "whole_4step"):
                try:
                    whole = whole or whole_pipeline(model, device, dtype_name, args.smoke)
                    if mode and whole.low_noise_model is whole.high_noise_model and not args.smoke:
                        # the memory modes move experts: give it a second one (28.6 GB more; H100/H200 only)
                        whole.low_noise_model = build_random_expert(config, device, dtype, seed=1)
                    from wan22.pipeline import LoadOptions

                    run_pipe = whole.with_options(LoadOptions(**{**whole.options.__dict__, "memory_mode": mode or "auto"}))
                    n = 4 if kind == "whole_4step" else args.steps
                    entry = run_whole(run_pipe, device, width, height, frames, n, kind == "whole_4step")
                    per_step = entry["denoise_s"] / n * scale
                    full = 4 if kind == "whole_4step" else FULL_STEPS
                    entry.update(steps=n, projected_video_s=round(entry["t5_s"] + entry["prepare_s"] + entry["decode_s"]
                                                                  + per_step * full, 1), projected_steps=full)
                    if device.type == "cuda":
                        entry["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                except Exception as exc:  # noqa: BLE001
                    entry = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                results[res][path] = entry
                log(f"  {path}: {entry}")
                continue
            try:
                with torch.no_grad():
                    if path == "diffusers":
                        used = {"attention_backend": same_backend_as_engine(model, device)}
                        steps = run_diffusers(model, device, dtype, width, height, frames, total, inputs)
                    elif path == "4step":
                        steps = run_engine_4step(model, device, dtype_name, width, height, frames, total, inputs)
                    else:
                        steps, used = run_engine(model, device, dtype_name, width, height, frames, total, inputs, path)
            except InvalidParameter as exc:  # a kernel this machine cannot run
                results[res][path] = {"skipped": str(exc)}
                log(f"  {path} not run: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - report (e.g. out of memory) and go on
                results[res][path] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                log(f"  {path} failed: {exc}")
                continue
            timed = steps[args.warmup:] or steps
            per_step = sorted(timed)[len(timed) // 2] * scale
            entry = {"step_s": round(per_step, 4), "steps_s": [round(s, 4) for s in steps],
                     "warmup_steps": args.warmup, "wall_s": round(time.perf_counter() - t, 2),
                     "projected_40_steps_s": round(per_step * FULL_STEPS, 1), "kernels": used}
            if path == "4step":
                entry["projected_4_steps_s"] = round(per_step * 4, 1)
            if device.type == "cuda":
                entry["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                entry["peak_vram_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
            else:
                entry["peak_rss_mb"] = peak_rss_since_reset_mb()
            if not args.smoke and res in PUBLISHED_H100_S:
                entry["published_h100_s"] = PUBLISHED_H100_S[res]
                entry["projected_over_published"] = round(entry["projected_40_steps_s"] / PUBLISHED_H100_S[res], 3)
            results[res][path] = entry
            last = (tokens, per_step)
            log(f"  {path}: {per_step:.3f} s/step -> {entry['projected_40_steps_s']:.1f} s for 40 steps")
        e, d = results[res].get("engine", {}), results[res].get("diffusers", {})
        if e.get("step_s") and d.get("step_s"):
            results[res]["engine_over_diffusers"] = round(e["step_s"] / d["step_s"], 3)
        for path in paths:  # each variant's speedup over the plain engine path, measured in this run
            v = results[res].get(path, {})
            if path.startswith("engine") and path != "engine" and e.get("step_s") and v.get("step_s"):
                results[res].setdefault("speedup_over_engine", {})[path] = round(e["step_s"] / v["step_s"], 3)
        f = results[res].get("4step", {})
        if e.get("step_s") and f.get("step_s"):
            results[res]["40_steps_cfg_over_4step"] = round(e["step_s"] * FULL_STEPS / (f["step_s"] * 4), 2)

    data = snapshot()

    print(f"\n==== Wan2.2 I2V-A14B denoising step, {data.get('gpu', device)}, bf16, "
          f"{'smoke size' if args.smoke else f'{blocks}/40 blocks built'} ====")
    for res in names:
        r = results[res]
        for path in paths:
            e = r.get(path, {})
            if "projected_video_s" in e:
                print(f"{res} {path}: T5 {e['t5_s']:.2f} s, VAE encode {e['prepare_s']:.2f} s, {e['steps']} steps "
                      f"{e['denoise_s']:.2f} s, decode {e['decode_s']:.2f} s: projected video ({e['projected_steps']} "
                      f"steps) {e['projected_video_s']:.1f} s")
                continue
            if "skipped" in e:
                print(f"{res} {path:9s}: not run here ({e['skipped']})")
                continue
            if "error" in e:
                print(f"{res} {path:9s}: FAILED {e['error'][:200]}")
                continue
            mem = (f"peak VRAM {e['peak_vram_gb']:.1f} GB" if "peak_vram_gb" in e else f"peak RSS {e['peak_rss_mb']:.0f} MiB")
            published = (f" | published H100 {e['published_h100_s']:.1f} s (projected/published "
                         f"{e['projected_over_published']:.2f}x)" if "published_h100_s" in e else "")
            print(f"{res} {path:9s}: {e['step_s']:.3f} s/step, {mem}, projected 40 steps "
                  f"{e['projected_40_steps_s']:.1f} s{published}")
        if "engine_over_diffusers" in r:
            print(f"{res} engine/diffusers step time: {r['engine_over_diffusers']:.3f}x")
        for path, speedup in r.get("speedup_over_engine", {}).items():
            print(f"{res} {path} speedup over engine (auto kernel, two CFG passes): {speedup:.3f}x")
        if "40_steps_cfg_over_4step" in r:
            print(f"{res} 40 steps + CFG / 4-step recipe (denoising, projected): {r['40_steps_cfg_over_4step']:.2f}x "
                  f"({r['4step']['projected_4_steps_s']:.1f} s for 4 steps)")
    print(f"(results in {data['path']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
