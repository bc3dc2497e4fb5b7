"""Build the runtime models on the meta device and fill them from any layout.

One function per (component, layout); each reads its config (from the checkpoint's config.json, or
inferred from tensor shapes when the layout carries none), builds the module without allocating
weights, and streams the tensors in through `load.fill_module`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import key_maps
from .configs import load_config
from ..request.errors import CheckpointError
from ..runtime.fp8 import swap_in_fp8_layers
from .tensors import (
    fill_module,
    fp8_scale_getters,
    is_fp8_aux_key,
    iter_safetensors,
    iter_state_dict,
    load_pth_state_dict,
    open_safetensors,
    parameters_on_meta,
    safetensors_files,
    stream_safetensors,
)

Shapes = Dict[str, Tuple[int, ...]]
HEAD_DIM = 128  # Wan2.2 A14B: 5120 / 40 heads; ComfyUI infers heads the same way


def safetensors_shapes(files) -> Shapes:
    return {key: shard.shape(key) for shard in open_safetensors(files) for key in shard.keys()}


def _count_blocks(shapes: Shapes, pattern: str) -> int:
    indices = {int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m}
    return max(indices) + 1 if indices else 0


def _require(shapes: Shapes, key: str, source: str) -> Tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: tensor {key} not found; is this a Wan2.2 I2V checkpoint of the expected kind?")
    return shapes[key]


# ---------------------------------------------------------------- transformer (one expert)

def transformer_config_from_upstream(upstream: dict) -> dict:
    """Upstream WanModel config.json -> diffusers WanTransformer3DModel config.

    Upstream drops `text_dim` from config.json (ignore_for_config), meaning its default 4096.
    """
    config = load_config("wan22_i2v_a14b_transformer.json")
    dim, heads = upstream.get("dim", 5120), upstream.get("num_heads", 40)
    config.update(
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=upstream.get("in_dim", 36),
        out_channels=upstream.get("out_dim", 16),
        text_dim=upstream.get("text_dim", 4096),
        freq_dim=upstream.get("freq_dim", 256),
        ffn_dim=upstream.get("ffn_dim", 13824),
        num_layers=upstream.get("num_layers", 40),
        eps=upstream.get("eps", 1e-6),
    )
    return config


def transformer_config_from_upstream_shapes(shapes: Shapes, source: str) -> dict:
    """For single files without config (ComfyUI): dims from the tensors, heads = dim / 128."""
    dim, in_dim = _require(shapes, "patch_embedding.weight", source)[:2]
    config = load_config("wan22_i2v_a14b_transformer.json")
    config.update(
        num_attention_heads=max(dim // HEAD_DIM, 1),
        attention_head_dim=dim // max(dim // HEAD_DIM, 1),
        in_channels=in_dim,
        out_channels=_require(shapes, "head.head.weight", source)[0] // 4,
        text_dim=_require(shapes, "text_embedding.0.weight", source)[1],
        freq_dim=_require(shapes, "time_embedding.0.weight", source)[1],
        ffn_dim=_require(shapes, "blocks.0.ffn.0.weight", source)[0],
        num_layers=_count_blocks(shapes, r"blocks\.(\d+)\."),
    )
    return config


def build_transformer(config: dict, fp8: bool = False):
    """The expert on the meta device; with `fp8`, its block linears are ScaledFP8Linear (see wan22.runtime.fp8)."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with parameters_on_meta():
        model = WanTransformer3DModel(**config)
    if fp8:
        swap_in_fp8_layers(model)
    return model


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from exc


def load_transformer_from_upstream_shards(folder: Path, dtype, device, fp8: bool = False):
    files = safetensors_files(folder)
    model = build_transformer(transformer_config_from_upstream(read_json(Path(folder) / "config.json")), fp8)
    return fill_module(model, stream_safetensors(files), key_maps.upstream_to_diffusers_transformer, dtype, device, str(folder))


def load_transformer_from_diffusers_folder(folder: Path, dtype, device, fp8: bool = False):
    files = safetensors_files(folder)
    model = build_transformer(read_json(Path(folder) / "config.json"), fp8)
    return fill_module(model, stream_safetensors(files), key_maps.identity, dtype, device, str(folder))


def load_transformer_from_comfy_file(file: Path, dtype, device, fp8: bool = False):
    """ComfyUI diffusion_models/*.safetensors: upstream names (maybe prefixed), fp16/bf16 or fp8_scaled."""
    shapes = safetensors_shapes([file])
    prefix = key_maps.COMFY_DIFFUSION_PREFIX if any(k.startswith(key_maps.COMFY_DIFFUSION_PREFIX) for k in shapes) else ""
    unprefixed = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    model = build_transformer(transformer_config_from_upstream_shapes(unprefixed, str(file)), fp8)
    scales = fp8_scale_getters(dict(iter_safetensors([file])))  # read on demand, beside the stream
    return fill_module(
        model, stream_safetensors([file]), key_maps.comfy_to_diffusers_transformer, dtype, device, str(file),
        ignore=is_fp8_aux_key, fp8_scales=scales,
    )


# ---------------------------------------------------------------- UMT5 text encoder

def t5_config_from_shapes(shapes: Shapes, source: str, hf_names: bool):
    """UMT5 encoder dims from the tensors (upstream has no config file for its T5)."""
    from transformers import UMT5Config

    names = (lambda up: key_maps.upstream_to_hf_t5(up)) if hf_names else (lambda up: up)
    vocab, dim = _require(shapes, names("token_embedding.weight"), source)
    dim_attn = _require(shapes, names("blocks.0.attn.q.weight"), source)[0]
    buckets, heads = _require(shapes, names("blocks.0.pos_embedding.embedding.weight"), source)
    dim_ffn = _require(shapes, names("blocks.0.ffn.fc1.weight"), source)[0]
    layers = _count_blocks(shapes, r"encoder\.block\.(\d+)\." if hf_names else r"blocks\.(\d+)\.")
    config = load_config("umt5_xxl_encoder.json")
    config.update(
        vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads, num_heads=heads, d_ff=dim_ffn,
        num_layers=layers, num_decoder_layers=layers, relative_attention_num_buckets=buckets,
    )
    return UMT5Config(**config)


# transformers keeps UMT5's `wo` in fp32 because its output overflows fp16; our T5 is bf16 (fp32's range) or
# fp32, and upstream computes `wo` in bf16 like the rest: in fp32 it is 2 GB more and, on a CPU with fast bf16,
# a third of the feed-forward's FLOPs at fp32 speed (1.5x the whole encode measured)
T5_KEPT_IN_FP32: tuple = ()


def build_t5_encoder(config):
    from transformers import UMT5EncoderModel

    with parameters_on_meta():
        model = UMT5EncoderModel(config)
    model._keep_in_fp32_modules = list(T5_KEPT_IN_FP32)  # what fill_module reads
    return model


def load_t5_from_upstream_pth(file: Path, dtype, device):
    state = load_pth_state_dict(file)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    model = build_t5_encoder(t5_config_from_shapes(shapes, str(file), hf_names=False))
    return fill_module(model, iter_state_dict(state), key_maps.upstream_to_hf_t5, dtype, device, str(file))


def load_t5_from_diffusers_folder(folder: Path, dtype, device):
    from transformers import UMT5Config

    config = UMT5Config(**{k: v for k, v in read_json(Path(folder) / "config.json").items() if not k.startswith("_")})
    model = build_t5_encoder(config)
    # transformers stores the tied embedding as shared.weight or encoder.embed_tokens.weight
    rename = lambda key: "shared.weight" if key == "encoder.embed_tokens.weight" else key
    return fill_module(model, iter_safetensors(safetensors_files(folder)), rename, dtype, device, str(folder))


def load_t5_from_comfy_file(file: Path, dtype, device):
    shapes = safetensors_shapes([file])
    model = build_t5_encoder(t5_config_from_shapes(shapes, str(file), hf_names=True))
    tensors = dict(iter_safetensors([file]))
    scales = fp8_scale_getters(tensors)
    ignore = lambda key: is_fp8_aux_key(key) or key == key_maps.COMFY_TOKENIZER_KEY
    return fill_module(model, iter(tensors.items()), key_maps.comfy_to_hf_t5, dtype, device, str(file), ignore=ignore, fp8_scales=scales)


def comfy_embedded_tokenizer(file: Path) -> Optional[bytes]:
    """ComfyUI text-encoder files often carry their sentencepiece model as a uint8 tensor."""
    (shard,) = open_safetensors([file])
    if key_maps.COMFY_TOKENIZER_KEY in shard.keys():
        return shard.read(key_maps.COMFY_TOKENIZER_KEY).numpy().tobytes()
    return None


# ---------------------------------------------------------------- Wan2.1 VAE

def vae_config_from_upstream_shapes(shapes: Shapes, source: str) -> dict:
    config = load_config("wan21_vae.json")
    config["base_dim"] = _require(shapes, "encoder.conv1.weight", source)[0]
    config["z_dim"] = _require(shapes, "conv2.weight", source)[0]
    return config


def build_vae(config: dict):
    from diffusers import AutoencoderKLWan

    with parameters_on_meta():
        return AutoencoderKLWan(**{k: v for k, v in config.items() if not k.startswith("_")})


def _load_vae_with_upstream_names(tensors, shapes: Shapes, device, source: str):
    model = build_vae(vae_config_from_upstream_shapes(shapes, source))
    return fill_module(model, tensors, key_maps.upstream_to_diffusers_vae, torch.float32, device, source)


def load_vae_from_upstream_pth(file: Path, device):
    state = load_pth_state_dict(file)
    return _load_vae_with_upstream_names(iter_state_dict(state), {k: tuple(v.shape) for k, v in state.items()}, device, str(file))


def load_vae_from_comfy_file(file: Path, device):
    """ComfyUI's wan_2.1_vae.safetensors keeps the upstream names."""
    return _load_vae_with_upstream_names(iter_safetensors([file]), safetensors_shapes([file]), device, str(file))


def load_vae_from_diffusers_folder(folder: Path, device):
    model = build_vae(read_json(Path(folder) / "config.json"))
    return fill_module(model, iter_safetensors(safetensors_files(folder)), key_maps.identity, torch.float32, device, str(folder))
