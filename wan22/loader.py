"""A model set on disk -> a Wan22I2VPipeline in host memory: its headers checked, the host RAM it needs checked,
then the tokenizer, T5, the VAE and both experts read in the layout found (wan22.checkpoints) and stored as the
LoadOptions say. Where they run is decided per run (wan22.memory)."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoints import modules
from .checkpoints.key_maps import FP8_MARKER, FP8_SCALE_SUFFIX
from .checkpoints.tensors import open_safetensors, safetensors_files
from .memory import host_experts, planner
from .memory.residency import EXPERTS
from .pipeline import LoadOptions, Wan22I2VPipeline
from .request.errors import InvalidParameter
from .request.model_sets import ModelSet, discover_model_set
from .runtime.fp8 import FP8_DTYPES
from .runtime.text_encoder import HuggingFaceTokenizer, PromptEncoder, SentencePieceTokenizer


LOADERS = {
    "upstream": (modules.load_transformer_from_upstream_shards, modules.load_t5_from_upstream_pth, modules.load_vae_from_upstream_pth),
    "diffusers": (modules.load_transformer_from_diffusers_folder, modules.load_t5_from_diffusers_folder, modules.load_vae_from_diffusers_folder),
    "comfyui": (modules.load_transformer_from_comfy_file, modules.load_t5_from_comfy_file, modules.load_vae_from_comfy_file),
}


def load_tokenizer(model_set: ModelSet):
    if model_set.layout == "comfyui":
        proto = modules.comfy_embedded_tokenizer(model_set.files["text_encoder"])
        if proto is not None:
            return SentencePieceTokenizer(proto)
        fallback = model_set.root / "google" / "umt5-xxl"
        if fallback.is_dir():
            return HuggingFaceTokenizer(fallback)
        raise modules.CheckpointError(
            f"{model_set.files['text_encoder']} carries no spiece_model tensor and no google/umt5-xxl/ tokenizer folder is beside it"
        )
    return HuggingFaceTokenizer(model_set.files["tokenizer"])


def load_pipeline(source: Union[str, Path, ModelSet], options: LoadOptions = LoadOptions()) -> Wan22I2VPipeline:
    """Load both experts, the text encoder and the VAE of a model set into host memory, stored as the options
    say (see LoadOptions); where they run is decided per run by the memory plan (wan22.memory.planner)."""
    options = options.validated()
    model_set = source if isinstance(source, ModelSet) else discover_model_set(source)
    load_transformer, load_t5, load_vae = LOADERS[model_set.layout]
    check_safetensors_headers(model_set)
    expert_bytes, t5_bytes, vae_bytes = estimate_host_bytes(model_set, options)
    if options.rank == 0 and options.torch_device.type == "cuda":
        planner.check_shards_fit(expert_bytes, t5_bytes, options.layout, planner.Budget.detect(options.torch_device).gpu_bytes)
    held = planner.host_experts(expert_bytes, t5_bytes, vae_bytes, _host_share(options), planner.memory_setting("host_experts"))
    fp8 = options.keeps_fp8(model_set)
    expert_dtype = options.expert_dtype(model_set)
    # upstream runs T5 in bf16 whatever the DiT dtype (fp16 overflows in UMT5); fp32 stays fp32
    t5_dtype = torch.float32 if options.torch_dtype == torch.float32 else torch.bfloat16
    timings = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - start
        return result

    tokenizer = timed("tokenizer", load_tokenizer, model_set)
    text_model = timed("text_encoder", load_t5, model_set.files["text_encoder"], t5_dtype, "cpu")
    vae = timed("vae", load_vae, model_set.files["vae"], "cpu")
    readers = {name: functools.partial(load_transformer, model_set.files[name], expert_dtype, "cpu", fp8=fp8)
               for name in EXPERTS}
    high = timed("high_noise_model", readers["high_noise_model"])
    if held == 2:
        low = timed("low_noise_model", readers["low_noise_model"])
    else:  # parked: read when its turn comes (wan22.memory.host_experts)
        low = modules.build_transformer(dict(high.config), fp8)
        host_experts.park(low)
    pipe = Wan22I2VPipeline(high, low, PromptEncoder(tokenizer, text_model, options.torch_device), vae, options, model_set)
    pipe.load_timings = timings
    if held == 1:
        pipe.residency.expert_files = host_experts.ExpertFiles(readers)
    if options.layout.parallel and options.rank == 0:
        _start_ranks(pipe, model_set, options)
    return pipe


def _host_share(options: LoadOptions) -> Optional[int]:
    """The host RAM this process may plan with: ranks 1..N-1 load at once, after rank 0, sharing what it left."""
    available = planner.host_available()
    if available is None or options.rank == 0:
        return available
    return available // (options.layout.ranks - 1)


def _start_ranks(pipe: Wan22I2VPipeline, model_set: ModelSet, options: LoadOptions) -> None:
    """This process is rank 0 of a parallel layout: the other ranks start, each loading the same model set
    (wan22.parallel.group); if one cannot, every weight is released and RankFailed says why."""
    from .parallel.group import RankGroup

    try:
        heads = pipe.high_noise_model.config.num_attention_heads  # A14B's 40, fewer in the tests' tiny models
        problems = [(field, why) for field, why in options.layout.problems(heads=heads) if field == "ulysses_size"]
        if problems:
            raise InvalidParameter.from_problems(problems)
        RankGroup(model_set, options).start(pipe)
    except BaseException:
        pipe.release()
        raise


def estimate_host_bytes(model_set: ModelSet, options: LoadOptions) -> tuple:
    """(one expert, T5, VAE) bytes once loaded, from the checkpoint headers and file sizes, before loading."""
    fp8, dtype = options.keeps_fp8(model_set), options.expert_dtype(model_set)
    expert = 0
    for shard in open_safetensors(safetensors_files(model_set.files["high_noise_model"])):
        for key in shard.keys():
            stored, shape, begin, end = shard.entries[key]
            numel = (end - begin) // max(stored.itemsize, 1)
            if fp8 and key.endswith(".weight") and len(shape) == 2 and "blocks." in key:
                expert += numel
            else:
                expert += numel * (dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize)
    t5_file = model_set.files["text_encoder"]
    t5 = sum(p.stat().st_size for p in ([t5_file] if t5_file.is_file() else t5_file.rglob("*.safetensors")))
    if "fp8" in t5_file.name:
        t5 *= 2  # fp8 T5 files are loaded as bf16
    return expert, t5, model_set.files["vae"].stat().st_size if model_set.files["vae"].is_file() else 0


def check_safetensors_headers(model_set: ModelSet) -> None:
    """Read every safetensors header before loading: sizes against the file (a truncated shard), and in a
    scaled-fp8 file (marker `scaled_fp8`) a scale_weight beside every fp8 weight."""
    for part in ("high_noise_model", "low_noise_model", "text_encoder", "vae"):
        path = model_set.files[part]
        if not (path.is_dir() or path.suffix == ".safetensors"):
            continue
        for shard in open_safetensors(safetensors_files(path)):
            if FP8_MARKER not in shard.entries:
                continue
            unscaled = [key for key, (dtype, _, _, _) in shard.entries.items()
                        if dtype in FP8_DTYPES and key.endswith(".weight")
                        and key[: -len(".weight")] + FP8_SCALE_SUFFIX not in shard.entries]
            if unscaled:
                raise modules.CheckpointError(
                    f"{shard.path}: a scaled fp8 file whose fp8 weights {', '.join(unscaled[:3])}"
                    f"{f' and {len(unscaled) - 3} more' if len(unscaled) > 3 else ''} have no scale_weight: the file is "
                    f"damaged or was converted wrongly")
