"""A model set on disk -> a Wan22I2VPipeline in host memory: its headers checked, the host RAM it needs checked,
then the tokenizer, T5, the VAE and both experts read in the layout found (wan22.checkpoints) and stored as the
LoadOptions say. Where they run is decided per run (wan22.memory)."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch

from .checkpoints import modules
from .checkpoints.key_maps import FP8_MARKER, FP8_SCALE_SUFFIX
from .checkpoints.tensors import open_safetensors, safetensors_files
from .memory import host_experts, planner
from .memory.residency import EXPERTS
from .pipeline import LoadOptions, Wan22I2VPipeline
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


def load_pipeline(source: Union[str, Path, ModelSet], options: LoadOptions = LoadOptions(),
                  prepare_module: Optional[Callable[[str, torch.nn.Module], bool]] = None,
                  host_bytes: Optional[int] = None) -> Wan22I2VPipeline:
    """Load both experts, the text encoder and the VAE of a model set into host memory, stored as the options
    say (see LoadOptions); where they run is decided per run by the memory plan (wan22.memory.planner).

    A parallel layout (wan22.parallel): rank 0 (this call, options.rank 0) starts the other ranks first, reads its
    models making each ready for the layout as it is read (RankContext.prepare_module: with dit_fsdp a rank holds
    one expert at a time in host RAM, then only its shards), then has the other ranks load. They call this with
    their rank, their `prepare_module` and `host_bytes`, their share of the host RAM free (else all that is free),
    and read only what they run (runs_here)."""
    options = options.validated()
    model_set = source if isinstance(source, ModelSet) else discover_model_set(source)
    check_safetensors_headers(model_set)
    text_here, vae_here = runs_here(options)
    expert_bytes, t5_bytes, vae_bytes = estimate_host_bytes(model_set, options)
    if options.rank == 0 and options.torch_device.type == "cuda":
        planner.check_shards_fit(expert_bytes, t5_bytes, options.layout, planner.Budget.detect(options.torch_device).gpu_bytes)
    starts_ranks = options.rank == 0 and options.layout.parallel
    shards_as_read = (prepare_module is not None or starts_ranks) and options.layout.dit_fsdp
    held = planner.host_experts(expert_bytes, t5_bytes if text_here else 0, vae_bytes if vae_here else 0,
                                host_bytes if host_bytes is not None else planner.host_available(),
                                "sharded" if shards_as_read else planner.memory_setting("host_experts"))
    group = None
    if starts_ranks:  # the ranks first, so that this process's models too are made ready for the layout as read
        from .parallel.group import RankGroup

        group = RankGroup(model_set, options)
        prepare_module = group.join(options.torch_device).prepare_module
    timings = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if prepare_module is not None and name in ("text_encoder", *EXPERTS):
            prepare_module(name, result)
        timings[name] = time.perf_counter() - start
        return result

    try:
        pipe = _read(model_set, options, held, text_here, vae_here, timed)
    except BaseException:
        if group is not None:
            group.close()
        raise
    pipe.load_timings = timings
    if group is not None:
        _attach_ranks(pipe, group, model_set, options)
    return pipe


def _read(model_set: ModelSet, options: LoadOptions, held: int, text_here: bool, vae_here: bool, timed) -> Wan22I2VPipeline:
    """The models read (each through `timed`) into a pipeline."""
    load_transformer, load_t5, load_vae = LOADERS[model_set.layout]
    fp8 = options.keeps_fp8(model_set)
    expert_dtype = options.expert_dtype(model_set)
    # upstream runs T5 in bf16 whatever the DiT dtype (fp16 overflows in UMT5); fp32 stays fp32
    t5_dtype = torch.float32 if options.torch_dtype == torch.float32 else torch.bfloat16
    prompt_encoder = vae = None
    if text_here:
        tokenizer = timed("tokenizer", load_tokenizer, model_set)
        text_model = timed("text_encoder", load_t5, model_set.files["text_encoder"], t5_dtype, "cpu")
        prompt_encoder = PromptEncoder(tokenizer, text_model, options.torch_device)
    if vae_here:
        vae = timed("vae", load_vae, model_set.files["vae"], "cpu")
    readers = {name: functools.partial(load_transformer, model_set.files[name], expert_dtype, "cpu", fp8=fp8)
               for name in EXPERTS}
    high = timed("high_noise_model", readers["high_noise_model"])
    if held == 2:
        low = timed("low_noise_model", readers["low_noise_model"])
    else:  # parked: read when its turn comes (wan22.memory.host_experts)
        low = modules.build_transformer(dict(high.config), fp8)
        host_experts.park(low)
    pipe = Wan22I2VPipeline(high, low, prompt_encoder, vae, options, model_set)
    if held == 1:
        pipe.residency.expert_files = host_experts.ExpertFiles(readers)
    return pipe


def runs_here(options: LoadOptions) -> Tuple[bool, bool]:
    """(T5, the VAE): whether this process runs them. Rank 0 runs everything; ranks 1..N-1 of a parallel layout only
    denoise, so they load T5 only with t5_fsdp (they encode with rank 0) and never the VAE (rank 0 encodes the image
    and decodes): each rank saves the host RAM and the reading of T5 (11.4 GB) and the VAE."""
    if options.rank == 0:
        return True, True
    return options.layout.t5_fsdp, False


def rank_load_waves(model_set: ModelSet, options: LoadOptions, available: Optional[int]) -> List[List[int]]:
    """Ranks 1..N-1 in the groups that load together, from the host RAM `available` now (after rank 0 loaded). A
    rank sharding as it reads (dit_fsdp) holds one expert (and with t5_fsdp T5) while loading and then only its
    shards, on its GPU: as many load at once as that fits, the next group after them. Otherwise what a rank reads
    stays in host RAM, and all load at once, sharing it (each holds one expert where its share is short)."""
    ranks = list(range(1, options.layout.ranks))
    if not options.layout.dit_fsdp or available is None:
        return [ranks]
    rank_options = dataclasses.replace(options, rank=1)
    expert, t5, _ = estimate_host_bytes(model_set, rank_options)
    need = expert + (t5 if runs_here(rank_options)[0] else 0)
    at_once = max(1, min(len(ranks), (available - planner.HOST_RESERVE) // max(need, 1)))
    return [ranks[i:i + at_once] for i in range(0, len(ranks), at_once)]


def _attach_ranks(pipe: Wan22I2VPipeline, group, model_set: ModelSet, options: LoadOptions) -> None:
    """This process is rank 0 of a parallel layout, its models read: the other ranks load theirs (in groups that fit
    host RAM); if one cannot, every weight is released and RankFailed says why."""
    try:
        group.attach(pipe, lambda available: rank_load_waves(model_set, options, available))  # closes it on failure
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
