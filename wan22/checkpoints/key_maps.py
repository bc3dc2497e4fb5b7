"""Key maps from every checkpoint layout to the runtime models, one tensor at a time.

Runtime models: diffusers `WanTransformer3DModel` (both experts), transformers `UMT5EncoderModel`,
diffusers `AutoencoderKLWan`. Each map is a table of name templates read in both directions, so the
tiny-model builder writes the upstream names with the same table the loader reads them with.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .configs import load_json

COMFY_DIFFUSION_PREFIX = "model.diffusion_model."
FP8_SCALE_SUFFIX = ".scale_weight"
FP8_MARKER = "scaled_fp8"
COMFY_TOKENIZER_KEY = "spiece_model"

# (upstream Wan2.2 name, diffusers WanTransformer3DModel name); {i} is a block index
TRANSFORMER_NAMES: List[Tuple[str, str]] = [
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    # upstream norm3 is the cross-attention input norm, diffusers calls it norm2
    ("blocks.{i}.norm3.", "blocks.{i}.norm2."),
    ("blocks.{i}.ffn.0.", "blocks.{i}.ffn.net.0.proj."),
    ("blocks.{i}.ffn.2.", "blocks.{i}.ffn.net.2."),
] + [
    (f"blocks.{{i}}.{upstream}.{part}.", f"blocks.{{i}}.{diffusers}.{target}.")
    for upstream, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for part, target in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))
]

# (upstream wan.modules.t5 name, Hugging Face UMT5EncoderModel name)
T5_NAMES: List[Tuple[str, str]] = [
    ("token_embedding.", "shared."),
    ("norm.", "encoder.final_layer_norm."),
    ("blocks.{i}.norm1.", "encoder.block.{i}.layer.0.layer_norm."),
    ("blocks.{i}.norm2.", "encoder.block.{i}.layer.1.layer_norm."),
    ("blocks.{i}.pos_embedding.embedding.", "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{i}.ffn.gate.0.", "encoder.block.{i}.layer.1.DenseReluDense.wi_0."),
    ("blocks.{i}.ffn.fc1.", "encoder.block.{i}.layer.1.DenseReluDense.wi_1."),
    ("blocks.{i}.ffn.fc2.", "encoder.block.{i}.layer.1.DenseReluDense.wo."),
] + [(f"blocks.{{i}}.attn.{p}.", f"encoder.block.{{i}}.layer.0.SelfAttention.{p}.") for p in "qkvo"]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    # a template ending in '.' is a module prefix; otherwise it names the whole key
    return re.compile("^" + pattern + ("" if template.endswith(".") else "$"))


class NameMap:
    """Renames keys by a table of (source, target) templates; unknown keys map to None."""

    def __init__(self, pairs: List[Tuple[str, str]]):
        self._rules = [(_template_regex(src), dst) for src, dst in pairs]

    def __call__(self, key: str) -> Optional[str]:
        for regex, target in self._rules:
            match = regex.match(key)
            if match:
                index = match.groupdict().get("i")
                prefix = target.replace("{i}", index) if index is not None else target
                return prefix + key[match.end():]
        return None


def _two_way(pairs: List[Tuple[str, str]]) -> Tuple[NameMap, NameMap]:
    return NameMap(pairs), NameMap([(dst, src) for src, dst in pairs])


upstream_to_diffusers_transformer, diffusers_to_upstream_transformer = _two_way(TRANSFORMER_NAMES)
upstream_to_hf_t5, hf_to_upstream_t5 = _two_way(T5_NAMES)


@functools.lru_cache(maxsize=1)
def _vae_key_tables() -> Tuple[Dict[str, str], Dict[str, str]]:
    """Upstream Wan2.1 VAE names <-> diffusers AutoencoderKLWan names (diffusers' own per-key converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    names = load_json("wan21_vae_upstream_keys.json")
    forward = {}
    for name in names:
        (converted,) = convert_wan_vae_to_diffusers({name: torch.empty(0)}).keys()
        forward[name] = converted
    return forward, {v: k for k, v in forward.items()}


def upstream_to_diffusers_vae(key: str) -> Optional[str]:
    return _vae_key_tables()[0].get(key)


def diffusers_to_upstream_vae(key: str) -> Optional[str]:
    return _vae_key_tables()[1].get(key)


def comfy_to_diffusers_transformer(key: str) -> Optional[str]:
    """ComfyUI diffusion-model files use the upstream names, sometimes under `model.diffusion_model.`."""
    if key.startswith(COMFY_DIFFUSION_PREFIX):
        key = key[len(COMFY_DIFFUSION_PREFIX):]
    return upstream_to_diffusers_transformer(key)


def comfy_to_hf_t5(key: str) -> Optional[str]:
    """ComfyUI text encoders already use Hugging Face T5 names (`shared.weight`, `encoder.block...`)."""
    if key.startswith("encoder.") or key == "shared.weight":
        return key
    return None


def identity(key: str) -> Optional[str]:
    return key


def dequantize_fp8(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """ComfyUI fp8_scaled: float8_e4m3fn weight times its per-layer scale_weight, in float32."""
    weight = weight.to(torch.float32)
    if scale is not None:
        weight = weight * scale.to(torch.float32)
    return weight


KeyMap = Callable[[str], Optional[str]]
